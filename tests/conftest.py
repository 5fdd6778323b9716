"""Session-scoped broker and helpers. Topics get random names; every process started is stopped.

Broker choice, in order: ``STREAMER_TEST_BOOTSTRAP``; Apache Kafka from the Maven jars
(Java + Maven present); testcontainers' Kafka (a Docker engine answers); Tansu, with a warning.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from streamer import ClientSettings, WorkerSettings, kafka
from streamer.config import KafkaSettings

pytest_plugins = ["tests.helpers"]


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (``timeout``, CI cancelling a job) ends the session as Ctrl-C does, so fixtures are torn down and
    the brokers and workers they started are stopped: they run in sessions of their own, so the signal does not
    reach them, and Python's default for SIGTERM tears nothing down (two brokers outlived a run stopped so)."""
    signal.signal(signal.SIGTERM, _interrupted)


class _Broker:
    def __init__(self, bootstrap: str, kind: str, handle: Any = None) -> None:
        self.bootstrap_servers = bootstrap
        self.kind = kind
        self.handle = handle


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False
    return True


@pytest.fixture(scope="session")
def broker() -> Iterator[_Broker]:
    env = os.environ.get("STREAMER_TEST_BOOTSTRAP")
    if env:
        yield _Broker(env, "external")
        return
    if shutil.which("java") and shutil.which("mvn"):
        from streamer.broker import LocalKafka
        from streamer.testing import start_on_free_ports

        local = start_on_free_ports(LocalKafka)
        try:
            yield _Broker(local.bootstrap_servers, "apache-kafka", local)
        finally:
            local.stop()
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield _Broker(container.get_bootstrap_server(), "testcontainers")
        return
    from streamer.testing import TansuBroker

    warnings.warn("no Java or Docker: tests run on Tansu, which does not prove Kafka's guarantees",
                  stacklevel=1)
    print("\nWARNING: running on the Tansu fallback broker; delivery guarantees are not proven")
    os.environ["STREAMER_IDEMPOTENCE"] = "false"  # Tansu 0.6 has no idempotent producers
    tansu = TansuBroker().start()
    try:
        yield _Broker(tansu.bootstrap_servers, "tansu", tansu)
    finally:
        tansu.stop()


@pytest.fixture(scope="module")
def scram_broker() -> Iterator[Any]:
    """An Apache Kafka with a SASL/SCRAM listener and one user, alice (password alice-s3cret)."""
    if not shutil.which("java"):
        pytest.skip("needs Java for the Apache Kafka broker")
    from streamer.broker import LocalKafka

    scram = LocalKafka(scram_users={"alice": "alice-s3cret"}).start()
    try:
        yield scram
    finally:
        scram.stop()


@pytest.fixture
def topics(broker: _Broker) -> dict[str, str]:
    """Random, unique topic and group names for one test."""
    tag = uuid.uuid4().hex[:10]
    return {
        "request_topic": f"t-{tag}.requests",
        "results_topic": f"t-{tag}.results",
        "dead_letter_topic": f"t-{tag}.dlq",
        "group_id": f"g-{tag}",
    }


@pytest.fixture
def worker_settings(broker: _Broker, topics: dict[str, str]) -> WorkerSettings:
    return WorkerSettings(bootstrap_servers=broker.bootstrap_servers, max_wait_ms=5, **topics)


@pytest.fixture
def client_settings(broker: _Broker, topics: dict[str, str]) -> ClientSettings:
    names = {k: v for k, v in topics.items() if k != "group_id"}
    return ClientSettings(bootstrap_servers=broker.bootstrap_servers, timeout_s=60, **names)


@pytest.fixture
async def created_topics(worker_settings: WorkerSettings) -> AsyncIterator[KafkaSettings]:
    s = worker_settings
    await kafka.ensure_topics(s, [
        kafka.TopicSpec(s.request_topic, 4),
        kafka.TopicSpec(s.results_topic, 4),
        kafka.TopicSpec(s.dead_letter_topic, 1),
    ])
    yield s


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's figures, one line per case, at the end of every run."""
    from tests.faults.load import REPORT

    if REPORT:
        terminalreporter.section("fault suite figures")
        for line in REPORT:
            terminalreporter.write_line(line)
