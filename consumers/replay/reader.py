"""A replay job's reader of its range: one partition at a time, and its progress committed with the plan.

Every partition of the range is assigned (so that each commit names them all, the plan with it) and
paused but the one being read, in partition order: the order, and so each batch a job forms, is fixed
by the range alone. A span may end at a transaction marker or a compacted gap, so the end is known by
the consumer's position as well as by the last record read.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from streamer import kafka
from streamer.config import KafkaSettings

from .plan import Plan, job_group, plan_metadata

__all__ = ["RangeReader"]


class RangeReader:
    """``plan``'s range of ``topic``, read as the consumer of the job's group; ``nxt`` is the next offset to do of
    each partition, advanced by the job (:meth:`done`) once a record's outcome is safe, and committed by
    :meth:`commit`."""

    def __init__(self, settings: KafkaSettings, topic: str, job: str, plan: Plan, consumer: Any = None,
                 **consumer_options: Any) -> None:
        self.settings = settings
        self.spans = {TopicPartition(topic, s.partition): s for s in plan.whole}
        self.nxt = {TopicPartition(topic, s.partition): s.start for s in plan.left}
        self._last: dict[TopicPartition, int] = {}  # of a span read to its end: its last record's offset
        self.consumer = consumer or kafka.consumer(settings, group_id=job_group(job), enable_auto_commit=False,
                                                   isolation_level="read_committed", **consumer_options)

    async def start(self) -> None:
        """Join nothing (the partitions are assigned, not subscribed), and record the plan before any output."""
        await kafka.start(self.settings, self.consumer)
        self.consumer.assign(sorted(self.spans))
        for tp, offset in self.nxt.items():
            self.consumer.seek(tp, offset)
        self.consumer.pause(*self.spans)
        await self.commit()

    async def stop(self) -> None:
        await self.consumer.stop()

    def pending(self) -> list[TopicPartition]:
        """Partitions with records left, in partition order."""
        return sorted((tp for tp, offset in self.nxt.items() if offset < self.spans[tp].end),
                      key=lambda tp: tp.partition)

    async def records(self, tp: TopicPartition, max_records: int) -> AsyncGenerator[list[ConsumerRecord], None]:
        """``tp``'s records from its next offset to its span's end, in chunks of at most ``max_records``."""
        end = self.spans[tp].end
        last: int | None = None
        self.consumer.resume(tp)
        try:
            while True:
                fetched = (await self.consumer.getmany(tp, timeout_ms=200, max_records=max_records)).get(tp, [])
                chunk = [r for r in fetched if r.offset < end]
                if chunk:
                    last = chunk[-1].offset
                    yield chunk
                if (fetched and fetched[-1].offset >= end - 1) or await self.consumer.position(tp) >= end:
                    break
        finally:
            self.consumer.pause(tp)
        if last is None or self.nxt.get(tp) == last + 1:
            self.nxt[tp] = end  # all it read is done (or it held nothing but markers and gaps)
        else:
            self._last[tp] = last  # the span is done when its last record is

    def done(self, record: ConsumerRecord) -> None:
        """``record``'s outcome is safe (written to the sink, or acknowledged by the broker): the job goes on after
        it, or after its span's end if it was the span's last record."""
        tp = TopicPartition(record.topic, record.partition)
        self.nxt[tp] = self.spans[tp].end if self._last.get(tp) == record.offset else record.offset + 1

    @property
    def complete(self) -> bool:
        return all(self.nxt.get(tp, span.end) >= span.end for tp, span in self.spans.items())

    async def commit(self, sink_at: int = 0) -> None:
        """The next offset of every partition of the range, with its span and the sink's checkpoint."""
        await self.consumer.commit({tp: OffsetAndMetadata(self.nxt.get(tp, span.end), plan_metadata(span, sink_at))
                                    for tp, span in self.spans.items()})

