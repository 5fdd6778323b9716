"""The worker's inside, in process on the real broker: the model overlaps publishing, fetches wait for a batch only
while records come fast, and exactly-once transactions span batches when more work is at hand, their producers
started on assignment, and go on without a reply topic deleted under them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch
from aiokafka.errors import UnknownTopicOrPartitionError

from consumers import Worker
from consumers._batch import Batch
from consumers._routes import ReplyRoutes
from consumers._transactions import drop_gone_partitions
from producers import StreamerClient
from streamer import kafka
from streamer.config import ClientSettings, WorkerSettings
from streamer.models import TinyMLP, load_model

from .faults.load import drain

pytestmark = pytest.mark.kafka


class Slow(TinyMLP):
    """tiny-mlp that takes 30 ms per batch (on the model thread: slower than a thread hop), noting its batches."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.started: list[float] = []
        self.threads: set[str] = set()

    def forward(self, batch: torch.Tensor) -> Any:
        self.started.append(time.monotonic())
        self.threads.add(threading.current_thread().name)
        time.sleep(0.03)
        return super().forward(batch)


async def _answered(client_settings: ClientSettings, n: int) -> list[Any]:
    inputs = load_model("tiny-mlp", "cpu").example_inputs(n, seed=3)
    async with StreamerClient(client_settings) as client:
        futures = [await client.submit(x, model="tiny-mlp", key=f"k{i % 8}") for i, x in enumerate(inputs)]
        return list(await asyncio.gather(*futures))


async def test_the_model_runs_the_next_batch_while_the_last_is_published(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    model = Slow()
    worker = Worker(created_topics.model_copy(update={"max_batch_size": 8, "max_wait_ms": 20.0}), model=model)
    published: list[tuple[float, float]] = []  # (start, end) of each batch's publishing
    publish = worker.pipeline._publish

    async def timed(batch: Batch, *, more: bool, busy: bool = False) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.02)  # publishing that takes a while: the model must not wait for it
        await publish(batch, more=more, busy=busy)
        published.append((start, time.monotonic()))

    worker.pipeline._publish = timed  # type: ignore[method-assign]
    await worker.start()
    model.started.clear()  # the warm-up's runs, on another thread
    model.threads.clear()
    try:
        results = await _answered(client_settings, 160)
    finally:
        await worker.stop()
    assert [r.status for r in results] == ["ok"] * 160
    assert all(t.startswith("streamer-model") for t in model.threads)
    # Under a backlog (160 requests, batches of 8), the model runs (30 ms at least) the next batch while a
    # batch is published, for most batches; run one after the other, no run would overlap a publishing.
    overlapped = sum(any(s < end and s + 0.03 > start for s in model.started) for start, end in published)
    assert overlapped >= len(published) // 2, (overlapped, len(published))


