"""One batch's stats feed both the worker's log totals and its Prometheus series, counted once per batch, without
a broker: a real runner on a batch of good and undecodable records, then what each side reads."""

from __future__ import annotations

import time

import torch
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers._batch import Batch, Route, Run, RunStats
from consumers._inference import BatchRunner
from consumers._telemetry import Telemetry
from schemas import Codec, RoutingHeaders
from streamer.config import WorkerSettings
from streamer.metrics import WorkerMetrics
from streamer.models import TinyMLP

from .test_runner import _batch


def _value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": "tiny-mlp", "stage": "", **labels})
    return 0.0 if value is None else value


async def test_a_batch_is_counted_once_and_alike_in_the_logs_and_in_prometheus() -> None:
    bad = [ConsumerRecord("requests", 0, 100 + i, 0, 0, None, b"\xc1 not msgpack", None, 0, 14,
                          RoutingHeaders(f"bad{i}", None).build()) for i in range(2)]
    batch = Batch([Run(TopicPartition("requests", 0), 0, time.monotonic(), [*_batch(6).records, *bad])])
    runner = BatchRunner(TinyMLP(torch.device("cpu")), Codec(), "w", "results", Route("tiny-mlp"))
    metrics = WorkerMetrics("tiny-mlp")
    telemetry = Telemetry(WorkerSettings(bootstrap_servers="unused:9092"), metrics)
    totals = RunStats()
    try:
        runner.check(batch)
        await runner.run(batch)
        runner.finish(batch)
    finally:
        runner.close()
    stats = batch.count()
    totals.add(stats)
    telemetry.fetched(len(batch))
    telemetry.published(batch, stats)

    assert (totals.batches, totals.items, totals.ok, totals.errors, totals.dead_letters) == (1, 8, 6, 2, 2)
    assert _value(metrics, "streamer_requests_total") == 8
    assert _value(metrics, "streamer_results_total", status="ok") == totals.ok
    assert _value(metrics, "streamer_results_total", status="error") == totals.errors
    assert _value(metrics, "streamer_dead_letters_total", code="decode_error") == totals.dead_letters
    # Batch-level figures once per batch: the size of what reached the model, one model time.
    assert _value(metrics, "streamer_batch_size_count") == 1
    assert _value(metrics, "streamer_batch_size_sum") == 6
    assert _value(metrics, "streamer_inference_seconds_count") == 1
    assert abs(_value(metrics, "streamer_inference_seconds_sum") * 1000 - totals.inference_ms_total) < 1e-6
    # Queue waits and latencies per item that ran, observed with counts (not one call per item).
    assert _value(metrics, "streamer_queue_wait_seconds_count") == 6
    assert _value(metrics, "streamer_end_to_end_latency_seconds_count") == 6


def test_the_log_line_and_the_capacity_rates_come_from_the_totals() -> None:
    prev = RunStats()
    now = RunStats(batches=4, items=120, ok=118, errors=2, dead_letters=2, queue_ms_total=240.0,
                   inference_ms_total=400.0, busy_ms_total=600.0)
    assert now.since(prev, 10.0) == ("12.0 items/s, mean batch 30.0, queue wait 2.0 ms, model 100.0 ms per batch, "
                                     "ok 118, errors 2, expired 0, dead letters 2")
    assert now.since(now, 10.0) is None
    assert now.rates_since(prev, 16) == (300.0, 200.0)  # 120 items in 0.4 s of model time, 0.6 s busy
    assert now.rates_since(prev, 32) is None  # batches of 30 on average: light load says nothing
