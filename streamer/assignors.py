"""Consumer-side load balancing: how a worker group shares out partitions.

``range`` and ``round-robin`` are Kafka's classic assignors: every member counts the same.
``capacity`` weighs members by what they can do. Each member advertises its measured
throughput (items/s of model time, see :class:`consumers.Worker`) in its subscription's user
data, and the group leader gives each member a share of every topic's partitions in proportion
to it, so a GPU worker takes more partitions than a CPU worker.

Whatever the assignor, a worker's subscription carries its :class:`MemberCard` as user data: JSON,
readable from any language, ``{"v": 1, "id": "gpu-0", "capacity": 812.5, "model": "minilm",
"version": "1", "metrics": 9100}`` (``metrics``: the port of its Prometheus exporter, if it serves
one; ``share``: a canary's part of the partitions). ``streamer status`` and ``streamer top`` read it
from the group's description.

Canary: a member whose card has a ``share`` (``--traffic-share 0.1``) is given that part of each
topic's partitions, rounded to whole partitions (at least one, and at least one left to the others);
members with shares split their partitions by share, the others split the rest by capacity. A
partition is the unit: with 8 partitions, a share of 0.1 is one partition, 12.5% of the keys.

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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

__all__ = ["AssignorName", "CapacityAssignor", "MemberCard", "apportion", "assignors"]

AssignorName = Literal["range", "round-robin", "capacity"]


@dataclass(frozen=True, slots=True)
class MemberCard:
    """What a worker tells its group about itself, in its subscription's user data (see the module doc)."""

    id: str
    capacity: float | None = None
    """Items/s it sustains (the capacity assignor's weight); None: not known."""
    model: str | None = None
    version: str | None = None
    metrics_port: int | None = None
    share: float | None = None
    """Canary: the part of the partitions this member asks for (capacity assignor); None: a regular member."""
    txn: str | None = None
    """Exactly-once: the member's transactional id (a new owner of its partitions fences ids no member has)."""

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": 1, "id": self.id, "capacity": round(self.capacity or 0.0, 3)}
        data.update({k: v for k, v in (("model", self.model), ("version", self.version),
                                       ("metrics", self.metrics_port), ("share", self.share), ("txn", self.txn))
                     if v is not None})
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, user_data: bytes | None) -> MemberCard | None:
        """The card in ``user_data``; None if there is none or it is not ours. Fields of the wrong type are
        left out (a member of another implementation may send anything)."""
        if not user_data:
            return None
        try:
            data = json.loads(user_data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        capacity = data.get("capacity")
        port = data.get("metrics")
        share = data.get("share")
        return cls(
            id=str(data.get("id", "")),
            capacity=float(capacity) if isinstance(capacity, int | float) and math.isfinite(capacity)
            and capacity > 0 else None,
            model=data["model"] if isinstance(data.get("model"), str) else None,
            version=data["version"] if isinstance(data.get("version"), str) else None,
            metrics_port=port if isinstance(port, int) and 0 < port < 65536 else None,
            share=float(share) if isinstance(share, int | float) and 0 < share < 1 else None,
            txn=data["txn"] if isinstance(data.get("txn"), str) else None,
        )


def _capacity(user_data: bytes | None) -> float | None:
    card = MemberCard.decode(user_data)
    return card.capacity if card else None


def _canary_seats(shares: list[float], partitions: int, regulars: bool) -> int:
    """Partitions for the canary members: their summed share of ``partitions``, rounded, and at least one while
    any asks for a share; at least one is left to the regular members while there are any."""
    if not shares:
        return 0
    if not regulars:
        return partitions
    if partitions <= 1:
        return 0
    return max(1, min(round(min(1.0, sum(shares)) * partitions), partitions - 1))


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

    def __init__(self, card: Callable[[], MemberCard]) -> None:
        self._card = card

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), self._card().encode())

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        cards = {m: MemberCard.decode(meta.user_data) for m, meta in members.items()}
        known = [c for m in members if (c := _capacity(members[m].user_data)) is not None]
        fallback = sorted(known)[len(known) // 2] if known else 1.0  # a member without a figure: the median
        weight = {m: _two_digits(_capacity(members[m].user_data) or fallback) for m in members}
        order = sorted(members, key=lambda m: (card.id if (card := cards[m]) else "", m))
        share = {m: card.share for m, card in cards.items() if card is not None and card.share}
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        owned: dict[str, dict[str, list[int]]] = {m: {} for m in members}
        for topic in topics:
            parts = sorted(cluster.partitions_for_topic(topic) or ())
            subscribed = [m for m in order if topic in members[m].subscription]
            if not parts or not subscribed:
                continue
            regular = [m for m in subscribed if m not in share]
            canary = [m for m in subscribed if m in share]
            on_canaries = _canary_seats([share[m] for m in canary], len(parts), bool(regular))
            seats = apportion([weight[m] for m in regular], len(parts) - on_canaries) if regular else []
            seats += apportion([share[m] for m in canary], on_canaries) if canary else []
            start = 0
            for m, count in zip(regular + canary, seats, strict=True):
                if count:
                    owned[m][topic] = parts[start:start + count]
                start += count
        return {
            m: ConsumerProtocolMemberAssignment(self.version, sorted(owned[m].items()), b"") for m in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


class _Carded:
    """One of Kafka's classic assignors (range, round-robin), unchanged, whose subscriptions carry the member's
    card. The protocol keeps its name, so members without a card (other clients) still join the same group."""

    def __init__(self, base: type[AbstractPartitionAssignor], card: Callable[[], MemberCard]) -> None:
        self._base = base
        self._card = card
        self.name: str = base.name
        self.version: int = base.version

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, list(topics), self._card().encode())

    def assign(self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]) -> Any:
        return self._base.assign(cluster, members)

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self._base.on_assignment(assignment)


def assignors(name: str, card: Callable[[], MemberCard]) -> tuple[Any, ...]:
    """The ``partition_assignment_strategy`` for a worker's consumer; every one carries ``card()`` (read at each
    join, so its figures are current).

    ``capacity`` also offers round-robin, so a group in a rolling change between the two keeps
    working (the broker picks a protocol every member offers).
    """
    if name == "range":
        return (_Carded(RangePartitionAssignor, card),)
    if name == "round-robin":
        return (_Carded(RoundRobinPartitionAssignor, card),)
    if name == "capacity":
        return (CapacityAssignor(card), _Carded(RoundRobinPartitionAssignor, card))
    raise ValueError(f"unknown assignor {name!r}; choose from range, round-robin, capacity")
