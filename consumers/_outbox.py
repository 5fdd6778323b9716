"""Publishing a batch, where no record can fail anything but itself.

Each consumed record ends in exactly one of: its result (or forwarded stage message), a dead
letter (with an error result where the request can be answered), or, where even the dead
letter cannot be written, a logged drop counted in ``streamer_dropped_records``. What a record
carries (a reply route that is not allowed or does not exist, a partition out of range, an
output over the record size limit) is decided before anything is sent; what the cluster refuses
afterwards (a reply topic deleted meanwhile, a broker limit lower than ours) is settled when the
delivery fails, by the commit task (:meth:`Outbox.settle`). Only failures of the cluster itself
(our dead-letter or stage topic unreachable past the producer's retries) stop the worker, with
nothing committed past them.

Records are sent the way the data is shaped: appended to the producer's open record batch of each
destination partition, with one delivery future per record batch, not one ``send`` (a coroutine
and a future) per record. A record batch the broker refuses as too large is sent again one record
at a time, so that only the record at fault fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidTopicError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from schemas import ErrorCode, RoutingHeaders
from streamer.config import WorkerSettings
from streamer.kafka import KeyPartitions, append_open, append_record
from streamer.metrics import WorkerMetrics

from ._batch import FORWARDED, Batch, DeadLetter, Route, RunStats
from ._dead_letter import dead_letter_record
from ._inference import BatchRunner
from ._routes import ReplyRoutes

__all__ = ["Delivery", "Outbox"]

log = logging.getLogger("streamer.worker")

# Refusals that concern one record (its size, its topic's name or rights), whatever the cluster's health.
_RECORD_ERRORS = (MessageSizeTooLargeError, InvalidTopicError, TopicAuthorizationFailedError)
# Errors that a deleted topic gives, and a broker failover too: the record's only once the cluster says
# the topic is gone (a metadata request), else the cluster's.
_MAYBE_GONE = (UnknownTopicOrPartitionError, NotLeaderForPartitionError, LeaderNotAvailableError)
_HEADERS_SIZE = 200  # routing headers of a result or stage message, generously
# What the producer may raise when a record is handed to it; AssertionError: a partition it does not know.
_SEND_ERRORS = (*_RECORD_ERRORS, *_MAYBE_GONE, AssertionError, ValueError)
RESULT, FORWARD, DEAD_LETTER = "result", "forward", "dead_letter"


@dataclass(slots=True)
class Delivery:
    """Records sent together (one record batch), and the future the producer resolves when they are written."""

    future: Any
    batch: Batch
    kind: str  # RESULT | FORWARD | DEAD_LETTER
    topic: str
    partition: int | None  # None: a dead letter, partitioned by the producer
    indices: list[int]


class Outbox:
    def __init__(self, settings: WorkerSettings, runner: BatchRunner, route: Route, metrics: WorkerMetrics,
                 worker: str, stats: RunStats) -> None:
        self.settings = settings
        self.runner = runner
        self.route = route
        self.metrics = metrics
        self.worker = worker
        self.stats = stats
        self.routes = ReplyRoutes(settings)
        self.max_bytes = settings.max_record_bytes
        # Records the cluster refused as too large inside a transaction: redone, they are answered as such.
        self._too_large: set[tuple[TopicPartition, int]] = set()
        # Records of a record batch the cluster refused as too large inside a transaction: redone, each alone.
        self._alone: set[tuple[TopicPartition, int]] = set()
        self._partitions = KeyPartitions()

    async def publish(self, batch: Batch, producer: AIOKafkaProducer,
                      indices: Sequence[int] | None = None) -> list[Delivery]:
        """Send the records of ``batch`` (or of ``indices`` in it): results and forwarded messages by destination
        partition, then dead letters. Never raises for what a record holds."""
        todo = list(range(len(batch))) if indices is None else list(indices)
        topics = {batch.dest_topic[i] for i in todo
                  if batch.values[i] is not None and batch.status[i] != FORWARDED}
        topics.discard(None)
        if topics:
            await self.routes.resolve(producer, topics)  # type: ignore[arg-type]
        sent: list[Delivery] = []
        for _ in range(3):  # a forward that fails becomes an error result: one more round sends that
            groups: dict[tuple[str, str, int | None], list[int]] = {}
            refusals: dict[tuple[str, int | None], str | None] = {}  # the route policy's answer, once per route
            for i in todo:
                dest = self._destination(batch, i, producer, refusals)
                if dest is not None:
                    groups.setdefault(dest, []).append(i)
            retry: list[int] = []
            for (kind, topic, partition), idx in groups.items():
                retry += await self._send_group(batch, kind, topic, partition, idx, producer, sent)
            if not retry:
                break
            todo = retry
        for i in (range(len(batch)) if indices is None else indices):
            if i in batch.dead:
                d = await self._send_dead_letter(batch, i, producer)
                if d is not None:
                    sent.append(d)
        return sent

    # -- deciding where each record goes ------------------------------------------------------------
    def _destination(self, batch: Batch, i: int, producer: AIOKafkaProducer,
                     refusals: dict[tuple[str, int | None], str | None]) -> tuple[str, str, int | None] | None:
        """(kind, topic, partition) of record ``i``'s result or forwarded message; None if it has none to send.
        A record that may not be sent is decided here (an error result, or a dead letter alone)."""
        rec = batch.records[i]
        here = (batch.tp(i), rec.offset)
        for _ in range(3):
            value, topic = batch.values[i], batch.dest_topic[i]
            if value is None or topic is None:
                return None
            key = self._key(rec.key)
            size = len(value) + len(key or b"") + _HEADERS_SIZE
            if batch.status[i] == FORWARDED:
                if size > self.max_bytes or here in self._too_large:
                    self.runner.fail(batch, i, "model_error", f"stage output of {size} bytes is over the "
                                     f"{self.max_bytes}-byte record limit (max_record_bytes)")
                    continue
                return FORWARD, topic, None
            partition = batch.dest_partition[i]
            route = (topic, partition)
            if route in refusals:
                why = refusals[route]
            else:
                why = refusals[route] = self.routes.refuse(producer.client, topic, partition)
            if why is not None:
                self._no_reply(batch, i, "bad_route", why)
                return None
            if size > self.max_bytes or (here in self._too_large and batch.status[i] == "ok"):
                if batch.status[i] != "ok":  # an error result is small: only a vast id or message gets here
                    self._no_reply(batch, i, "undeliverable", f"error result of {size} bytes is over the record limit")
                    return None
                self.runner.fail(batch, i, "model_error", f"result of {size} bytes is over the {self.max_bytes}-byte "
                                 "record limit (max_record_bytes)", batch.timing(i))
                continue
            return RESULT, topic, partition
        return None

    def _key(self, key: bytes | None) -> bytes | None:
        return key if key is None or len(key) <= self.max_bytes // 4 else None

    def _no_reply(self, batch: Batch, i: int, code: ErrorCode, why: str) -> None:
        """The result cannot be sent: the dead letter says why (once: an error result's stays as it is)."""
        log.warning("%s: %s; dead-lettering it", batch.where(i), why)
        if i not in batch.dead:
            batch.dead[i] = DeadLetter(code, why)
        batch.values[i] = None
        batch.status[i] = None

    # -- sending ------------------------------------------------------------------------------------
    def _record(self, batch: Batch, i: int, kind: str) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        rec, value = batch.records[i], batch.values[i]
        assert value is not None
        if kind == FORWARD:
            msg = batch.messages[i]
            assert msg is not None
            key, headers = rec.key, RoutingHeaders(msg.id, msg.reply_to).build()
        else:
            rid = batch.ids[i]
            assert rid is not None
            key, headers = self._key(rec.key), RoutingHeaders(rid, None).build()
        if batch.spans is not None and self.runner.tracing is not None:  # tracing on: the record continues its trace
            headers += self.runner.tracing.headers(batch, i)
        return key, value, headers

    async def _send_group(self, batch: Batch, kind: str, topic: str, partition: int | None, idx: list[int],
                          producer: AIOKafkaProducer, sent: list[Delivery]) -> list[int]:
        """Send one destination's records in record batches; returns the records to decide again."""
        try:
            await producer.client._wait_on_metadata(topic)  # what producer.send does first (aiokafka 0.14)
        except _SEND_ERRORS as exc:
            return await self._refused(batch, kind, topic, idx, exc, producer)
        if partition is None:  # by key: split by the partition each key goes to
            parts: dict[int, list[int]] = {}
            for i in idx:
                parts.setdefault(self._partitions.partition(producer, topic, batch.records[i].key), []).append(i)
        else:
            parts = {partition: idx}
        retry: list[int] = []
        known = producer.client.cluster.partitions_for_topic(topic) or ()
        for p, members in parts.items():
            if p not in known:
                retry += await self._refused(batch, kind, topic, members, AssertionError(
                    f"partition {p} of {topic!r} is not known"), producer)
                continue
            tp, chunk = TopicPartition(topic, p), list[int]()
            current: Any = None  # the producer's record batch that the records of ``chunk`` went into
            for i in members:
                if (batch.tp(i), batch.records[i].offset) in self._alone:
                    retry += await self._submit(batch, kind, topic, p, [i], producer, sent)
                    continue
                key, value, headers = self._record(batch, i, kind)
                into = append_open(producer, tp, key, value, headers) or await append_record(
                    producer, tp, key, value, headers)
                if into is not current:
                    if chunk:
                        sent.append(Delivery(current.future, batch, kind, topic, p, chunk))
                        chunk = []
                    current = into
                chunk.append(i)
            if chunk:
                sent.append(Delivery(current.future, batch, kind, topic, p, chunk))
        return retry

    async def _submit(self, batch: Batch, kind: str, topic: str, partition: int, idx: list[int],
                      producer: AIOKafkaProducer, sent: list[Delivery]) -> list[int]:
        """Send one record alone (``idx`` holds one index)."""
        try:
            key, value, headers = self._record(batch, idx[0], kind)
            fut = await producer.send(topic, value, key=key, partition=partition, headers=headers)
        except _SEND_ERRORS as exc:
            return await self._refused(batch, kind, topic, idx, exc, producer)
        sent.append(Delivery(fut, batch, kind, topic, partition, idx))
        return []

    async def _refused(self, batch: Batch, kind: str, topic: str, idx: list[int], exc: BaseException,
                       producer: AIOKafkaProducer) -> list[int]:
        """Records the producer refused to take: their error results (returned, to send next), or dead letters
        alone; raises when the refusal is the cluster's, not the records'."""
        if kind == FORWARD:
            if not isinstance(exc, _RECORD_ERRORS):
                raise exc
            for i in idx:
                self.runner.fail(batch, i, "undeliverable", f"the stage message was refused: {exc!r}")
            return idx  # their error results are sent in the next round
        if isinstance(exc, _MAYBE_GONE) and not await self.routes.confirm_absent(producer, topic):
            raise exc
        for i in idx:
            self._no_reply(batch, i, "bad_route", f"the result could not be sent to {topic!r}: {exc!r}")
        return []

    async def _send_dead_letter(self, batch: Batch, i: int, producer: AIOKafkaProducer) -> Delivery | None:
        key, value, headers = dead_letter_record(batch.records[i], batch.dead[i], self.worker, self.max_bytes)
        topic = self.settings.dead_letter_topic
        try:
            fut = await producer.send(topic, value, key=key, headers=headers)
        except _RECORD_ERRORS as exc:
            self.drop(batch, i, exc)
            return None
        return Delivery(fut, batch, DEAD_LETTER, topic, None, [i])

    def drop(self, batch: Batch, i: int, exc: BaseException) -> None:
        """Even the dead letter could not be written: log it and count it."""
        self.metrics.labels(self.metrics.dropped).inc()
        log.warning("%s: the dead letter could not be written (%r); the record is dropped", batch.where(i), exc)

    # -- what the cluster refused after sending --------------------------------------------------------
    async def learn(self, delivery: Delivery, exc: BaseException, producer: AIOKafkaProducer) -> None:
        """A record batch of a transaction was refused; the transaction is redone, and this decides how its
        records end the next time: a reply topic the cluster says is gone is refused; a record batch too
        large is sent a record at a time, and a record too large alone is answered as such. Anything else
        (a broker failover) changes nothing: the redo sends it again."""
        batch, idx = delivery.batch, delivery.indices
        if delivery.kind == RESULT and isinstance(exc, _MAYBE_GONE):
            await self.routes.confirm_absent(producer, delivery.topic)
        elif isinstance(exc, MessageSizeTooLargeError) and len(self._too_large) + len(self._alone) < 100_000:
            where = self._alone if len(idx) > 1 else self._too_large
            where.update((batch.tp(i), batch.records[i].offset) for i in idx)

    async def settle(self, delivery: Delivery, exc: BaseException, producer: AIOKafkaProducer) -> list[Delivery]:
        """A delivery failed after it was sent. Returns what was sent instead (each record alone, or dead
        letters); raises ``exc`` when the failure is the cluster's, not the records'."""
        batch, kind, idx = delivery.batch, delivery.kind, delivery.indices
        if kind == DEAD_LETTER:
            if isinstance(exc, _RECORD_ERRORS):
                self.drop(batch, idx[0], exc)
                return []
            raise exc
        if isinstance(exc, MessageSizeTooLargeError) and len(idx) > 1:
            # The broker refused the record batch whole (its limit is under ours): nothing of it was written.
            # Each record alone finds out which of them is too large.
            sent: list[Delivery] = []
            for i in idx:
                assert delivery.partition is not None
                await self._submit(batch, kind, delivery.topic, delivery.partition, [i], producer, sent)
            return sent
        record_level = isinstance(exc, _RECORD_ERRORS) or (
            kind == RESULT and isinstance(exc, _MAYBE_GONE)
            and await self.routes.confirm_absent(producer, delivery.topic))
        if not record_level:
            raise exc  # the cluster's trouble (a failover longer than produce_timeout_ms): stop, commit nothing
        out: list[Delivery] = []
        for i in idx:
            if i in batch.dead:  # an error result: its dead letter, written already, is its outcome
                log.warning("%s: the error result could not be delivered (%r)", batch.where(i), exc)
                continue
            self.stats.dead_letters += 1
            dl = batch.dead[i] = DeadLetter("undeliverable", f"the {kind} could not be delivered: {exc!r}")
            log.warning("%s: %s", batch.where(i), dl.message)
            self.metrics.labels(self.metrics.dead_letters, "undeliverable").inc()
            d = await self._send_dead_letter(batch, i, producer)
            if d is not None:
                out.append(d)
        return out
