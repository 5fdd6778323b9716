"""A consumer group at a glance: members, their partitions, committed offsets and lag.

What ``kafka-consumer-groups --describe`` shows, plus the capacity each member advertises to
the capacity-aware assignor. Lag is the log-end offset minus the committed offset; a partition
with no committed offset counts from its first offset. With exactly-once workers each
partition's last transaction marker occupies one offset, so an idle partition shows a lag of 1
there, as in Kafka's own tool.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from . import kafka
from .assignors import MemberCard
from .config import KafkaSettings

__all__ = ["GroupStatus", "MemberStatus", "PartitionStatus", "group_status", "member_cards"]


@dataclass(frozen=True, slots=True)
class MemberStatus:
    member_id: str
    client_id: str
    host: str
    partitions: list[str]
    capacity: float | None = None
    """Items/s the member advertised (its card; streamer.assignors.MemberCard)."""
    model: str | None = None
    version: str | None = None
    metrics_port: int | None = None
    """Its Prometheus exporter's port (on ``host``), when it serves one."""


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    topic: str
    partition: int
    committed: int | None
    log_end: int
    lag: int
    member_id: str | None
    client_id: str | None


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group: str
    state: str
    assignor: str
    members: list[MemberStatus] = field(default_factory=list)
    partitions: list[PartitionStatus] = field(default_factory=list)

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_lag": self.total_lag}


async def member_cards(settings: KafkaSettings, group_id: str) -> list[MemberCard]:
    """The cards of the group's members now (members without one left out)."""
    async with kafka.admin(settings) as admin:
        response = (await admin.describe_consumer_groups([group_id]))[0]
    cards = []
    for _member_id, _client_id, _host, metadata, _assignment in response.groups[0][5]:
        if metadata and (card := MemberCard.decode(ConsumerProtocolMemberMetadata.decode(metadata).user_data)):
            cards.append(card)
    return cards


async def group_status(settings: KafkaSettings, group_id: str, topics: list[str] | None = None, *,
                       offsets: bool = True) -> GroupStatus:
    """The group's state, members and per-partition lag over its topics.

    The topics are those its members subscribe to or it has committed offsets for, plus ``topics``.
    ``offsets=False``: members only (for brokers without offset fetches by admin clients, as Tansu).
    """
    async with kafka.admin(settings) as admin:
        response = (await admin.describe_consumer_groups([group_id]))[0]
        _err, _group, state, _ptype, protocol, raw_members = response.groups[0]
        committed = await kafka.committed_offsets(settings, group_id, admin) if offsets else {}
        members: list[MemberStatus] = []
        owners: dict[TopicPartition, MemberStatus] = {}
        wanted = set(topics or [])
        for member_id, client_id, host, metadata, assignment in raw_members:
            card = None
            if metadata:
                meta = ConsumerProtocolMemberMetadata.decode(metadata)
                wanted.update(meta.subscription)
                card = MemberCard.decode(meta.user_data)
            owned = []
            if assignment:
                for topic, parts in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
                    owned += [TopicPartition(topic, p) for p in parts]
            m = MemberStatus(str(member_id), str(client_id), str(host).lstrip("/"),
                             [f"{tp.topic}-{tp.partition}" for tp in sorted(owned)],
                             *((card.capacity, card.model, card.version, card.metrics_port) if card else ()))
            members.append(m)
            owners.update(dict.fromkeys(owned, m))
        if not offsets:
            return GroupStatus(group_id, str(state), str(protocol), members)
        wanted.update(tp.topic for tp in committed)
        described = await admin.describe_topics(sorted(wanted)) if wanted else []
    tps = sorted(TopicPartition(t["topic"], p["partition"]) for t in described if not t["error_code"]
                 for p in t["partitions"])
    ends, starts = await kafka.offset_bounds(settings, tps)
    partitions = []
    for tp in tps:
        done = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None
        owner = owners.get(tp)
        partitions.append(PartitionStatus(
            tp.topic, tp.partition, done, ends[tp], max(0, ends[tp] - (done if done is not None else starts[tp])),
            owner.member_id if owner else None, owner.client_id if owner else None,
        ))
    return GroupStatus(group_id, str(state), str(protocol), members, partitions)



def render(status: GroupStatus) -> Any:
    """Rich renderables: a members table and a partitions table, like ``kafka-consumer-groups --describe``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"group {status.group}: {status.state}, assignor {status.assignor or '-'}, "
                f"{len(status.members)} members, total lag {status.total_lag}")
    members = Table("MEMBER", "CLIENT-ID", "HOST", "MODEL", "VERSION", "PARTITIONS", "CAPACITY", title="members",
                    title_justify="left")
    for m in status.members:
        members.add_row(m.member_id, m.client_id, m.host, m.model or "-", m.version or "-", str(len(m.partitions)),
                        f"{m.capacity:,.1f}/s" if m.capacity is not None else "-")
    parts = Table("TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "CLIENT-ID",
                  title="partitions", title_justify="left")
    for p in status.partitions:
        parts.add_row(p.topic, str(p.partition), "-" if p.committed is None else str(p.committed), str(p.log_end),
                      str(p.lag), p.client_id or "-")
    return Group(head, members, parts)
