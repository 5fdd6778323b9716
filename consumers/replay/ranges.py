"""Offset ranges of a topic for replay: per partition ``[start, end)``, fixed when a job starts.

A range comes from explicit offsets (``0:100-200,1:0-``), from times (``--from``/``--to``,
resolved with the broker's offsets-for-times: the first record at or after the time), or by
default the whole topic as it stands. An open end is the partition's end offset *now*, so a job
ends exactly when its range is done, however much live traffic arrives meanwhile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import TopicPartition

from streamer import kafka
from streamer.config import KafkaSettings
from streamer.errors import ConfigError

__all__ = ["Span", "parse_offsets", "parse_time_ms", "resolve_range"]


@dataclass(frozen=True, slots=True)
class Span:
    """Offsets ``[start, end)`` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


_OFFSETS = re.compile(r"^(\d+):(\d*)-(\d*)$")


def parse_offsets(text: str) -> dict[int, tuple[int | None, int | None]]:
    """``"0:100-200,1:50-,2:-10"`` -> ``{0: (100, 200), 1: (50, None), 2: (None, 10)}`` (end exclusive)."""
    out: dict[int, tuple[int | None, int | None]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _OFFSETS.match(part)
        if not m:
            raise ConfigError(f"bad offset range {part!r}: expected PARTITION:START-END, either end optional")
        p, start, end = int(m[1]), int(m[2]) if m[2] else None, int(m[3]) if m[3] else None
        if start is not None and end is not None and end < start:
            raise ConfigError(f"bad offset range {part!r}: end before start")
        out[p] = (start, end)
    return out


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"bad time {text!r}: give epoch milliseconds or ISO 8601 (2026-11-27T10:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


async def resolve_range(
    settings: KafkaSettings,
    topic: str,
    *,
    offsets: dict[int, tuple[int | None, int | None]] | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
) -> list[Span]:
    """The spans to replay, one per partition (only the named ones when ``offsets`` is given)."""
    consumer = kafka.consumer(settings, group_id=None)
    await kafka.start(settings, consumer)
    try:
        parts = await _partitions(settings, topic)
        if offsets:
            unknown = sorted(set(offsets) - set(parts))
            if unknown:
                raise ConfigError(f"topic {topic} has no partition {unknown[0]} (it has {len(parts)})")
            parts = sorted(offsets)
        tps = [TopicPartition(topic, p) for p in parts]
        first = await consumer.beginning_offsets(tps)
        last = await consumer.end_offsets(tps)
        lo = {tp: first[tp] for tp in tps}
        hi = {tp: last[tp] for tp in tps}
        if from_ms is not None:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, from_ms))
            lo = {tp: found[tp].offset if found.get(tp) else hi[tp] for tp in tps}
        if to_ms is not None:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, to_ms))
            hi = {tp: found[tp].offset if found.get(tp) else hi[tp] for tp in tps}
        for tp in tps:
            start, end = (offsets or {}).get(tp.partition, (None, None))
            if start is not None:
                lo[tp] = max(first[tp], start)
            if end is not None:
                hi[tp] = min(last[tp], end)
        return [Span(tp.partition, lo[tp], max(lo[tp], hi[tp])) for tp in tps]
    finally:
        await consumer.stop()


async def _partitions(settings: KafkaSettings, topic: str) -> list[int]:
    async with kafka.admin(settings) as admin:
        described = await admin.describe_topics([topic])
    found = [d for d in described if d["topic"] == topic and not d["error_code"]]
    if not found:
        raise ConfigError(f"topic {topic!r} does not exist on the cluster at {settings.bootstrap_servers} (or this "
                          "client may not read it): name another (--topic)")
    return sorted(int(p["partition"]) for p in found[0]["partitions"])
