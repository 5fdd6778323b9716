"""Consumer-side load balancing: the capacity-aware assignor, static membership, ``streamer status``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.assignors import CapacityAssignor, MemberCard, apportion, assignors
from streamer.models import load_model

from .helpers import Processes, settings_env


class _Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.partitions.get(topic)
        return set(range(n)) if n else None


def _members(spec: dict[str, tuple[str, float | None]], topics: list[str]) -> dict[str, Any]:
    """member_id -> metadata, from member_id -> (identity, capacity)."""
    return {
        mid: ConsumerProtocolMemberMetadata(1, topics, MemberCard(ident, cap).encode())
        for mid, (ident, cap) in spec.items()
    }


def _by_identity(result: dict[str, ConsumerProtocolMemberAssignment],
                 spec: dict[str, tuple[str, float | None]]) -> dict[str, dict[str, list[int]]]:
    return {spec[mid][0]: dict(a.assignment) for mid, a in result.items()}


def test_apportion_is_proportional_and_gives_everyone_one() -> None:
    assert apportion([3, 3, 1], 12) == [5, 5, 2]
    assert apportion([300, 100], 8) == [6, 2]
    assert apportion([1, 1, 1], 8) == [3, 3, 2]
    assert apportion([1000, 1], 4) == [3, 1]  # at least one each while partitions >= members
    assert apportion([1, 1, 1], 2) == [1, 1, 0]
    assert sum(apportion([0.3, 7.1, 2.2, 9.9], 64)) == 64


def test_capacity_assignor_is_proportional_and_stable_across_rejoins() -> None:
    assignor = CapacityAssignor(lambda: MemberCard("x", 1.0))
    cluster = _Cluster({"req": 12, "other": 3})
    spec: dict[str, tuple[str, float | None]] = {"m-1": ("gpu", 3000.0), "m-2": ("cpu-a", 1000.0),
                                                 "m-3": ("cpu-b", 1000.0)}
    first = _by_identity(assignor.assign(cluster, _members(spec, ["req"])), spec)
    assert {k: len(v["req"]) for k, v in first.items()} == {"gpu": 7, "cpu-a": 3, "cpu-b": 2}
    assert sorted(p for v in first.values() for p in v["req"]) == list(range(12))
    # A rejoin: new member ids, members listed in another order, capacities re-measured with noise.
    spec2: dict[str, tuple[str, float | None]] = {"z-9": ("cpu-b", 1004.0), "a-7": ("gpu", 2987.0),
                                                  "q-1": ("cpu-a", 996.0)}
    again = _by_identity(assignor.assign(cluster, _members(spec2, ["req"])), spec2)
    assert again == first


def test_capacity_assignor_handles_unknown_capacity_and_partial_subscriptions() -> None:
    assignor = CapacityAssignor(lambda: MemberCard("x", 1.0))
    cluster = _Cluster({"a": 6, "b": 4})
    members = {
        "m1": ConsumerProtocolMemberMetadata(1, ["a", "b"], MemberCard("w1", 200.0).encode()),
        "m2": ConsumerProtocolMemberMetadata(1, ["a"], b""),  # no figure: counted as the median
        "m3": ConsumerProtocolMemberMetadata(1, ["a", "b"], b"not json"),
    }
    result = {m: dict(a.assignment) for m, a in assignor.assign(cluster, members).items()}
    assert [len(result[m].get("a", [])) for m in ("m1", "m2", "m3")] == [2, 2, 2]
    assert sorted(result["m1"]["b"] + result["m3"]["b"]) == [0, 1, 2, 3]
    assert "b" not in result["m2"]


def test_member_card_is_plain_json_and_reads_what_anyone_sends() -> None:
    data = MemberCard("gpu-0", 812.5, "minilm", "2", 9100).encode()
    assert json.loads(data) == {"v": 1, "id": "gpu-0", "capacity": 812.5, "model": "minilm", "version": "2",
                                "metrics": 9100}
    assert MemberCard.decode(data) == MemberCard("gpu-0", 812.5, "minilm", "2", 9100)
    assert json.loads(MemberCard("idle").encode()) == {"v": 1, "id": "idle", "capacity": 0.0}
    assert MemberCard.decode(MemberCard("idle").encode()) == MemberCard("idle")
    for foreign in (b"", b"\x00\x01", b"[1]", b"null"):
        assert MemberCard.decode(foreign) is None
    # Another implementation's card with fields of the wrong type: those fields are left out.
    odd = json.dumps({"id": 7, "capacity": "fast", "model": ["m"], "version": 2, "metrics": 70000,
                      "txn": 3}).encode()
    assert MemberCard.decode(odd) == MemberCard("7")
    eos = MemberCard("w", txn="g.w.1a2b")  # an exactly-once worker names its transactional id
    assert json.loads(eos.encode())["txn"] == "g.w.1a2b" and MemberCard.decode(eos.encode()) == eos


def test_capacity_offers_round_robin_too_and_every_assignor_carries_the_card() -> None:
    card = MemberCard("w", 5.0, "tiny-mlp", "1", None)
    chosen = assignors("capacity", lambda: card)
    assert [getattr(a, "name", None) for a in chosen] == ["streamer-capacity", "roundrobin"]
    for name, protocol in (("range", "range"), ("round-robin", "roundrobin"), ("capacity", "streamer-capacity")):
        first = assignors(name, lambda: card)[0]
        assert first.name == protocol
        assert MemberCard.decode(first.metadata(["t"]).user_data) == card
    with pytest.raises(ValueError, match="unknown assignor"):
        assignors("sticky", lambda: card)


def _status(ws: WorkerSettings, group: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "status", group, "--json"], capture_output=True, text=True, timeout=60,
        env={**os.environ, **settings_env(ws)}, check=True,
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _status_text(ws: WorkerSettings, group: str) -> str:
    return subprocess.run([sys.executable, "-m", "streamer", "status", group], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **settings_env(ws)}, check=True).stdout


def _owned(status: dict[str, Any]) -> dict[str, list[str]]:
    """The worker's client id prefix (``a`` of ``a-worker-host-pid``) -> its partitions."""
    return {m["client_id"].split("-worker-")[0]: m["partitions"] for m in status["members"]}


