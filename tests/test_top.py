"""``streamer top``: the arithmetic of its figures, and the live view in a real terminal (tmux) against a running
group under load."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.app.top import _ranges, histogram_quantile, parse_metrics
from streamer.metrics import WorkerMetrics
from streamer.models import load_model

from .helpers import Processes, settings_env


def test_histogram_quantile_interpolates_within_buckets() -> None:
    buckets = ((0.01, 0.0), (0.1, 50.0), (1.0, 100.0), (math.inf, 100.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 0.98)
    assert histogram_quantile(0.99, ((0.5, 1.0), (math.inf, 10.0))) == 0.5  # past the last bound: that bound
    assert histogram_quantile(0.5, ((1.0, 0.0), (math.inf, 0.0))) is None
    assert histogram_quantile(0.5, ()) is None


def test_parse_metrics_reads_what_a_worker_exports() -> None:
    """The names top reads are the ones WorkerMetrics exports (a renamed metric would show "-" silently)."""
    from prometheus_client import generate_latest

    m = WorkerMetrics("tiny-mlp")
    m.labels(m.results, "ok").inc(7)
    m.labels(m.results, "error").inc(1)
    for size in (4, 8):
        m.labels(m.batch_size).observe(size)
    for seconds in (0.003, 0.004, 0.2):
        m.labels(m.latency).observe(seconds)
    got = parse_metrics(generate_latest(m.registry).decode())
    assert (got.results, got.batches, got.batch_items) == (8.0, 2.0, 12.0)
    assert got.latency[-1] == (math.inf, 3.0)
    assert dict(got.latency)[0.005] == 2.0


def test_partition_ranges() -> None:
    assert _ranges(["t-0", "t-1", "t-2", "t-5", "t-7", "t-8"]) == "0-2,5,7-8"
    assert _ranges(["a.b-3"]) == "3"
    assert _ranges([]) == "-"


def _tmux(*args: str) -> str:
    """One tmux command (quick: the tmux server answers at once), outside any tmux the tests run in."""
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "TMUX"}).stdout


def _member_rows(screen: str, version: str) -> list[list[str]]:
    """The cells of the members table's rows."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in screen.splitlines()
            if "tiny-mlp" in line and version in line]


def _capture(session: str) -> str:
    screen = _tmux("capture-pane", "-p", "-t", session)
    Path(os.environ.get("TOP_SCREEN", os.devnull)).write_text(screen)
    return screen


@pytest.mark.kafka
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
async def test_top_shows_a_live_group_under_load(worker_settings: WorkerSettings, client_settings: ClientSettings,
                                                 processes: Processes, tmp_path: Path) -> None:
    ws = worker_settings
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 4), kafka.TopicSpec(ws.results_topic, 2),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1)])
    await processes.group(ws, 2, torch_threads=1, metrics_port=0, client_id="w")
    version = str(load_model("tiny-mlp", "cpu").version)

    script = tmp_path / "top.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in settings_env(ws).items())
    script.write_text(f"{exports}{shlex.quote(sys.executable)} -m streamer top {ws.group_id} --interval 1\n"
                      "echo top-exit=$?\nsleep 60\n")
    session = f"top-{uuid.uuid4().hex[:8]}"
    _tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50", "bash", str(script))
    try:
        inputs = load_model("tiny-mlp", "cpu").example_inputs(400, seed=5)
        seen = asyncio.Event()

        async def load() -> None:  # ~400 requests/s, keyed over every partition, until top has shown it
            async with StreamerClient(client_settings) as client:
                while not seen.is_set():
                    for start in range(0, len(inputs), 40):
                        chunk = inputs[start:start + 40]
                        async for _ in client.stream(chunk, model="tiny-mlp",
                                                     key=lambda x: str(int(abs(x[0]) * 1e6) % 32)):
                            pass
                        await asyncio.sleep(0.1)

        loading = asyncio.create_task(load())
        screen, rows = "", []
        for _ in range(40):  # until both members show results/s, batch and latency from their metrics
            await asyncio.sleep(1)
            screen = _capture(session)
            rows = _member_rows(screen, version)
            if len(rows) == 2 and all("-" not in row[7:11] for row in rows):
                break
        seen.set()
        await loading
        assert f"group {ws.group_id}: Stable" in screen, screen
        assert "2 members" in screen, screen
        assert len(rows) == 2, screen
        # Each member: two of the four partitions, results/s, mean batch, p50 and p99 (numbers, not "-").
        for cells in rows:
            assert cells[5].startswith("2: "), (cells, screen)
            results_per_s, batch, p50, p99 = cells[7:11]
            assert float(results_per_s.replace(",", "")) > 0, (cells, screen)
            assert float(batch) >= 1 and 0 < float(p50) <= float(p99), (cells, screen)
        for p in range(4):
            assert f"{ws.request_topic}-{p}" in screen, screen

        # After the load: lag drains to 0 and shows so.
        for _ in range(30):
            await asyncio.sleep(1)
            screen = _capture(session)
            if re.search(r"lag 0 \(", screen):
                break
        assert re.search(r"lag 0 \(", screen), screen

        _tmux("send-keys", "-t", session, "C-c")
        for _ in range(20):
            await asyncio.sleep(0.5)
            screen = _capture(session)
            if "top-exit=" in screen:
                break
        assert "top-exit=0" in screen, screen
        assert "Traceback" not in screen, screen
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _tmux("kill-session", "-t", session)
