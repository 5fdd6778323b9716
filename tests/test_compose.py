"""compose.yaml, proven without a Docker engine: each service's command and environment, as written
in the file, run as local processes against the test broker.

Two things differ from a compose run, as they must on one host: ``kafka:9092`` becomes the test
broker's address, and each process gets its own metrics port (in compose every container has
its own network namespace, so all of them use 9100).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.broker import free_port
from streamer.models import load_model

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
BIN = Path(sys.executable).parent


def test_compose_file_shape() -> None:
    assert set(SERVICES) == {"kafka", "topics", "worker", "tokenize", "encode", "encode-gpu", "demo", "prometheus",
                             "grafana"}
    kafka_svc = SERVICES["kafka"]
    assert kafka_svc["image"].startswith("apache/kafka:4.1")
    assert kafka_svc["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    assert "kafka-broker-api-versions.sh" in " ".join(kafka_svc["healthcheck"]["test"])
    assert SERVICES["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert SERVICES["topics"]["restart"] == "no"
    for name in ("worker", "tokenize", "encode", "encode-gpu", "demo"):
        svc = SERVICES[name]
        assert "container_name" not in svc and "ports" not in svc, f"{name} could not be scaled"
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    gpu = SERVICES["encode-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert SERVICES["demo"]["profiles"] == ["demo"]
    assert SERVICES["prometheus"]["profiles"] == ["metrics"]
    # Prometheus scrapes the port the workers serve on, for every scalable service.
    prom = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    sd = prom["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["port"] == int(SERVICES["worker"]["environment"]["STREAMER_METRICS_PORT"])
    assert set(sd["names"]) == {"worker", "tokenize", "encode", "encode-gpu"}


def test_dockerfile_is_small_non_root_and_layers_dependencies() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "-slim" in text and "download.pytorch.org/whl/cpu" in text  # CPU torch by default
    deps = text.index("pip install --extra-index-url")
    assert text.index("COPY pyproject.toml") < deps < text.index("COPY streamer ./streamer")
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_the_files_the_dockerfile_copies_build_a_wheel_with_every_package(tmp_path: Path) -> None:
    """The image installs the project as a wheel (not editable) from what its COPY lines bring in."""
    src = tmp_path / "src"
    src.mkdir()
    for what in re.findall(r"^COPY (?!--from)(\S+) ", (ROOT / "Dockerfile").read_text(), re.M):
        path = ROOT / what
        if path.is_dir():
            shutil.copytree(path, src / what, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / what)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                   check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("streamer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        if rel.split("/")[0] in {"streamer", "producers", "consumers", "schemas"}:
            assert rel in names, f"{rel} is missing from the wheel"
    assert "streamer/pipelines/minilm-2stage.toml" in names
    assert "schemas/WIRE.md" in names


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


class _Service:
    """One compose service's command and environment, run here."""

    def __init__(self, name: str, bootstrap: str, logdir: Path, index: int = 0) -> None:
        svc = SERVICES[name]
        self.name = name
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        env = {k: v.replace("kafka:9092", bootstrap) for k, v in env.items()}
        if "STREAMER_METRICS_PORT" in env:
            self.metrics_port: int | None = free_port()
            env["STREAMER_METRICS_PORT"] = str(self.metrics_port)
        else:
            self.metrics_port = None
        env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # `streamer` is the installed entry point
        self.command = [str(c) for c in svc["command"]]
        self.log = logdir / f"{name}-{index}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command, env={**os.environ, **env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} ({shlex.join(self.command)}) did not finish:\n"
                                 f"{self.log.read_text()[-3000:]}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(720)  # above the sum of its own waits, which fail with the services' logs
async def test_every_compose_service_runs_as_written(broker: Any, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    running: list[_Service] = []
    try:
        topics = _Service("topics", bootstrap, tmp_path)
        assert topics.wait(120) == 0, topics.log.read_text()
        # `docker compose up --scale worker=2`: two copies of the same service definition.
        running += [_Service("worker", bootstrap, tmp_path, i) for i in range(2)]
        running += [_Service("tokenize", bootstrap, tmp_path), _Service("encode", bootstrap, tmp_path)]
        ws = WorkerSettings(bootstrap_servers=bootstrap)

        def alive() -> None:
            for s in running:
                if s.proc.poll() is not None:
                    raise AssertionError(f"{s.name} exited {s.proc.returncode}:\n{s.log.read_text()[-3000:]}")

        deadline = time.monotonic() + 240  # four processes loading torch and MiniLM on two cores: one wait for all
        for group, members in (("streamer-workers", 2), ("minilm-2stage.tokenize", 1), ("minilm-2stage.encode", 1)):
            try:
                await kafka.wait_for_group(ws, group, members, timeout_s=max(deadline - time.monotonic(), 1),
                                           check=alive)
            except TimeoutError as exc:
                logs = "\n".join(f"--- {s.name}\n{s.log.read_text(errors='replace')[-1500:]}" for s in running)
                raise AssertionError(f"{exc}\n{logs}") from None

        # The demo client, as the demo profile runs it: 500 requests through the two workers, each checked.
        demo = _Service("demo", bootstrap, tmp_path)
        assert demo.wait(300) == 0, demo.log.read_text()[-3000:]
        assert "all 500 results match the model run directly" in demo.log.read_text()

        # The two stages answer minilm-2stage requests.
        cs = ClientSettings(bootstrap_servers=bootstrap, request_topic="minilm-2stage.requests", timeout_s=120)
        sentences = load_model("minilm-tokenize", "cpu").example_inputs(10, seed=3)
        async with StreamerClient(cs) as client:
            results = await asyncio.gather(*(client.infer(s, model="minilm-2stage") for s in sentences))
        assert all(r.status == "ok" and [t.stage for t in r.stages or []] == ["tokenize", "encode"]
                   for r in results)

        # Every worker and stage serves metrics on the port the file gives it.
        for s in running:
            assert s.metrics_port is not None
            assert "streamer_requests_total" in _metrics_text(s.metrics_port)
        # Both workers took part (the demo's keys spread over eight partitions).
        served = [line for s in running[:2] for line in s.log.read_text().splitlines() if "partitions assigned" in line]
        assert len(served) >= 2
    finally:
        codes = [s.stop() for s in running]
    assert codes == [0] * len(running)