async def _wait_status(ws: WorkerSettings, group: str, members: int, processes: Processes) -> dict[str, Any]:
    await processes.wait_group(ws, group, members)
    for _ in range(100):
        status = _status(ws, group)
        if status["state"] == "Stable" and len(status["members"]) == members:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"group {group} did not settle: {status}")


@pytest.mark.kafka
@pytest.mark.slow
async def test_capacity_assignor_and_status_with_real_workers(
    worker_settings: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = worker_settings
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 8), kafka.TopicSpec(ws.results_topic, 2),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1)])
    common: dict[str, Any] = {"assignor": "capacity", "stats_interval_s": 1}
    processes.worker(ws, capacity=300, group_instance_id="w-a", client_id="a", **common)
    processes.worker(ws, capacity=100, group_instance_id="w-b", client_id="b", **common)
    first = await _wait_status(ws, ws.group_id, 2, processes)
    assert first["assignor"] == "streamer-capacity"
    owned = _owned(first)
    by_client = {m["client_id"].split("-worker-")[0]: m for m in first["members"]}
    assert {k: len(m["partitions"]) for k, m in by_client.items()} == {"a": 6, "b": 2}
    assert {k: m["capacity"] for k, m in by_client.items()} == {"a": 300, "b": 100}
    version = str(load_model("tiny-mlp", "cpu").version)  # "1+<digest of the weights>"
    assert {(m["model"], m["version"]) for m in first["members"]} == {("tiny-mlp", version)}

    # A third member (its capacity measured, not configured) joins, then leaves: A and B get back
    # exactly what they had.
    third = processes.worker(ws, group_instance_id="w-c", client_id="c", **common)
    joined = await _wait_status(ws, ws.group_id, 3, processes)
    measured = next(m for m in joined["members"] if m["client_id"].startswith("c-worker-"))
    assert measured["capacity"] is not None and measured["capacity"] > 0
    assert sum(len(m["partitions"]) for m in joined["members"]) == 8
    assert processes.stop(third) == 0
    again = await _wait_status(ws, ws.group_id, 2, processes)
    assert _owned(again) == owned

    # Traffic through the group: every committed offset reaches the log end; total lag 0.
    inputs = load_model("tiny-mlp", "cpu").example_inputs(200, seed=3)
    async with StreamerClient(client_settings) as client:
        results = [r async for r in client.stream(inputs, model="tiny-mlp", key=lambda x: str(hash(x[0]) % 50))]
    assert len(results) == 200
    for _ in range(100):
        status = _status(ws, ws.group_id)
        if status["total_lag"] == 0 and sum(p["committed"] or 0 for p in status["partitions"]) == 200:
            break
        await asyncio.sleep(0.2)
    assert status["total_lag"] == 0
    assert sum(p["log_end"] for p in status["partitions"]) == 200
    assert all(p["client_id"] for p in status["partitions"])

    # The human form: the same facts, as a table.
    text = _status_text(ws, ws.group_id)
    assert f"group {ws.group_id}: Stable, assignor streamer-capacity, 2 members, total lag 0" in text
    for column in ("TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "CAPACITY", "300.0/s", "MODEL",
                   "tiny-mlp"):
        assert column in text


@pytest.mark.kafka
@pytest.mark.slow
async def test_static_member_restart_does_not_rebalance(
    created_topics: WorkerSettings, processes: Processes
) -> None:
    ws = created_topics
    static = {"group_instance_id": "static-1", "session_timeout_ms": 30_000}
    first = processes.worker(ws, client_id="static", **static)
    other = processes.worker(ws, client_id="dynamic")
    before = _owned(await _wait_status(ws, ws.group_id, 2, processes))
    log_before = other.log_path.read_text()
    assert processes.stop(first) == 0  # SIGTERM: a static member leaves no LeaveGroup behind
    restarted = processes.worker(ws, client_id="static", **static)
    for _ in range(300):
        if "serving" in restarted.log_path.read_text() and "partitions assigned" in restarted.log_path.read_text():
            break
        processes.check_alive()
        await asyncio.sleep(0.1)
    after = _owned(await _wait_status(ws, ws.group_id, 2, processes))
    assert after == before
    # The other member never went through a rebalance.
    log_after = other.log_path.read_text()
    for event in ("partitions assigned", "partitions revoked"):
        assert log_after.count(event) == log_before.count(event), event
