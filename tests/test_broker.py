"""The local broker launcher: storage formatting with any valid cluster id."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.broker import LocalKafka, _cluster_id, free_port, free_ports
from streamer.config import KafkaSettings
from streamer.testing import LocalKafkaCluster, WorkerProcess

from .helpers import settings_env


def test_generated_cluster_ids_never_begin_with_a_dash() -> None:
    ids = [_cluster_id() for _ in range(5000)]  # without the rule, about 78 of them would
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)


def test_a_quick_broker_runs_the_first_compiler_only() -> None:
    # The demo's broker (a minute long) skips the optimising compiler's first minute of compiling; the others
    # keep the JVM's default. The demo test starts one for real.
    assert "-XX:TieredStopAtLevel=1" in LocalKafka(jit="quick").jvm_options()
    assert not any(o.startswith("-XX:TieredStopAtLevel") for o in LocalKafka().jvm_options())
    with pytest.raises(ValueError, match="jit must be one of"):
        LocalKafka(jit="fast")


def test_ports_picked_for_a_node_or_a_cluster_are_distinct() -> None:
    # Picked one at a time, two ports of a node could be the same (CI once formatted a cluster node with
    # PLAINTEXT and CONTROLLER both on 45137, which Kafka refuses).
    assert len(set(free_ports(64))) == 64
    node = LocalKafka(scram_users={"u": "p"}, ssl_keystore="unused.pem")
    try:
        assert len({node.port, node.controller_port, node.sasl_port, node.ssl_port}) == 4
    finally:
        node.stop()
    cluster = LocalKafkaCluster(5)
    try:
        ports = [p for n in cluster.nodes for p in (n.port, n.controller_port)]
        assert len(set(ports)) == 10
    finally:
        cluster.stop()


@pytest.mark.kafka
async def test_a_cluster_id_that_begins_with_a_dash_formats_and_serves() -> None:
    dash_id = base64.urlsafe_b64encode(b"\xf8" + os.urandom(15)).rstrip(b"=").decode()
    assert dash_id.startswith("-")
    broker = LocalKafka(cluster_id=dash_id)
    try:
        broker.start()
        meta = (broker.data_dir / "log" / "meta.properties").read_text()
        assert f"cluster.id={dash_id}" in meta
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        assert await kafka.ensure_topics(settings, [kafka.TopicSpec("dash-id-check", 1)]) == ["dash-id-check"]
    finally:
        broker.stop()


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_worker_started_before_its_cluster_waits_for_it(tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    settings = WorkerSettings(bootstrap_servers=f"127.0.0.1:{port}", request_topic="wait.requests",
                              results_topic="wait.results", dead_letter_topic="wait.dlq", group_id="wait")
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log")
    broker = LocalKafka(port=port, controller_port=controller_port)
    try:
        await asyncio.sleep(3)
        assert worker.proc.poll() is None, (tmp_path / "worker.log").read_text()
        await asyncio.to_thread(broker.start)
        await kafka.ensure_topics(settings, [kafka.TopicSpec(t, 1) for t in ("wait.requests", "wait.results",
                                                                              "wait.dlq")])
        client = ClientSettings(bootstrap_servers=settings.bootstrap_servers, request_topic="wait.requests",
                                results_topic="wait.results", timeout_s=90)
        async with StreamerClient(client) as c:
            assert (await c.infer([0.5] * 16, model="tiny-mlp")).status == "ok"
    finally:
        worker.stop()
        broker.stop()
    log = (tmp_path / "worker.log").read_text()
    assert log.count("does not answer yet") == 1  # one line, not one per retry


def test_a_worker_gives_up_on_an_absent_cluster_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMER_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "STREAMER_STARTUP_TIMEOUT_S": "2"}
    done = subprocess.run([sys.executable, "-m", "streamer", "worker"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "streamer: error: cannot reach the cluster at 127.0.0.1:" in done.stderr
