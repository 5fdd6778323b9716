"""Exactly-once pipelines: intermediate records and results committed once each.

The single-model fault cases run in both modes (test_worker_faults.py, test_broker_faults.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings

from ..helpers import Processes
from .load import Load, drain, figures, report, scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EOS = {"delivery": "exactly-once", "torch_threads": 1}


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
