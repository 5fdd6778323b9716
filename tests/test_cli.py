"""The CLI as a user runs it: broker, topics create, publish, results."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamer import WorkerSettings, kafka

from .helpers import Processes, settings_env

pytestmark = [pytest.mark.kafka]

needs_java = pytest.mark.skipif(not shutil.which("java"), reason="needs Java for the Apache Kafka broker")


def _streamer(*args: str, env: dict[str, str], stdin: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamer", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout, check=False)


async def test_topics_create_publish_and_results(worker_settings: WorkerSettings, processes: Processes) -> None:
    ws = worker_settings
    env = settings_env(ws)
    out = await asyncio.to_thread(_streamer, "topics", "create", "--partitions", "3", env=env)
    assert out.returncode == 0, out.stderr
    assert f"{ws.request_topic}\t3\tcreated" in out.stdout
    again = await asyncio.to_thread(_streamer, "topics", "create", env=env)
    assert f"{ws.request_topic}\t-\texists" in again.stdout

    lines = [json.dumps({"inputs": [float(i)] * 16, "key": f"k{i}", "id": f"cli-{i}"}) for i in range(5)]
    lines.append(json.dumps([0.5] * 16))  # bare inputs
    pub = await asyncio.to_thread(_streamer, "publish", "--model", "tiny-mlp", env=env, stdin="\n".join(lines))
    assert pub.returncode == 0, pub.stderr
    ids = pub.stdout.split()
    assert ids[:5] == [f"cli-{i}" for i in range(5)] and len(ids) == 6
    assert "published 6 requests" in pub.stderr

    processes.worker(ws)
    res = await asyncio.to_thread(_streamer, "results", "--from-beginning", "--count", "6", "--timeout-s", "90",
                                  env=env)
    assert res.returncode == 0, res.stderr
    results = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(r["id"] for r in results) == sorted(ids)
    assert all(r["status"] == "ok" and len(r["outputs"]) == 8 for r in results)

    bad = await asyncio.to_thread(_streamer, "publish", env=env, stdin='{"inputs": [1]}\n')
    assert bad.returncode == 2 and "no model" in bad.stderr


@needs_java
def test_broker_command_prints_address_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "kafka-data"
    for round_ in range(2):  # the second start reuses the data directory
        proc = subprocess.Popen([sys.executable, "-m", "streamer", "broker", "--data-dir", str(data)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "bootstrap servers: 127.0.0.1:" in line, proc.stderr.read() if proc.stderr else ""
            bootstrap = line.rsplit(" ", 1)[1].strip()
            settings = WorkerSettings(bootstrap_servers=bootstrap)
            if round_ == 0:
                asyncio.run(kafka.ensure_topics(settings, [kafka.TopicSpec("kept-across-restarts", 2)]))
            else:
                created = asyncio.run(kafka.ensure_topics(settings, [kafka.TopicSpec("kept-across-restarts", 2)]))
                assert created == [], "--data-dir should keep topics across restarts"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    assert (data / "log" / "meta.properties").exists()


def test_broker_without_java_says_what_to_install(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "STREAMER_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "streamer", "broker"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60, check=False)
    assert out.returncode == 2
    assert "java was not found" in out.stderr and "install" in out.stderr


@pytest.mark.kafka
async def test_publish_into_a_closed_pipe_stops_quietly(worker_settings: WorkerSettings) -> None:
    """`streamer publish ... | head -1`: the reader goes away after one id; publish stops without a traceback,
    with the status of a process ended by SIGPIPE (141)."""
    env = {**os.environ, **settings_env(worker_settings)}
    await kafka.ensure_topics(worker_settings, [kafka.TopicSpec(worker_settings.request_topic, 1)])
    lines = "".join(json.dumps([float(i)] * 16) + "\n" for i in range(20_000))
    script = f"{sys.executable} -m streamer publish --model tiny-mlp | head -1; echo \"status ${{PIPESTATUS[0]}}\" >&2"
    done = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], input=lines, capture_output=True,
                                   text=True, env=env, timeout=120, check=False)
    assert len(done.stdout.split()) == 1  # head printed the first id
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "status 141", done.stderr


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="the demo's own broker is Apache Kafka: needs Java")
async def test_demo_shows_saturation_throughput_and_steady_latency() -> None:
    """The demo's two figures, each saying what it means, and every result checked against the model; on a broker
    of its own, as `make demo` runs it."""
    out = await asyncio.to_thread(_streamer, "demo", "--workers", "1", "--requests", "300", "--rate", "150",
                                  "--rate-seconds", "1", "--partitions", "2", "--no-progress",
                                  env={"COLUMNS": "200"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stderr.split())
    assert "starting Apache Kafka" in text and text.endswith("broker stopped")
    assert "saturation: 300 requests at once through 1 workers" in text and "requests/s, mean batch" in text
    assert "steady 150/s for 1 s (150 requests; --rate to choose): latency p50" in text
    assert "all 300 results match the model run directly, and all 150 of the steady run" in text
