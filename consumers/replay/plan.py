"""Replay jobs' shared facts: their consumer group, their plan in committed offsets, their summary, the one
lock that keeps two runs of a job apart, and the error result of a record that has no id of its own.

Both kinds of replay use them: the offline engine (``engine``) and ``--republish`` (``republish``). A
job's progress lives in the consumer group ``streamer-replay.<job>``: per partition of the range, the
next offset to do, with ``{"start": S, "end": E, "sink": B}`` as the offset metadata (the span, and the
sink checkpoint to cut back to on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import OffsetAndMetadata

from schemas import ErrorCode, ErrorInfo, InferenceResult
from streamer import kafka
from streamer.config import KafkaSettings
from streamer.errors import ConfigError

from .ranges import Span

__all__ = ["Plan", "ReplaySummary", "anonymous_error", "forget", "job_group", "job_running", "plan_metadata",
           "read_plan"]

log = logging.getLogger("streamer.replay")

RUN_SESSION_MS = 6_000  # the broker's least session timeout by default: a run that died lets go this soon


class _Paused(ConsumerRebalanceListener):  # type: ignore[misc]
    """Holds its partitions paused: the run-lock consumer is a member of its group, and fetches nothing."""

    def __init__(self) -> None:
        self.consumer: Any = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.consumer.pause(*assigned)


@contextlib.asynccontextmanager
async def job_running(settings: KafkaSettings, topic: str, job: str) -> AsyncIterator[None]:
    """Holds ``job`` for as long as this run lasts, so that two runs of one job never write into one sink together.

    The run is a member of the consumer group ``<job group>.run`` (subscribed to the job's topic, its partitions
    paused: it fetches nothing); runs are named by their start time, and the earliest member holds the job. A
    run that finds an earlier one refuses to start, naming the job, once it has waited one session timeout
    (a run that died leaves the group by then: a killed run's job can be resumed at once after that).
    """
    group = f"{job_group(job)}.run"
    me = f"streamer-replay-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    consumer = kafka.consumer(settings, group_id=group, client_id=me, session_timeout_ms=RUN_SESSION_MS,
                              heartbeat_interval_ms=RUN_SESSION_MS // 3, enable_auto_commit=False)
    listener = _Paused()
    listener.consumer = consumer
    consumer.subscribe([topic], listener=listener)
    await kafka.start(settings, consumer)
    keeper: asyncio.Task[None] | None = None
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RUN_SESSION_MS / 1000 + 3
        said = False
        while True:
            await consumer.getmany(timeout_ms=200)  # joins the group (and keeps this member alive)
            members = (await kafka.describe_group(settings, group))[1] if consumer.assignment() else []
            if me in members and min(members) == me:
                break
            if members and not said:
                log.warning("replay job %s: another run holds it (%s); waiting %d s in case it has died",
                            job, ", ".join(m for m in members if m != me), RUN_SESSION_MS // 1000)
                said = True
            if loop.time() > deadline:
                others = ", ".join(m for m in members if m != me) or "unknown"
                raise ConfigError(f"replay job {job!r} is already running (run {others}, a member of consumer group "
                                  f"{group!r}); let it finish, or give this run another --job")
            await asyncio.sleep(0.2)

        async def keep_alive() -> None:  # a member that stops polling is taken out of its group
            while True:
                await consumer.getmany(timeout_ms=1000)

        keeper = asyncio.create_task(keep_alive(), name="streamer-replay-run")
        yield
    finally:
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await consumer.stop()


def job_group(job: str) -> str:
    return f"streamer-replay.{job}"


@dataclass(frozen=True)
class Plan:
    """A job's range (``whole``), what is ``left`` of it, and the sink checkpoint its last commit recorded (None:
    the job never committed, a fresh start)."""

    whole: list[Span]
    left: list[Span]
    sink_at: int | None = None

    @property
    def size(self) -> int:
        return sum(s.size for s in self.whole)

    @property
    def done(self) -> int:
        """Records an earlier run of the job did."""
        return self.size - sum(s.size for s in self.left)


def anonymous_error(topic: str, partition: int, offset: int, model: str, code: ErrorCode, message: str,
                    stage: str | None = None) -> InferenceResult:
    """The error result of a record that has no readable id: it is named ``TOPIC:PARTITION:OFFSET`` (WIRE.md), so
    every offset of a replayed range is answered."""
    return InferenceResult(id=f"{topic}:{partition}:{offset}", model=model, status="error",
                           error=ErrorInfo(code=code, message=message, stage=stage))


@dataclass
class ReplaySummary:
    range_size: int
    done_before: int = 0  # records a stopped run of this job had done
    processed: int = 0  # records this run did
    statuses: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    complete: bool = False

    @classmethod
    def of(cls, plan: Plan) -> ReplaySummary:
        """A run's summary before it starts: the range, and what earlier runs did of it."""
        return cls(range_size=plan.size, done_before=plan.done)

    @property
    def rate(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"range_size": self.range_size, "done_before": self.done_before, "processed": self.processed,
                "ok": self.statuses["ok"], "errors": self.statuses["error"], "expired": self.statuses["expired"],
                "elapsed_s": round(self.elapsed_s, 3), "rate_per_s": round(self.rate, 1), "complete": self.complete}


async def read_plan(settings: KafkaSettings, topic: str, job: str, fresh: list[Span]) -> Plan:
    """A job's plan from its commits; ``fresh`` (all of it left) if it has none."""
    committed = await kafka.committed_offsets(settings, job_group(job))
    saved = {tp.partition: (om.offset, json.loads(om.metadata)) for tp, om in committed.items()
             if tp.topic == topic and om.metadata}
    if not saved:
        return Plan(fresh, fresh)
    whole = [Span(p, meta["start"], meta["end"]) for p, (_off, meta) in sorted(saved.items())]
    left = [Span(p, max(off, meta["start"]), meta["end"]) for p, (off, meta) in sorted(saved.items())]
    return Plan(whole, left, min(int(meta.get("sink", 0)) for _off, meta in saved.values()))


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
