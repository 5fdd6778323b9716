"""Fault suite, workers: SIGKILL mid-batch under steady keyed load (real processes, real broker)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings
from streamer.models import load_model

from ..helpers import Processes
from .load import Load, drain, figures

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_sigkill_one_of_three_workers_five_times(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    workers = [processes.worker(ws, "--model", "tests.fault_models:slow_tiny", torch_threads=1) for _ in range(3)]
    await processes.wait_group(ws, ws.group_id, 3)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(3000, seed=31)
    kills: list[float] = []
    async with StreamerClient(client_settings) as client:
        load = Load(client, "slow-tiny", inputs, keys=24, rate=150)
        publishing = asyncio.create_task(load.run())
        for n in range(5):
            await asyncio.sleep(2.5)
            victim = workers[n % 3]
            victim.signal(signal.SIGKILL)  # the model sleeps 40 ms per batch: this lands mid-batch
            kills.append(time.monotonic())
            await asyncio.to_thread(victim.proc.wait)
            workers[n % 3] = processes.worker(ws, "--model", "tests.fault_models:slow_tiny", torch_threads=1)
        await publishing
        results = await load.results()
        raw = await drain(client_settings, client.reply_to.topic)
    fig = figures(load, results, raw, kills)
    print("\n" + fig.line("SIGKILL 1 of 3 workers x5"))
    assert fig.lost == 0
    assert fig.duplicates_after_dedup == 0
    assert fig.order_violations == 0
    assert all(not isinstance(r, BaseException) and r.status == "ok" for r in results)
