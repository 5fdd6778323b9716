"""Fault suite, brokers: a 3-node cluster losing a leader, and a single broker restarting."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.broker import LocalKafka
from streamer.config import KafkaSettings
from streamer.models import load_model
from streamer.testing import LocalKafkaCluster, start_on_free_ports

from ..helpers import Processes
from .load import MODES, Load, check, drain, explain_duplicates, figures, isolation, report, scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"request_topic": f"f-{tag}.requests", "results_topic": f"f-{tag}.results",
            "dead_letter_topic": f"f-{tag}.dlq", "group_id": f"fg-{tag}"}


async def _topics(ws: WorkerSettings, replication: int) -> None:
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 4, replication),
                                   kafka.TopicSpec(ws.results_topic, 4, replication),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1, replication)])


@pytest.fixture(scope="module")
def cluster_of_three() -> Iterator[LocalKafkaCluster]:
    c = start_on_free_ports(lambda: LocalKafkaCluster(3))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def cluster(cluster_of_three: LocalKafkaCluster) -> LocalKafkaCluster:
    """The module's cluster with every node up and every partition's replicas in sync: each test kills a node
    and starts it again, and the next one must not begin while that node is still catching up (with
    min.insync.replicas 2, killing another then would stop a partition)."""
    c = cluster_of_three
    for node in c.nodes:
        if not node.running:  # a test that failed before starting its victim again
            await asyncio.to_thread(node.start, 120)
    settings = KafkaSettings(bootstrap_servers=c.bootstrap_servers)
    deadline = time.monotonic() + 120
    while True:
        async with kafka.admin(settings) as client:
            described = await client.describe_topics()
        behind = [f"{t['topic']}-{p['partition']}" for t in described for p in t["partitions"]
                  if len(p["isr"]) < len(p["replicas"])]
        if not behind:
            return c
        assert time.monotonic() < deadline, f"replicas still out of sync after 120 s: {behind[:5]}"
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("mode", MODES)
async def test_killing_the_request_partition_leader_loses_no_acknowledged_request(
    mode: str, cluster: LocalKafkaCluster, processes: Processes
) -> None:
    """RF 3, min.insync.replicas 2: kill -9 the node leading request partition 0 under load, restart it."""
    names = _names()
    ws = WorkerSettings(bootstrap_servers=cluster.bootstrap_servers, session_timeout_ms=6000, **names)
    await _topics(ws, replication=3)
    await processes.group(ws, 2, torch_threads=1, delivery=mode)
    cs = ClientSettings(bootstrap_servers=cluster.bootstrap_servers, timeout_s=240,
                        **{k: v for k, v in names.items() if k != "group_id"})
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(1500), seed=41)
    async with StreamerClient(cs) as client:
        load = Load(client, "tiny-mlp", inputs, keys=16, rate=120)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        leader = (await kafka.partition_leaders(ws, ws.request_topic))[0]
        victim = cluster.node_by_id(leader)
        victim.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(4)
        await asyncio.to_thread(victim.start, 120)  # same data, same ports
        await publishing
        results = await load.results()
        raw = await drain(cs, client.reply_to.topic, isolation_level=isolation(mode))
    fig = figures(load, results, raw, [killed_at])
    fig.extra["killed node"] = leader
    # The client goes on publishing while the dead node leads a partition: its records queue (up to a bound) and
    # the others' are not held up. It used to stop at the first full record batch for that partition, 7-10 s.
    sent = sorted(load.sent.values())
    gap = max(b - a for a, b in itertools.pairwise(sent))
    fig.extra["longest pause in publishing"] = f"{gap:.1f} s"
    await explain_duplicates(fig, cs, ws.request_topic, raw)
    report(fig.line(f"kill -9 the request-partition leader of 3 (RF 3, min ISR 2) [{mode}]"), fig, mode=mode)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    check(fig, mode)
    assert gap < 3.0, f"the client stopped publishing while a node was down: {fig}"


@pytest.mark.parametrize("mode", MODES)
async def test_single_broker_restart_with_its_data(mode: str, tmp_path: Path, processes: Processes) -> None:
    broker = LocalKafka(data_dir=tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    try:
        names = _names()
        ws = WorkerSettings(bootstrap_servers=broker.bootstrap_servers, session_timeout_ms=6000, **names)
        await _topics(ws, replication=1)
        await processes.group(ws, 2, torch_threads=1, delivery=mode)
        cs = ClientSettings(bootstrap_servers=broker.bootstrap_servers, timeout_s=240,
                            **{k: v for k, v in names.items() if k != "group_id"})
        inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(1200), seed=43)
        async with StreamerClient(cs) as client:
            load = Load(client, "tiny-mlp", inputs, keys=16, rate=120)
            publishing = asyncio.create_task(load.run())
            await asyncio.sleep(3)
            await asyncio.to_thread(broker.stop)  # controlled shutdown; the data stays
            down_at = time.monotonic()
            await asyncio.sleep(2)
            await asyncio.to_thread(broker.start)
            await publishing
            results = await load.results()
            raw = await drain(cs, client.reply_to.topic, isolation_level=isolation(mode))
        fig = figures(load, results, raw, [down_at])
        await explain_duplicates(fig, cs, ws.request_topic, raw)
        report(fig.line(f"restart of a single broker with its data [{mode}]"), fig, mode=mode)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
        check(fig, mode)
        assert all(p.proc.poll() is None for p in processes.started), "workers must survive the restart"
    finally:
        await asyncio.to_thread(broker.stop)
