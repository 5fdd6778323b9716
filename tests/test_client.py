"""The client library: await, submit, stream, timeouts, duplicates, concurrency."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from producers import StreamerClient
from schemas import Codec, InferenceResult
from streamer import ClientSettings, FatalError, InferenceError, InferenceTimeout, WorkerSettings, kafka
from streamer.models import load_model

from .helpers import Processes

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