async def test_fetches_wait_for_a_batch_while_records_come_fast_and_not_when_idle(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """Under a steady stream a fetch waits at the broker for a batch's worth of records (8 of about 200 bytes), for
    at most the batch's wait; idle, it waits for the first record (and 500 ms when none comes), so an idle worker
    sends a few fetches a second, not one every ``max_wait_ms``."""
    worker = Worker(created_topics.model_copy(update={"max_batch_size": 8, "max_wait_ms": 20.0}))
    await worker.start()
    fetcher = worker._consumer._fetcher
    sent: list[str] = []
    send = worker._consumer._client.send

    async def counted(node_id: int, request: Any, **kw: Any) -> Any:
        sent.append(type(request).__name__)
        return await send(node_id, request, **kw)

    worker._consumer._client.send = counted  # type: ignore[method-assign]
    try:
        await asyncio.sleep(1.5)
        idle_fetches = sum(1 for name in sent if name.startswith("FetchRequest"))
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (1, 500)
        assert idle_fetches <= 8, sent  # one broker, 500 ms each: about 3; paced, it would be 75
        paced: list[tuple[int, int]] = []
        inputs = load_model("tiny-mlp", "cpu").example_inputs(600, seed=5)
        async with StreamerClient(client_settings) as client:
            futures = []
            for i, x in enumerate(inputs):  # 400 a second: 8 within each 20 ms wait
                futures.append(await client.submit(x, model="tiny-mlp", key=f"k{i % 8}"))
                if i % 40 == 39:
                    paced.append((fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms))
                    await asyncio.sleep(0.1)
            results = await asyncio.gather(*futures)
            assert [r.status for r in results] == ["ok"] * 600
            await asyncio.sleep(1.0)  # the stream has stopped
            assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (1, 500)
    finally:
        await worker.stop()
    assert any(wait == 20 and 8 * 100 < min_bytes < 8 * 1000 for min_bytes, wait in paced), paced


async def test_exactly_once_transactions_span_batches_under_load(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    settings = created_topics.model_copy(update={"delivery": "exactly-once", "max_batch_size": 8})
    worker = Worker(settings)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(400, seed=3)
    try:
        async with StreamerClient(client_settings) as client:
            # All published before the worker starts: a backlog. (Sent while it runs, they may arrive no faster
            # than it commits: then each batch is a window of its own, rightly.)
            futures = [await client.submit(x, model="tiny-mlp", key=f"k{i % 8}") for i, x in enumerate(inputs)]
            await worker.start()
            results = list(await asyncio.gather(*futures))
        batches = worker.stats.batches
    finally:
        await worker.stop()
    assert sorted(r.id for r in results) == sorted({r.id for r in results}) and len(results) == 400
    sample = worker.metrics.registry.get_sample_value
    labels = {"model": "tiny-mlp", "stage": ""}
    committed = sample("streamer_transactions_total", {**labels, "outcome": "committed"})
    # One transaction per batch would be `batches`; windows take several batches each.
    assert committed is not None and 0 < committed < batches, (committed, batches)
    # Each commit timed in each phase and its items counted once (no transaction failed here).
    assert sample("streamer_transactions_total", {**labels, "outcome": "failed"}) == 0
    for phase in ("open", "deliver", "end"):
        assert sample("streamer_transaction_seconds_count", {**labels, "phase": phase}) == committed
        assert sample("streamer_transaction_seconds_sum", {**labels, "phase": phase}) > 0
    assert sample("streamer_transaction_items_count", labels) == committed
    assert sample("streamer_transaction_items_sum", labels) == 400


async def test_exactly_once_starts_its_producers_on_assignment(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """The worker's transactional producer starts when partitions are first assigned (their takeover needs it),
    not on the first batch; then requests of one key, one after another (a commit each, as nothing more is at
    hand): every result once, in order."""
    settings = created_topics.model_copy(update={"delivery": "exactly-once"})
    worker = Worker(settings)
    await worker.start()
    inputs = load_model("tiny-mlp", "cpu").example_inputs(200, seed=4)
    arrived: list[int] = []
    try:
        assert worker._txn is not None
        for _ in range(200):  # the group forms; no request has been sent
            if worker._consumer.assignment() and worker._txn._producer is not None:
                break
            await asyncio.sleep(0.05)
        assert len(worker._consumer.assignment()) == 4
        assert worker._txn._producer is not None
        async with StreamerClient(client_settings) as client:
            futures = []
            for i, x in enumerate(inputs):
                fut = await client.submit(x, model="tiny-mlp", key="one-key")
                fut.add_done_callback(lambda _f, i=i: arrived.append(i))
                futures.append(fut)
                await asyncio.sleep(0.002)
            results = list(await asyncio.gather(*futures))
    finally:
        await worker.stop()
    assert len({r.id for r in results}) == 200 and all(r.status == "ok" for r in results)
    assert arrived == sorted(arrived)  # one key: results in the order of the requests


async def test_a_transaction_goes_on_without_a_topic_deleted_under_it(created_topics: WorkerSettings) -> None:
    """A client's reply topic deleted after the worker checked the route, while its producer's metadata still has
    it: aiokafka asks to add its partition to the transaction every 100 ms for ever, and the broker adds none of
    the transaction's other partitions while one is unknown, so nothing of the transaction would be written and
    its commit would never end. The partition is dropped once the cluster says the topic is gone: the records
    for it fail (the worker's transaction then aborts, and is redone with dead letters for them); here, where
    nothing aborts it, the rest of the transaction commits."""
    ws = created_topics
    gone = f"{ws.results_topic}.reply.closed-client"
    await kafka.ensure_topics(ws, [kafka.TopicSpec(gone, partitions=1)])
    producer = kafka.producer(ws, transactional_id=f"{ws.group_id}.gone-topic")
    drop_gone_partitions(producer, ReplyRoutes(ws))
    await producer.start()
    try:
        await producer.begin_transaction()
        await (await producer.send(gone, b"before", partition=0))  # the producer knows the topic
        await producer.commit_transaction()
        await kafka.delete_topics(ws, [gone])
        await producer.begin_transaction()
        lost = await producer.send(gone, b"lost", partition=0)
        kept = await producer.send(ws.results_topic, b"kept", partition=0)
        with pytest.raises(UnknownTopicOrPartitionError):
            await asyncio.wait_for(lost, 30)
        await asyncio.wait_for(producer.commit_transaction(), 30)
        await kept
    finally:
        await asyncio.wait_for(producer.stop(), 30)  # without the drop, stopping waits for ever on the records
    records = await drain(ws, ws.results_topic, idle_s=1.0, isolation_level="read_committed")
    assert [r.value for r in records] == [b"kept"]
