"""Exactly-once at the two moments a partition changes hands, in process on the real broker, each made to happen
at its worst time instead of waiting for a broker kill to line it up (tests/faults does that, at random):

- a new owner must read where to start only after its transactional producer fenced the previous owner, because
  fencing is what completes the previous owner's last transaction (and its offsets with it);
- a transaction whose commit succeeded but whose answer was lost must not be redone.

Both count the results a read_committed reader sees: each request answered once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from consumers import Worker
from producers import StreamerClient, request_headers
from schemas import Codec, InferenceRequest
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.models import load_model

from .faults.load import drain

pytestmark = pytest.mark.kafka


async def _answers(ws: WorkerSettings, expected: int, topic: str | None = None, timeout_s: float = 60) -> Counter[str]:
    """Request ids of the committed results, once ``expected`` different ones are in (and a little after)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await drain(ws, topic or ws.results_topic, idle_s=1.0, isolation_level="read_committed")
        ids = Counter(dict(r.headers).get("streamer-request-id", b"").decode() for r in records)
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids


async def test_a_new_owner_starts_where_its_predecessor_committed_while_it_took_over(
    created_topics: WorkerSettings,
) -> None:
    """The previous owner of partition 0 answered r0-r4 and put offset 5 in the same transaction; its commit
    lands after the new owner's consumer read the group's offsets (none yet) and before the new owner fenced it.
    Read before the fence, the new owner would answer r0-r4 again."""
    ws = created_topics.model_copy(update={"delivery": "exactly-once"})
    tp0 = TopicPartition(ws.request_topic, 0)
    codec = Codec()
    inputs = load_model("tiny-mlp", "cpu").example_inputs(10, seed=8)
    producer = kafka.producer(ws)
    await producer.start()
    try:
        for i, x in enumerate(inputs):
            request = InferenceRequest(id=f"r{i}", model="tiny-mlp", inputs=x)
            await producer.send_and_wait(ws.request_topic, codec.encode_request(request), partition=0,
                                         headers=request_headers(request))
    finally:
        await producer.stop()
    previous = kafka.producer(ws, transactional_id=f"{ws.group_id}.{ws.request_topic}.0")
    await previous.start()
    await previous.begin_transaction()
    for i in range(5):
        await previous.send(ws.results_topic, b"answered by the previous owner",
                            headers=[("streamer-request-id", f"r{i}".encode())])
    await previous.send_offsets_to_transaction({tp0: 5}, ws.group_id)

    worker = Worker(ws)
    assert worker._txn is not None
    start = worker._txn.producers._start
    late: list[float] = []

    async def commit_late_then_start(tp: TopicPartition) -> AIOKafkaProducer:
        if tp == tp0 and not late:
            await asyncio.sleep(0.5)  # the group's offsets are read by now: none committed for partition 0
            await previous.commit_transaction()
            late.append(time.monotonic())
        return await start(tp)

    worker._txn.producers._start = commit_late_then_start  # type: ignore[method-assign]
    await worker.start()
    try:
        ids = await _answers(ws, 10)
    finally:
        await worker.stop()
        await previous.stop()
    ids = await _answers(ws, 10)
    assert late, "the previous owner's commit was not made to land during the takeover"
    assert ids == Counter({f"r{i}": 1 for i in range(10)}), ids


async def test_a_commit_whose_answer_is_lost_is_not_redone(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """The first commit succeeds on the broker but the worker is told it timed out (as when the coordinator dies
    after writing it). Redone from the window's first offset, its requests would be answered twice."""
    ws = created_topics.model_copy(update={"delivery": "exactly-once", "max_batch_size": 8})
    worker = Worker(ws)
    assert worker._txn is not None
    start = worker._txn.producers._start
    lost: list[TopicPartition] = []

    async def answer_lost_once(tp: TopicPartition) -> AIOKafkaProducer:
        producer = await start(tp)
        commit = producer.commit_transaction

        async def commit_then_lose_the_answer() -> Any:
            await commit()
            if not lost:
                lost.append(tp)
                raise KafkaTimeoutError("the commit's answer was lost (test)")

        producer.commit_transaction = commit_then_lose_the_answer  # type: ignore[method-assign]
        return producer

    worker._txn.producers._start = answer_lost_once  # type: ignore[method-assign]
    await worker.start()
    inputs = load_model("tiny-mlp", "cpu").example_inputs(60, seed=9)
    stopped = False
    try:
        async with StreamerClient(client_settings) as client:  # its reply topic goes with it: read it inside
            futures = [await client.submit(x, model="tiny-mlp", key=f"k{i % 8}") for i, x in enumerate(inputs)]
            results = list(await asyncio.gather(*futures))
            await worker.stop()
            stopped = True
            ids = await _answers(ws, 60, client.reply_to.topic)
    finally:
        if not stopped:
            await worker.stop()
    assert lost, "no commit was made to lose its answer"
    assert all(r.status == "ok" for r in results)
    assert len(ids) == 60 and set(ids.values()) == {1}, sorted(i for i, n in ids.items() if n > 1)
