"""Prometheus metrics scraped from a real worker process during a real run; JSON logs."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.broker import free_port
from streamer.metrics import WorkerMetrics, observe_many, scaling_estimate
from streamer.models import load_model

from .helpers import Processes


def test_scaling_estimate() -> None:
    assert scaling_estimate(300, 0, 100, 60) == 3
    assert scaling_estimate(300, 6000, 100, 60) == 4  # and drain 6,000 in a minute
    assert scaling_estimate(-5, 0, 100, 60) == 0
    assert scaling_estimate(100, 0, 0, 60) == 0  # no capacity figure yet: no opinion


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model", "stage"))))] = s.value
    return out


def _get(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _lags(samples: dict[Any, float]) -> dict[str, float]:
    return {dict(k[1])["partition"]: v for k, v in samples.items() if k[0] == "streamer_consumer_lag"}


@pytest.mark.kafka
@pytest.mark.slow
async def test_metrics_move_during_a_run_and_lag_returns_to_zero(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    port = free_port()
    # A slowed model (100 ms per batch of up to 32: ~4 s for the burst) so that the burst shows as lag.
    [worker] = await processes.group(ws, 1, "--model", "tests.fault_models:slow_tiny", "--metrics-port", str(port),
                                     stats_interval_s=1, log_format="json", FAULT_DELAY_MS=100)
    before = _scrape(port)
    assert _get(before, "streamer_requests_total") == 0
    assert _get(before, "streamer_rebalances_total") >= 1

    n = 1200
    inputs = load_model("tiny-mlp", "cpu").example_inputs(n, seed=21)
    peak_lag = 0.0
    async with StreamerClient(client_settings) as client:
        task = asyncio.create_task(_collect(client, inputs))
        while not task.done():
            peak_lag = max(peak_lag, sum(_lags(_scrape(port)).values()))
            await asyncio.sleep(0.25)
        results = await task
        # One request the worker cannot decode: an error result is impossible (no id), a dead letter is not.
        producer = kafka.producer(ws)
        await producer.start()
        await producer.send_and_wait(ws.request_topic, b"\xc1 not msgpack", key=b"bad")
        await producer.stop()
    assert len(results) == n and all(r.status == "ok" for r in results)

    for _ in range(150):
        after = _scrape(port)
        if (_get(after, "streamer_dead_letters_total", code="decode_error") == 1
                and sum(_lags(after).values()) == 0 and _get(after, "streamer_topic_lag") == 0):
            break
        await asyncio.sleep(0.2)
    assert _get(after, "streamer_requests_total") == n + 1
    assert _get(after, "streamer_results_total", status="ok") == n
    assert _get(after, "streamer_dead_letters_total", code="decode_error") == 1
    assert _get(after, "streamer_batch_size_count") > 0
    assert _get(after, "streamer_batch_size_sum") == n
    assert _get(after, "streamer_batch_size_count") < n  # batched, not one by one
    assert _get(after, "streamer_inference_seconds_count") == _get(after, "streamer_batch_size_count")
    assert _get(after, "streamer_queue_wait_seconds_count") == n
    assert _get(after, "streamer_end_to_end_latency_seconds_count") == n
    assert _get(after, "streamer_end_to_end_latency_seconds_sum") > 0
    assert peak_lag > 0, "the burst never showed as lag"
    assert set(_lags(after)) == {"0", "1", "2", "3"}
    assert sum(_lags(after).values()) == 0
    assert _get(after, "streamer_topic_lag") == 0
    assert _get(after, "streamer_capacity_items_per_second") > 0
    assert ("streamer_workers_needed", ()) in after

    # --log-format json: every line the worker wrote is a JSON object.
    assert processes.stop(worker) == 0
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.strip()]
    assert any("serving" in rec["message"] for rec in lines)
    assert all({"ts", "level", "logger", "message", "pid"} <= set(rec) for rec in lines)


async def _collect(client: StreamerClient, inputs: list[Any]) -> list[Any]:
    return [r async for r in client.stream(inputs, model="slow-tiny", key=lambda x: str(round(x[0], 2)))]


@pytest.mark.parametrize("amount", [0.0, 0.0007, 0.003, 0.2, 7.0, 1000.0])
def test_observe_many_records_what_as_many_observations_would(amount: float) -> None:
    """The items of a batch share their queue wait: one step for all of them, the same exposition."""
    one_by_one, at_once = WorkerMetrics("m"), WorkerMetrics("m")
    for _ in range(5):
        one_by_one.labels(one_by_one.queue_wait).observe(amount)
    observe_many(at_once.labels(at_once.queue_wait), amount, 5)
    observe_many(at_once.labels(at_once.queue_wait), amount, 0)

    def samples(m: WorkerMetrics) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for fam in m.registry.collect() if fam.name == "streamer_queue_wait_seconds"
                for s in fam.samples if not s.name.endswith("_created")]

    assert samples(at_once) == samples(one_by_one)
