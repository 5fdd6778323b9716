"""The client library: await, submit, stream, timeouts, duplicates, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from producers import StreamerClient, request_headers
from schemas import Codec, InferenceResult
from streamer import ClientSettings, FatalError, InferenceError, InferenceTimeout, WorkerSettings, kafka
from streamer.models import load_model

from .helpers import Processes, read_topic

pytestmark = [pytest.mark.kafka]


async def test_timeout_raises_and_late_reply_is_dropped(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    async with StreamerClient(client_settings) as client:
        with pytest.raises(InferenceTimeout, match=r"within 0\.5 s"):
            await client.infer([0.0] * 16, model="tiny-mlp", timeout_s=0.5, request_id="late-1")
        assert client.pending == 0
        # A reply that arrives after the caller gave up is dropped, not delivered to anyone.
        producer = kafka.producer(client_settings)
        await producer.start()
        late = InferenceResult(id="late-1", model="tiny-mlp", status="ok", outputs=[1.0])
        await producer.send_and_wait(client.reply_to.topic, Codec().encode_result(late))
        await producer.stop()
        for _ in range(50):
            if client.duplicates_dropped:
                break
            await asyncio.sleep(0.1)
        assert client.duplicates_dropped == 1


@pytest.mark.slow
async def test_duplicates_are_dropped_by_request_id(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    """Two worker groups on one topic answer every request twice; the caller sees each result once."""
    ws = created_topics
    processes.worker(ws)
    processes.worker(ws, group_id=ws.group_id + "-twin")
    await kafka.wait_for_group(ws, ws.group_id, 1, timeout_s=120)
    await kafka.wait_for_group(ws, ws.group_id + "-twin", 1, timeout_s=120)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(100, seed=9)
    async with StreamerClient(client_settings) as client:
        results = [r async for r in client.stream(inputs, model="tiny-mlp", key=lambda x: "dup")]
        for _ in range(100):
            if client.duplicates_dropped >= 100:
                break
            await asyncio.sleep(0.1)
        assert client.duplicates_dropped == 100
    assert len(results) == 100
    assert len({r.id for r in results}) == 100


@pytest.mark.slow
async def test_many_concurrent_infer_submit_and_stream(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    processes.worker(ws)
    model = load_model("tiny-mlp", "cpu")
    inputs = model.example_inputs(1000, seed=11)
    expected = model.run(inputs)
    async with StreamerClient(client_settings.model_copy(update={"max_in_flight": 200})) as client:
        results = await asyncio.gather(*(client.infer(x, model="tiny-mlp", key=str(i % 7))
                                         for i, x in enumerate(inputs)))
        for r, y in zip(results, expected, strict=True):
            np.testing.assert_allclose(r.outputs, y, rtol=1e-5, atol=1e-6)
        fut = await client.submit(inputs[0], model="tiny-mlp")
        assert isinstance(fut, asyncio.Future)
        np.testing.assert_allclose((await fut).outputs, expected[0], rtol=1e-5, atol=1e-6)
        streamed = [r async for r in client.stream(inputs[:300], model="tiny-mlp")]
        assert len({r.id for r in streamed}) == 300
        with pytest.raises(InferenceError, match="bad_input"):
            await client.infer([1.0, 2.0], model="tiny-mlp")
        bad = await client.infer([1.0, 2.0], model="tiny-mlp", check=False)
        assert bad.status == "error"
        assert client.pending == 0


async def test_shared_reply_topic_needs_an_owned_partition(client_settings: ClientSettings) -> None:
    with pytest.raises(ValueError, match="reply_partition"):
        StreamerClient(client_settings.model_copy(update={"reply_topic": "shared"}))


async def test_reader_failure_fails_every_waiter(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    async with StreamerClient(client_settings) as client:
        fut = await client.submit([0.0] * 16, model="tiny-mlp", timeout_s=30)
        await client._consumer.stop()  # the reply consumer dies under the reader task
        with pytest.raises(FatalError, match="reply reader failed"):
            await fut
        with pytest.raises(FatalError, match="reply reader has stopped"):
            await client.submit([0.0] * 16, model="tiny-mlp")


async def _read_all(settings: ClientSettings, topic: str, n: int) -> list[Any]:
    """The ``n`` records of ``topic``, and no more arrive."""
    records = await read_topic(settings, topic, n)
    await asyncio.sleep(0.5)
    with pytest.raises(AssertionError, match=f"got {len(records)} records"):
        await read_topic(settings, topic, len(records) + 1, timeout_s=1)
    return records


async def test_streamed_requests_on_the_wire_window_and_timeout(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """What ``stream`` (the client's fast path) writes is what the models write, with the headers, keys and
    partitions a worker in any language expects; it keeps to ``max_in_flight``; with no worker, it ends in
    :class:`InferenceTimeout`, and gives up every request it left waiting."""
    inputs = [np.full(16, i, dtype=np.float32) for i in range(120)]
    settings = client_settings.model_copy(update={"max_in_flight": 50})
    codec = Codec()
    async with StreamerClient(settings) as client:
        stream = client.stream(inputs, model="tiny-mlp", key=lambda x: f"k{int(x[0]) % 7}", timeout_s=2,
                               metadata={"tenant": "t1"})
        with pytest.raises(InferenceTimeout, match=r"within 2 s"):
            async for _ in stream:
                pass
        assert client.pending == 0
        records = await _read_all(client_settings, client_settings.request_topic, 50)
        assert len(records) == 50  # the window: no more were sent while 50 waited
        partitioner = kafka.producer(client_settings)
        await partitioner.start()
        try:
            for r in records:
                req = codec.decode_request(r.value)
                assert (req.model, req.reply_to, req.metadata) == ("tiny-mlp", client.reply_to, {"tenant": "t1"})
                assert req.key == f"k{int(req.inputs[0]) % 7}" and r.key == req.key.encode()
                np.testing.assert_array_equal(req.inputs, inputs[int(req.inputs[0])])
                assert req.deadline_ms == req.created_ms + 2000
                assert list(r.headers) == request_headers(req)
                assert r.value == codec.encode_request(req)  # byte for byte what the models write
                # the partition a producer's send picks for the key (the record it writes is read by no one)
                assert r.partition == (await partitioner.send_and_wait(r.topic, b"", key=r.key)).partition
        finally:
            await partitioner.stop()
        assert len({codec.decode_request(r.value).id for r in records}) == 50


async def test_a_cancelled_submit_frees_its_place_in_the_window(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    async with StreamerClient(client_settings.model_copy(update={"max_in_flight": 1})) as client:
        first = await client.submit([0.0] * 16, model="tiny-mlp", timeout_s=30)
        second = asyncio.create_task(client.submit([0.0] * 16, model="tiny-mlp", timeout_s=30))
        await asyncio.sleep(0.3)
        assert not second.done()  # the window is full
        first.cancel()
        fut = await asyncio.wait_for(second, 5)
        assert client.pending == 1
        fut.cancel()
        await asyncio.sleep(0)
        assert client.pending == 0


async def test_requests_sent_one_at_a_time_all_arrive(
    created_topics: WorkerSettings, client_settings: ClientSettings
) -> None:
    """Requests trickling in while the producer's sender takes record batches: each record goes into a batch the
    sender has not taken yet (one it took has its sequence numbers: a record added after would break the
    idempotent producer's sequence, OutOfOrderSequenceNumber, as an early version of the fast path did)."""
    async with StreamerClient(client_settings) as client:
        futures = []
        for i in range(600):
            futures.append(await client.submit([float(i)] * 16, model="tiny-mlp", key=f"k{i % 5}", timeout_s=60))
            if i % 3 == 0:
                await asyncio.sleep(0)  # let the sender run between some of them
            elif i % 3 == 1:
                await asyncio.sleep(0.0005)
        records = await _read_all(client_settings, client_settings.request_topic, 600)
        assert len(records) == 600
        assert not [f for f in futures if f.done()]  # none failed (no worker: none answered either)
        for f in futures:
            f.cancel()


async def test_records_for_other_partitions_go_on_while_one_partition_cannot_send() -> None:
    """A partition whose record batches cannot leave (its leader died, and the cluster has not moved it yet) holds
    up to ``QUEUED_BATCHES`` full batches before a record for it waits; records for other partitions never wait
    for it. (``producer.send`` waits at the first full batch: a caller publishing in order would stop for every
    partition.) The producer is never started, so nothing drains: what a dead leader looks like from here."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    from streamer._produce import QUEUED_BATCHES

    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", max_batch_size=1024)
    stuck, other = TopicPartition("t", 0), TopicPartition("t", 1)
    queued = producer._message_accumulator._batches
    appended = 0
    while True:  # append to the stuck partition until a record has to wait
        waiting = asyncio.ensure_future(kafka.append_record(producer, stuck, None, b"x" * 200, []))
        for _ in range(3):
            await asyncio.sleep(0)
        if not waiting.done():
            break
        appended += 1
        assert appended < 10_000
    assert len(queued[stuck]) == QUEUED_BATCHES and appended > QUEUED_BATCHES, (len(queued[stuck]), appended)
    assert await asyncio.wait_for(kafka.append_record(producer, other, None, b"x" * 200, []), 1) is not None
    await asyncio.sleep(0.2)
    assert not waiting.done()  # bounded: the next record for the stuck partition waits for the sender
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    kafka.fail_pending(producer, "t", FatalError("the test is over"))
    producer._closed = True  # never started: nothing to stop
