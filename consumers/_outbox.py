"""Publishing a batch's outcomes, where no record can fail anything but itself.

Each consumed record ends in exactly one of: its result (or forwarded stage message), a dead
letter (with an error result where the request can be answered), or, where even the dead
letter cannot be written, a logged drop counted in ``streamer_dropped_records``. What a record
carries (a reply route that is not allowed or does not exist, a partition out of range, an
output over the record size limit) is decided before anything is sent; what the cluster refuses
afterwards (a reply topic deleted meanwhile, a broker limit lower than ours) is settled when the
delivery fails, by the commit task (:meth:`Outbox.settle`). Only failures of the cluster itself
(our dead-letter or stage topic unreachable past the producer's retries) stop the worker, with
nothing committed past them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from schemas import REQUEST_ID_HEADER, Codec, RoutingHeaders, WireError, header_text
from streamer.config import WorkerSettings
from streamer.metrics import WorkerMetrics

from ._dead_letter import send_dead_letter
from ._inference import BatchRunner
from ._items import DeadLetter, Outcome, Route
from ._routes import ReplyRoutes

__all__ = ["Delivery", "Outbox"]

log = logging.getLogger("streamer.worker")

# Refusals that concern one record (its size, its topic's name or rights), whatever the cluster's health.
_RECORD_ERRORS = (MessageSizeTooLargeError, InvalidTopicError, TopicAuthorizationFailedError)
# Errors that a deleted topic gives, and a broker failover too: the record's only once the cluster says
# the topic is gone (a metadata request), else the cluster's.
_MAYBE_GONE = (UnknownTopicOrPartitionError, NotLeaderForPartitionError, LeaderNotAvailableError)
_HEADERS_SIZE = 200  # routing headers of a result or stage message, generously

Delivery = tuple[Any, Outcome, str]  # (delivery future, its outcome, "result" | "forward" | "dead_letter")


class Outbox:
    def __init__(self, settings: WorkerSettings, codec: Codec, runner: BatchRunner, route: Route,
                 metrics: WorkerMetrics, worker: str) -> None:
        self.settings = settings
        self.codec = codec
        self.runner = runner
        self.route = route
        self.metrics = metrics
        self.worker = worker
        self.routes = ReplyRoutes(settings)
        self.max_bytes = settings.max_record_bytes
        # Records the cluster refused as too large inside a transaction: redone, they are answered as such.
        self._too_large: set[tuple[Any, int]] = set()

    async def prepare(self, outcomes: Sequence[Outcome], producer: AIOKafkaProducer) -> None:
        """Learn, in one metadata request, whether the reply topics of this batch that are new exist."""
        topics = {o.reply_topic for o in outcomes if o.reply_topic is not None and o.result is not None}
        if topics:
            await self.routes.resolve(producer.client, topics)

    async def send(self, outcome: Outcome, producer: AIOKafkaProducer) -> list[Delivery]:
        """Enqueue the records of one outcome; never raises for what the record holds."""
        sent: list[Delivery] = []
        if outcome.forward is not None:
            fut = await self._send_forward(outcome, producer)
            if fut is not None:
                sent.append((fut, outcome, "forward"))
        if outcome.result is not None and outcome.reply_topic is not None:
            fut = await self._send_result(outcome, producer)
            if fut is not None:
                sent.append((fut, outcome, "result"))
        if outcome.dead_letter is not None:
            fut = await self._send_dead_letter(outcome, producer)
            if fut is not None:
                sent.append((fut, outcome, "dead_letter"))
        return sent

    async def _send_forward(self, outcome: Outcome, producer: AIOKafkaProducer) -> Any:
        msg, item = outcome.forward, outcome.item
        assert msg is not None and self.route.next_topic is not None
        try:
            value = self.codec.encode(msg)
        except (WireError, TypeError) as exc:
            self.runner.fail(outcome, "model_error", f"stage output cannot be encoded: {exc}", None)
            return None
        size = len(value) + len(item.key or b"") + _HEADERS_SIZE
        if size > self.max_bytes or (item.tp, item.offset) in self._too_large:
            self.runner.fail(outcome, "model_error", f"stage output of {size} bytes is over the "
                             f"{self.max_bytes}-byte record limit (max_record_bytes)", None)
            return None
        try:
            return await producer.send(self.route.next_topic, value, key=item.key,
                                       headers=RoutingHeaders(msg.id, msg.reply_to).build())
        except _RECORD_ERRORS as exc:
            self.runner.fail(outcome, "undeliverable", f"the stage message was refused: {exc!r}", None)
            return None

    async def _send_result(self, outcome: Outcome, producer: AIOKafkaProducer) -> Any:
        result, item = outcome.result, outcome.item
        assert result is not None and outcome.reply_topic is not None
        why = self.routes.refuse(producer.client, outcome.reply_topic, outcome.reply_partition)
        if why is not None:
            self._no_reply(outcome, "bad_route", why)
            return None
        try:
            value = self.codec.encode_result(result)
        except (WireError, TypeError) as exc:
            # The model's output cannot go on the wire: an error result, and a dead letter.
            self.runner.fail(outcome, "model_error", f"output cannot be encoded: {exc}", result.timings)
            return await self._send_result(outcome, producer)
        key = item.key if item.key is None or len(item.key) <= self.max_bytes // 4 else None
        size = len(value) + len(key or b"") + _HEADERS_SIZE
        if size > self.max_bytes or ((item.tp, item.offset) in self._too_large and result.status == "ok"):
            if result.status == "error":  # an error result is small: only a vast id or message gets here
                self._no_reply(outcome, "undeliverable", f"error result of {size} bytes is over the record limit")
                return None
            self.runner.fail(outcome, "model_error", f"result of {size} bytes is over the {self.max_bytes}-byte "
                             "record limit (max_record_bytes)", result.timings)
            return await self._send_result(outcome, producer)
        try:
            return await producer.send(outcome.reply_topic, value, key=key, partition=outcome.reply_partition,
                                       headers=RoutingHeaders(result.id, None).build())
        except (*_RECORD_ERRORS, *_MAYBE_GONE, AssertionError, ValueError) as exc:  # Assertion: a bad partition
            if isinstance(exc, _MAYBE_GONE) and not await self.routes.confirm_absent(producer.client,
                                                                                     outcome.reply_topic):
                raise
            self._no_reply(outcome, "bad_route", f"the result could not be sent to {outcome.reply_topic!r}: {exc!r}")
            return None

    def _no_reply(self, outcome: Outcome, code: str, why: str) -> None:
        """The result cannot be sent: the dead letter says why (once: an error result's stays as it is)."""
        log.warning("%s: %s; dead-lettering it", _who(outcome), why)
        if outcome.dead_letter is None:
            self.runner.stats.dead_letters += 1
            outcome.dead_letter = DeadLetter(code, why)
        outcome.result = None

    async def _send_dead_letter(self, outcome: Outcome, producer: AIOKafkaProducer) -> Any:
        assert outcome.dead_letter is not None
        try:
            return await send_dead_letter(producer, self.settings.dead_letter_topic, outcome.item,
                                          outcome.dead_letter, self.worker, self.max_bytes)
        except _RECORD_ERRORS as exc:
            self.drop(outcome, exc)
            return None

    def drop(self, outcome: Outcome, exc: BaseException) -> None:
        """Even the dead letter could not be written: log it and count it."""
        self.metrics.labels(self.metrics.dropped).inc()
        log.warning("%s: the dead letter could not be written (%r); the record is dropped", _who(outcome), exc)

    async def learn(self, delivery: Delivery, exc: BaseException, producer: AIOKafkaProducer) -> None:
        """A record of a transaction was refused; the transaction is redone, and this decides how the
        record ends the next time: a reply topic the cluster says is gone is refused, a result too large
        is an error. Anything else (a broker failover) changes nothing: the redo sends it again."""
        _fut, outcome, kind = delivery
        if kind == "result" and isinstance(exc, _MAYBE_GONE) and outcome.reply_topic is not None:
            await self.routes.confirm_absent(producer.client, outcome.reply_topic)
        elif isinstance(exc, MessageSizeTooLargeError) and len(self._too_large) < 100_000:
            self._too_large.add((outcome.item.tp, outcome.item.offset))

    async def settle(self, delivery: Delivery, exc: BaseException, producer: AIOKafkaProducer) -> Any:
        """A delivery failed after it was sent. Returns the future of the dead letter written instead,
        or None; raises ``exc`` when the failure is the cluster's, not the record's."""
        _fut, outcome, kind = delivery
        if kind == "dead_letter":
            if isinstance(exc, _RECORD_ERRORS):
                self.drop(outcome, exc)
                return None
            raise exc
        record_level = isinstance(exc, _RECORD_ERRORS) or (
            kind == "result" and isinstance(exc, _MAYBE_GONE) and outcome.reply_topic is not None
            and await self.routes.confirm_absent(producer.client, outcome.reply_topic))
        if not record_level:
            raise exc  # the cluster's trouble (a failover longer than produce_timeout_ms): stop, commit nothing
        if outcome.dead_letter is not None:  # an error result: its dead letter, written already, is its outcome
            log.warning("%s: the error result could not be delivered (%r)", _who(outcome), exc)
            return None
        self.runner.stats.dead_letters += 1
        outcome.dead_letter = DeadLetter("undeliverable", f"the {kind} could not be delivered: {exc!r}")
        log.warning("%s: %s", _who(outcome), outcome.dead_letter.message)
        self.metrics.labels(self.metrics.dead_letters, "undeliverable").inc()
        return await self._send_dead_letter(outcome, producer)


def _who(outcome: Outcome) -> str:
    item = outcome.item
    rid = item.message.id if item.message is not None else header_text(item.headers, REQUEST_ID_HEADER)
    return f"{item.tp.topic}-{item.tp.partition}@{item.offset} (request {(rid or '?')[:128]})"
