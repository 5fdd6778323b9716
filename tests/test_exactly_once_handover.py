"""Exactly-once at the two moments a partition changes hands, in process on the real broker, each made to happen
at its worst time instead of waiting for a broker kill to line it up (tests/faults does that, at random):

- a new owner must read where to start only once no open transaction of the previous owner holds offsets of the
  partition (waited for while the previous owner may complete it; fenced when it is dead);
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
from consumers._group_fencing import Member, UnstableOffsets, group_commit
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


async def _requests(ws: WorkerSettings, n: int, seed: int) -> None:
    """``n`` requests r0..r(n-1) to partition 0."""
    codec = Codec()
    producer = kafka.producer(ws)
    await producer.start()
    try:
        for i, x in enumerate(load_model("tiny-mlp", "cpu").example_inputs(n, seed=seed)):
            request = InferenceRequest(id=f"r{i}", model="tiny-mlp", inputs=x)
            await producer.send_and_wait(ws.request_topic, codec.encode_request(request), partition=0,
                                         headers=request_headers(request))
    finally:
        await producer.stop()


async def _previous_owner(ws: WorkerSettings, txn_id: str, answered: range, offset: int) -> AIOKafkaProducer:
    """A previous owner of partition 0 with its transaction open: answers for ``answered``, offsets up to
    ``offset`` (with its id as their metadata, as a worker commits them)."""
    previous = kafka.producer(ws, transactional_id=txn_id)
    await previous.start()
    await previous.begin_transaction()
    for i in answered:
        await previous.send(ws.results_topic, b"answered by the previous owner",
                            headers=[("streamer-request-id", f"r{i}".encode())])
    await previous.send_offsets_to_transaction({TopicPartition(ws.request_topic, 0): (offset, txn_id)}, ws.group_id)
    return previous


async def test_a_new_owner_waits_for_its_predecessors_open_transaction(created_topics: WorkerSettings) -> None:
    """The previous owner of partition 0 answered r0-r4 and put offset 5 in the same transaction, still open when
    the new owner takes over; it commits a moment later. Read before it completed, the group's offset (none yet)
    would have the new owner answer r0-r4 again."""
    ws = created_topics.model_copy(update={"delivery": "exactly-once"})
    await _requests(ws, 10, seed=8)
    previous = await _previous_owner(ws, f"{ws.group_id}.previous", range(5), 5)
    worker = Worker(ws)
    assert worker._txn is not None
    fetch = worker._txn._fetch
    unstable: list[float] = []

    async def commit_once_seen_unstable(tps: list[TopicPartition], *, stable: bool) -> Any:
        try:
            return await fetch(tps, stable=stable)
        except UnstableOffsets:
            if not unstable:
                unstable.append(time.monotonic())
                await previous.commit_transaction()
            raise

    worker._txn._fetch = commit_once_seen_unstable  # type: ignore[method-assign]
    await worker.start()
    try:
        ids = await _answers(ws, 10)
    finally:
        await worker.stop()
        await previous.stop()
    ids = await _answers(ws, 10)
    assert unstable, "the takeover did not see the previous owner's transaction open"
    assert ids == Counter({f"r{i}": 1 for i in range(10)}), ids


async def test_a_dead_predecessors_open_transaction_is_fenced_and_its_records_done_again(
    created_topics: WorkerSettings,
) -> None:
    """The previous owner committed r0-r2 (offset 3), then died with r3-r4 and offset 5 in an open transaction.
    The new owner fences it by the id in the offsets' metadata (its transaction aborts), not waiting for the
    transaction to time out, and answers r3-r9: each request answered once."""
    ws = created_topics.model_copy(update={"delivery": "exactly-once"})
    await _requests(ws, 10, seed=8)
    dead_id = f"{ws.group_id}.dead"
    previous = await _previous_owner(ws, dead_id, range(3), 3)
    await previous.commit_transaction()
    await previous.begin_transaction()
    for i in (3, 4):
        await previous.send(ws.results_topic, b"answered by the previous owner, then it died",
                            headers=[("streamer-request-id", f"r{i}".encode())])
    await previous.send_offsets_to_transaction({TopicPartition(ws.request_topic, 0): (5, dead_id)}, ws.group_id)
    worker = Worker(ws)
    assert worker._txn is not None
    t0 = time.monotonic()
    await worker.start()
    try:
        ids = await _answers(ws, 10)
        took = time.monotonic() - t0
    finally:
        await worker.stop()
        await previous.stop()
    ids = await _answers(ws, 10)
    assert worker._txn.fenced_others == 1
    assert ids == Counter({f"r{i}": 1 for i in range(10)}), ids
    assert took < 10, f"{took:.1f} s: waited for the transaction timeout instead of fencing"


async def test_a_commit_whose_answer_is_lost_is_not_redone(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """The first commit succeeds on the broker but the worker is told it timed out (as when the coordinator dies
    after writing it). Redone from the window's first offset, its requests would be answered twice."""
    ws = created_topics.model_copy(update={"delivery": "exactly-once", "max_batch_size": 8})
    worker = Worker(ws)
    assert worker._txn is not None
    start = worker._txn._start
    lost: list[bool] = []

    async def answer_lost_once() -> AIOKafkaProducer:
        producer = await start()
        commit = producer.commit_transaction

        async def commit_then_lose_the_answer() -> Any:
            await commit()
            if not lost:
                lost.append(True)
                raise KafkaTimeoutError("the commit's answer was lost (test)")

        producer.commit_transaction = commit_then_lose_the_answer  # type: ignore[method-assign]
        return producer

    worker._txn._start = answer_lost_once  # type: ignore[method-assign]
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


async def test_each_transaction_adds_the_group_beside_its_records(created_topics: WorkerSettings) -> None:
    """A worker's producer adds the consumer group to each transaction (AddOffsetsToTxn) as the transaction opens,
    beside its records, not after them when its offsets are sent: a commit takes one round trip less. Twice, as
    each transaction starts without the group."""
    ws = created_topics
    producer = kafka.producer(ws, transactional_id=f"{ws.group_id}.early.0")
    group_commit(producer, lambda: Member(-1, "", None), f"{ws.group_id}.early", ws.group_id)
    added: list[str] = []
    add = producer._sender._do_add_offsets_to_txn

    async def counted(group_id: str) -> Any:
        added.append(group_id)
        return await add(group_id)

    producer._sender._do_add_offsets_to_txn = counted
    await producer.start()
    tp = TopicPartition(ws.request_topic, 0)
    try:
        for offset in (3, 7):
            await producer.begin_transaction()
            await producer.send_and_wait(ws.results_topic, b"a result", partition=0)
            for _ in range(100):
                if producer._txn_manager._txn_consumer_group == ws.group_id:
                    break
                await asyncio.sleep(0.05)
            assert added == [ws.group_id] * (1 + (offset == 7)), "the group was not added before the offsets"
            await producer.send_offsets_to_transaction({tp: offset}, ws.group_id)
            await producer.commit_transaction()
        assert added == [ws.group_id] * 2  # not again when the offsets went
    finally:
        await producer.stop()
    committed = (await kafka.committed_offsets(ws, ws.group_id))[tp]
    assert (committed.offset, committed.metadata) == (7, f"{ws.group_id}.early")
