"""Consumer-side load balancing: how a worker group shares out partitions.

``range`` and ``round-robin`` are Kafka's classic assignors: every member counts the same.
``capacity`` weighs members by what they can do. Each member advertises its measured
throughput (items/s of model time, see :class:`consumers.Worker`) in its subscription's user
data, and the group leader gives each member a share of every topic's partitions in proportion
to it, so a GPU worker takes more partitions than a CPU worker.

The user data is JSON, readable from any language: ``{"v": 1, "capacity": 812.5, "id": "gpu-0"}``.

The assignment is a pure function of the members' ids and capacities: capacities are rounded
to two significant digits (measurement noise moves nothing), members are ordered by id (the
static ``group_instance_id`` or the worker's name, not the broker's per-join member id), and
each member gets one contiguous run of partitions, the largest remainders going to the ids
first in order. So a group that rejoins with the same members gets the same assignment.
Every member gets at least one partition while there are as many partitions as members.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

__all__ = ["AssignorName", "CapacityAssignor", "apportion", "assignors", "decode_capacity", "encode_capacity"]

AssignorName = Literal["range", "round-robin", "capacity"]


def encode_capacity(capacity: float, identity: str) -> bytes:
    return json.dumps({"v": 1, "capacity": round(capacity, 3), "id": identity}, separators=(",", ":")).encode()


def _decode(user_data: bytes | None) -> dict[str, Any]:
    if not user_data:
        return {}
    try:
        data = json.loads(user_data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def decode_capacity(user_data: bytes | None) -> float | None:
    """The capacity a member advertised, or None (no user data, or not ours)."""
    value = _decode(user_data).get("capacity")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) and value > 0 else None


def _two_digits(x: float) -> float:
    return float(f"{x:.2g}")


def apportion(weights: Sequence[float], seats: int) -> list[int]:
    """Split ``seats`` in proportion to ``weights`` (largest remainders; ties to the first).

    Each weight gets at least one seat while ``seats >= len(weights)``.
    """
    n = len(weights)
    total = sum(weights)
    quotas = [seats * w / total for w in weights] if total > 0 else [seats / n] * n
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(n), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[: seats - sum(shares)]:
        shares[i] += 1
    if seats >= n:
        for i in range(n):
            if shares[i] == 0:  # take one from the largest share (the first such on ties)
                donor = max(range(n), key=lambda j: (shares[j], -j))
                shares[donor] -= 1
                shares[i] = 1
    return shares


class CapacityAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Partitions in proportion to each member's advertised capacity (see the module doc)."""

    name: ClassVar[str] = "streamer-capacity"
    version: ClassVar[int] = 1

    def __init__(self, capacity: Callable[[], float], identity: str) -> None:
        self._capacity = capacity
        self.identity = identity

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        user_data = encode_capacity(self._capacity(), self.identity)
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        facts = {m: _decode(meta.user_data) for m, meta in members.items()}
        known = [c for m in members if (c := decode_capacity(members[m].user_data)) is not None]
        fallback = sorted(known)[len(known) // 2] if known else 1.0  # a member without a figure: the median
        weight = {m: _two_digits(decode_capacity(members[m].user_data) or fallback) for m in members}
        order = sorted(members, key=lambda m: (str(facts[m].get("id", "")), m))
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        owned: dict[str, dict[str, list[int]]] = {m: {} for m in members}
        for topic in topics:
            parts = sorted(cluster.partitions_for_topic(topic) or ())
            subscribed = [m for m in order if topic in members[m].subscription]
            if not parts or not subscribed:
                continue
            start = 0
            for m, share in zip(subscribed, apportion([weight[m] for m in subscribed], len(parts)), strict=True):
                if share:
                    owned[m][topic] = parts[start:start + share]
                start += share
        return {
            m: ConsumerProtocolMemberAssignment(self.version, sorted(owned[m].items()), b"") for m in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


def assignors(name: str, capacity: Callable[[], float], identity: str) -> tuple[Any, ...]:
    """The ``partition_assignment_strategy`` for a worker's consumer.

    ``capacity`` also offers round-robin, so a group in a rolling change between the two keeps
    working (the broker picks a protocol every member offers).
    """
    if name == "range":
        return (RangePartitionAssignor,)
    if name == "round-robin":
        return (RoundRobinPartitionAssignor,)
    if name == "capacity":
        return (CapacityAssignor(capacity, identity), RoundRobinPartitionAssignor)
    raise ValueError(f"unknown assignor {name!r}; choose from range, round-robin, capacity")
