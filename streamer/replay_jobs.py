"""Replay jobs' shared facts: their consumer group, their plan in committed offsets, their summary.

Both kinds of replay use them: the offline engine (``consumers.replay``) and ``--republish``
(``producers.replay``). A job's progress lives in the consumer group ``streamer-replay.<job>``:
per partition of the range, the next offset to do, with ``{"start": S, "end": E, "sink": B}`` as
the offset metadata (the span, and the sink checkpoint to cut back to on resume).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka.structs import OffsetAndMetadata

from . import kafka
from .config import KafkaSettings
from .ranges import Span

__all__ = ["ReplaySummary", "forget", "job_group", "plan_metadata", "read_plan"]


def job_group(job: str) -> str:
    return f"streamer-replay.{job}"


@dataclass
class ReplaySummary:
    range_size: int
    done_before: int = 0  # records a stopped run of this job had done
    processed: int = 0  # records this run did
    statuses: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    complete: bool = False

    @property
    def rate(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"range_size": self.range_size, "done_before": self.done_before, "processed": self.processed,
                "ok": self.statuses["ok"], "errors": self.statuses["error"], "expired": self.statuses["expired"],
                "elapsed_s": round(self.elapsed_s, 3), "rate_per_s": round(self.rate, 1), "complete": self.complete}


async def read_plan(settings: KafkaSettings, topic: str, job: str,
                    fresh: list[Span]) -> tuple[list[Span], list[Span], int | None]:
    """A job's plan from its commits: (whole range, what is left, sink checkpoint); ``fresh`` if it has none."""
    committed = await kafka.committed_offsets(settings, job_group(job))
    saved = {tp.partition: (om.offset, json.loads(om.metadata)) for tp, om in committed.items()
             if tp.topic == topic and om.metadata}
    if not saved:
        return fresh, fresh, None
    whole = [Span(p, meta["start"], meta["end"]) for p, (_off, meta) in sorted(saved.items())]
    left = [Span(p, max(off, meta["start"]), meta["end"]) for p, (off, meta) in sorted(saved.items())]
    return whole, left, min(int(meta.get("sink", 0)) for _off, meta in saved.values())


def plan_metadata(span: Span, sink: int = 0) -> str:
    return json.dumps({"start": span.start, "end": span.end, "sink": sink})


async def forget(settings: KafkaSettings, topic: str, job: str) -> None:
    """Drop a job's progress: its commits lose their plan, so the next run starts afresh."""
    committed = await kafka.committed_offsets(settings, job_group(job))
    tps = [tp for tp in committed if tp.topic == topic]
    if not tps:
        return
    consumer = kafka.consumer(settings, group_id=job_group(job), enable_auto_commit=False)
    await kafka.start(settings, consumer)
    try:
        consumer.assign(tps)
        await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in tps})
    finally:
        await consumer.stop()
