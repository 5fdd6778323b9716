"""Workers as real OS processes (``python -m streamer worker``) on a real broker."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from producers import StreamerClient
from schemas import InferenceResult
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.models import load_model

from .helpers import Processes

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def _publish_keyed(
    client: StreamerClient, inputs: list[Any], keys: int, pace_s: float = 0.0, *, start: int = 0,
    arrived: list[int] | None = None, model: str = "tiny-mlp",
) -> tuple[list[asyncio.Future[InferenceResult]], list[int]]:
    """Publish in index order (request ``i`` has key ``k{i % keys}``); record the order results arrive in."""
    arrived = [] if arrived is None else arrived
    futures = []
    for i, x in enumerate(inputs, start):
        fut = await client.submit(x, model=model, key=f"k{i % keys}", timeout_s=180)
        fut.add_done_callback(lambda f, i=i: arrived.append(i))
        futures.append(fut)
        if pace_s:
            await asyncio.sleep(pace_s)
    return futures, arrived


def _check_all(results: list[InferenceResult], inputs: list[Any], arrived: list[int], keys: int) -> None:
    model = load_model("tiny-mlp", "cpu")
    expected = [y for s in range(0, len(inputs), 100) for y in model.run(inputs[s:s + 100])]
    assert len({r.id for r in results}) == len(inputs)
    assert all(r.status == "ok" for r in results)
    for r, y in zip(results, expected, strict=True):
        np.testing.assert_allclose(r.outputs, y, rtol=1e-5, atol=1e-6)
    # Per-key order: for each key, results arrive in the order the requests were published.
    by_key: dict[int, list[int]] = defaultdict(list)
    for i in arrived:
        by_key[i % keys].append(i)
    for key, seq in by_key.items():
        assert seq == sorted(seq), f"key k{key}: results out of order"
    assert len(arrived) == len(inputs)


async def test_two_workers_exactly_one_result_each_in_key_order(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    await processes.group(ws, 2)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(2000, seed=1)
    async with StreamerClient(client_settings) as client:
        futures, arrived = await _publish_keyed(client, inputs, keys=40)
        results = list(await asyncio.gather(*futures))
        await asyncio.sleep(0.5)  # let any duplicate land, to prove it is dropped
        assert client.pending == 0
    _check_all(results, inputs, arrived, keys=40)
    workers = {r.worker for r in results}
    assert len(workers) == 2, f"both workers should serve requests, got {workers}"


async def test_late_joiner_takes_partitions_and_nothing_is_lost(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    await processes.group(ws, 2)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(1500, seed=2)
    async with StreamerClient(client_settings) as client:
        first, arrived = await _publish_keyed(client, inputs[:500], keys=30, pace_s=0.002)
        await processes.group(ws, 1, members=3)  # the late joiner
        second, _ = await _publish_keyed(client, inputs[500:], keys=30, pace_s=0.001, start=500, arrived=arrived)
        results = list(await asyncio.gather(*first, *second))
    assert len({r.id for r in results}) == len(inputs)
    assert all(r.status == "ok" for r in results)
    late = [r for r in results[500:] if r.worker not in {x.worker for x in results[:200]}]
    assert late, "the late joiner should have served some requests after the rebalance"
    _check_all(results, inputs, arrived, keys=30)


async def test_sigterm_finishes_in_flight_commits_and_leaves(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    # A slow model and a small buffer: when SIGTERM lands, a batch is running and the queue is full.
    slow = {"max_batch_size": 4, "max_buffered": 8, "shutdown_timeout_s": 300}
    [w] = await processes.group(ws, 1, "--model", "tests.fault_models:slow_tiny", **slow)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(300, seed=3)
    async with StreamerClient(client_settings) as client:
        futures, _ = await _publish_keyed(client, inputs, keys=10, model="slow-tiny")
        await asyncio.wait(futures[:50])
        w.signal(signal.SIGTERM)
        code = await asyncio.to_thread(w.proc.wait, 60)  # raises if the worker hangs on the full queue
        assert code == 0, processes.logs()
        assert "LeaveGroup" in processes.logs() or "stopped" in processes.logs()
        state, members = await kafka.describe_group(ws, ws.group_id)
        assert members == [], f"the worker should have left the group, state {state}"
        # What it did not finish is redelivered to the next worker: nothing is lost.
        processes.worker(ws, "--model", "tests.fault_models:slow_tiny")
        results = list(await asyncio.gather(*futures))
    assert all(r.status == "ok" for r in results)
    assert len({r.id for r in results}) == 300
