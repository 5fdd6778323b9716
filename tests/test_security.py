"""SASL/SCRAM and TLS settings reach every client streamer creates; wrong credentials fail clearly."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import AuthenticationFailed, ClientSettings, WorkerSettings, kafka, load_settings
from streamer.broker import LocalKafka
from streamer.errors import TlsFailed

from .helpers import Processes, settings_env
from .tls import TlsFiles, make_tls

ROOT = Path(__file__).resolve().parent.parent
needs_java = pytest.mark.skipif(not shutil.which("java"), reason="needs Java for the Apache Kafka broker")


def _sasl(broker: LocalKafka, password: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"bootstrap_servers": broker.sasl_bootstrap_servers, "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "alice", "sasl_password": password,
            "request_topic": f"s-{tag}.requests", "results_topic": f"s-{tag}.results",
            "dead_letter_topic": f"s-{tag}.dlq"}


@needs_java
@pytest.mark.kafka
@pytest.mark.slow
async def test_scram_user_reaches_cli_worker_and_client(scram_broker: LocalKafka, processes: Processes) -> None:
    conf = _sasl(scram_broker, "alice-s3cret")
    ws = load_settings(WorkerSettings, group_id=f"sg-{uuid.uuid4().hex[:6]}", **conf)
    env = {**os.environ, **settings_env(ws)}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "streamer", "topics", "create"],
                                  capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    processes.worker(ws)
    await processes.wait_group(ws, ws.group_id, 1)
    async with StreamerClient(load_settings(ClientSettings, **conf)) as client:
        result = await client.infer([0.5] * 16, model="tiny-mlp", timeout_s=60)
    assert result.status == "ok"


@needs_java
@pytest.mark.kafka
async def test_wrong_password_is_refused_with_a_clear_error(scram_broker: LocalKafka, tmp_path: Path) -> None:
    conf = _sasl(scram_broker, "not-the-password")
    with pytest.raises(AuthenticationFailed, match=r"refused user 'alice' .*invalid credentials"):
        async with StreamerClient(load_settings(ClientSettings, **conf)):
            pass
    ws = load_settings(WorkerSettings, **conf)
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "streamer", "worker"], capture_output=True, text=True,
        env={**os.environ, **settings_env(ws)}, timeout=120, check=False,
    )
    assert out.returncode == 2
    assert "refused user 'alice'" in out.stderr and "STREAMER_SASL_PASSWORD" in out.stderr
    with pytest.raises(AuthenticationFailed):
        await kafka.ensure_topics(ws, [kafka.TopicSpec("never", 1)])


def test_tls_settings_build_an_ssl_context(tmp_path: Path) -> None:
    s = load_settings(WorkerSettings, security_protocol="SSL")
    kw = kafka.client_kwargs(s)
    assert kw["security_protocol"] == "SSL" and kw["ssl_context"] is not None
    s = load_settings(WorkerSettings, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="u", sasl_password="p")
    kw = kafka.client_kwargs(s)
    assert kw["ssl_context"] is not None and kw["sasl_mechanism"] == "SCRAM-SHA-512"


def test_every_kafka_client_is_built_by_streamer_kafka() -> None:
    """So connection and security settings reach workers, stages, the client library and the CLI alike."""
    pattern = re.compile(r"\bAIOKafka(Producer|Consumer|AdminClient)\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("schemas", "producers", "consumers", "streamer")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "kafka.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"build Kafka clients with streamer.kafka: {offenders}"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalKafka, TlsFiles]]:
    files = make_tls(tmp_path_factory.mktemp("tls"))
    broker = LocalKafka(ssl_keystore=files.keystore).start()
    try:
        yield broker, files
    finally:
        broker.stop()


def _tls(broker: LocalKafka, cafile: Path | None) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    conf = {"bootstrap_servers": broker.ssl_bootstrap_servers, "security_protocol": "SSL",
            "request_topic": f"tls-{tag}.requests", "results_topic": f"tls-{tag}.results",
            "dead_letter_topic": f"tls-{tag}.dlq"}
    if cafile is not None:
        conf["ssl_cafile"] = str(cafile)
    return conf


@needs_java
@pytest.mark.kafka
@pytest.mark.slow
async def test_a_worker_and_a_client_work_over_tls(tls_broker: tuple[LocalKafka, TlsFiles],
                                                   processes: Processes) -> None:
    broker, files = tls_broker
    conf = _tls(broker, files.ca)
    ws = load_settings(WorkerSettings, group_id=f"tg-{uuid.uuid4().hex[:6]}", **conf)
    await kafka.ensure_topics(ws, [kafka.TopicSpec(t, 2) for t in (ws.request_topic, ws.results_topic,
                                                                    ws.dead_letter_topic)])
    processes.worker(ws)
    await processes.wait_group(ws, ws.group_id, 1)
    async with StreamerClient(load_settings(ClientSettings, **conf)) as client:
        results = [await client.infer([0.1 * i] * 16, model="tiny-mlp", key=f"k{i}", timeout_s=60) for i in range(5)]
    assert [r.status for r in results] == ["ok"] * 5


@needs_java
@pytest.mark.kafka
async def test_a_client_that_does_not_trust_the_ca_gets_a_clear_error(
    tls_broker: tuple[LocalKafka, TlsFiles]
) -> None:
    broker, _files = tls_broker
    conf = _tls(broker, None)  # the system's CAs do not include the test CA
    with pytest.raises(TlsFailed, match=r"TLS to the cluster .* certificate verify failed.* ssl_cafile "
                                          r"\(STREAMER_SSL_CAFILE\)"):
        async with StreamerClient(load_settings(ClientSettings, **conf)):
            pass
    ws = load_settings(WorkerSettings, **conf)  # fails at once: waiting for the cluster cannot help
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "streamer", "worker"], capture_output=True, text=True,
        env={**os.environ, **settings_env(ws)}, timeout=120, check=False,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "ssl_cafile (STREAMER_SSL_CAFILE)" in out.stderr
