"""Exactly-once mode: no duplicate committed results, even with crashed and frozen (zombie) workers."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings
from streamer.models import load_model

from ..helpers import Processes
from .load import Load, drain, figures, report, scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EOS = {"delivery": "exactly-once", "torch_threads": 1}


async def test_exactly_once_under_sigkill(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    workers = [processes.worker(ws, "--model", "tests.fault_models:slow_tiny", **EOS) for _ in range(2)]
    await processes.wait_group(ws, ws.group_id, 2)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(1500), seed=51)
    kills: list[float] = []
    async with StreamerClient(client_settings) as client:
        load = Load(client, "slow-tiny", inputs, keys=16, rate=120)
        publishing = asyncio.create_task(load.run())
        for n in range(2):
            await asyncio.sleep(3)
            workers[n].signal(signal.SIGKILL)
            kills.append(time.monotonic())
            await asyncio.to_thread(workers[n].proc.wait)
            workers[n] = processes.worker(ws, "--model", "tests.fault_models:slow_tiny", **EOS)
        await publishing
        results = await load.results()
        raw = await drain(client_settings, client.reply_to.topic, isolation_level="read_committed")
    fig = figures(load, results, raw, kills)
    report(fig.line("exactly-once: SIGKILL 1 of 2 workers x2 (read_committed)"), fig, mode="exactly-once")
    assert fig.lost == 0 and fig.duplicates_raw == 0 and fig.order_violations == 0


async def test_exactly_once_hides_a_zombies_late_writes(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics.model_copy(update={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000})
    frozen = processes.worker(ws, "--model", "tests.fault_models:slow_tiny", **EOS)
    processes.worker(ws, "--model", "tests.fault_models:slow_tiny", **EOS)
    await processes.wait_group(ws, ws.group_id, 2)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(1500), seed=53)
    async with StreamerClient(client_settings) as client:
        load = Load(client, "slow-tiny", inputs, keys=16, rate=120)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await asyncio.sleep(9)  # past the session timeout: its partitions and transactional ids move on
        frozen.signal(signal.SIGCONT)
        await publishing
        results = await load.results()
        await asyncio.sleep(3)  # give the zombie time to try its late writes
        raw = await drain(client_settings, client.reply_to.topic, isolation_level="read_committed")
        uncommitted = await drain(client_settings, client.reply_to.topic)
    fig = figures(load, results, raw, [stopped_at])
    fig.extra["records incl. aborted"] = len(uncommitted)
    report(fig.line("exactly-once: SIGSTOP past the session timeout, then SIGCONT (read_committed)"), fig,
           mode="exactly-once")
    assert fig.lost == 0 and fig.duplicates_raw == 0 and fig.order_violations == 0
    assert frozen.proc.poll() is None


async def test_exactly_once_pipeline_writes_intermediate_records_in_the_transaction(
    tmp_path: Path, worker_settings: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    from streamer import kafka
    from streamer.pipeline import load_pipeline

    from ..test_pipelines import TINY

    name = f"eos-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "spec.toml"
    path.write_text(TINY.format(name=name, delay_ms=20))
    spec = load_pipeline(path)
    await kafka.ensure_topics(worker_settings, [
        *(kafka.TopicSpec(spec.input_topic(s.name), 4) for s in spec.order),
        *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order),
    ])
    processes.stage(worker_settings, path, "double", delivery="exactly-once")
    victim = processes.stage(worker_settings, path, "total", delivery="exactly-once")
    processes.stage(worker_settings, path, "total", delivery="exactly-once")
    await processes.wait_group(worker_settings, spec.group_id("total"), 2)
    settings = client_settings.model_copy(update={"request_topic": spec.input_topic("double")})
    inputs = [[float(i), 0.0, 0.0, 0.0] for i in range(scaled(600))]
    async with StreamerClient(settings) as client:
        load = Load(client, name, inputs, keys=8, rate=150)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(2)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        await publishing
        results = await load.results()
        raw = await drain(settings, client.reply_to.topic, isolation_level="read_committed")
    intermediate = await drain(worker_settings, spec.input_topic("total"), isolation_level="read_committed")
    fig = figures(load, results, raw, [killed])
    fig.extra["intermediate records"] = len(intermediate)
    report(fig.line("exactly-once pipeline: SIGKILL a stage-2 process (read_committed)"), fig, mode="exactly-once")
    assert fig.lost == 0 and fig.duplicates_raw == 0 and fig.order_violations == 0
    assert len(intermediate) == len(inputs), "each intermediate record committed exactly once"
    assert [r.outputs for r in results if not isinstance(r, BaseException)] == [2.0 * i for i in range(len(inputs))]
