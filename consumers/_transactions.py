"""Exactly-once delivery: results and consumed offsets in Kafka transactions, one open at a time per worker.

One transactional producer per worker (``transactional.id`` = ``<group>.<worker>``) carries the results of all
its partitions, and their offsets, in one transaction. Zombies are fenced by the consumer group (KIP-447): the
offsets go to the group coordinator with the generation of the assignment they were read under
(``_group_fencing``), which refuses them once the group has moved on, so a worker that lost its partitions
cannot commit a transaction over them. (aiokafka alone fences by transactional id only, which takes one
producer per input partition: four partitions were four transactions, each five round trips to the
coordinators, that shared a two-core machine with the broker; one per worker cut the p50 at a fixed rate.)

A partition taken over (``take``) stays paused until the group's offset for it is stable: a previous owner's
last transaction may still hold offsets for it, and reading the offset committed before that transaction would
process its records twice. The offsets are fetched with ``require_stable``, which answers
``UNSTABLE_OFFSET_COMMIT`` until that transaction is complete. A previous owner that is alive completes it when
its partitions are revoked; one that died leaves it open. Every commit names its committer in the offsets'
metadata, and the new owner fences that transactional id (starting a producer with that id aborts its open
transaction) when no member of the group has it any more (the members' cards carry their ids), or when the
offsets stay unstable for ``_FENCE_AFTER_S``: a dead owner's open transaction would otherwise hold back the
group's offsets and every ``read_committed`` reader of its records until it timed out.

A transaction spans a window of batches (like Kafka Streams' ``commit.interval.ms``): it stays open while the
next batch is already at hand, for at most ``transaction_ms``, and is committed at once when the worker has
nothing more to do, so light load keeps its latency and saturation does not pay a commit per batch. After an
error whose outcome is unknown (a commit whose answer was lost), nothing is guessed: the producer is discarded
and the transaction's partitions are taken over again, so that the replacement's start settles the
transaction (aborted if it was open, kept if it was committed) and the stable offsets say where to go on.
Records and offsets the broker refuses while it verifies the transaction (KIP-890) are retried within ms
(``_verification``), not after aiokafka's 100 ms.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError
from aiokafka.producer import sender as _sender

from streamer import kafka
from streamer.assignors import MemberCard
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError, TlsFailed
from streamer.metrics import WorkerMetrics
from streamer.status import member_cards

from ._batch import Batch
from ._group_fencing import Committed, Member, UnstableOffsets, fetch_offsets, group_commit
from ._outbox import Delivery, Outbox
from ._routes import ReplyRoutes
from ._verification import retry_refusals_soon

__all__ = ["TransactionWindows"]

log = logging.getLogger("streamer.worker")

# A transaction's first AddPartitionsToTxn right after the previous commit is refused (CONCURRENT_TRANSACTIONS)
# until the broker has written the commit's markers, a few ms later; aiokafka (0.14) retries it after a fixed
# 20 ms, which was most of a transaction's time here (47 ms a cycle against 26 with 3 ms, on one broker).
_sender.BACKOFF_OVERRIDE = 0.003
# How long a partition's offsets may stay unstable before the transactional id that last committed them is
# fenced: a live previous owner completes its transaction when its partitions are revoked, well within this.
_FENCE_AFTER_S = 2.0


@dataclass(slots=True)
class _Window:
    producer: AIOKafkaProducer
    opened: float  # time.monotonic()
    last: dict[TopicPartition, int] = field(default_factory=dict)  # the last offset covered, per partition
    items: int = 0  # the batches' items published into it
    sent: list[Delivery] = field(default_factory=list)
    broken: bool = False  # a publish into it was interrupted: it may hold records past ``last``; never commit it


class TransactionWindows:
    """The worker's open transaction, from its first batch to its commit, and the takeover of partitions.

    ``void(tp)`` is the worker's: forget what it holds of ``tp`` (a transaction failed); what is read of it next
    comes through ``take``.
    """

    def __init__(self, settings: WorkerSettings, worker: str, outbox: Outbox, consumer: AIOKafkaConsumer,
                 void: Callable[[TopicPartition], None], metrics: WorkerMetrics) -> None:
        self.settings = settings
        # Unique per process: a worker started again must not fence the one before it by id (a zombie could
        # fence it back); a dead one's open transaction is fenced through the offsets' metadata instead.
        self.transactional_id = f"{settings.group_id}.{worker}.{uuid.uuid4().hex[:8]}"
        self.outbox = outbox
        self.consumer = consumer
        self.void = void
        self.member = Member(-1, "", settings.group_instance_id)  # as of the assignment in hand
        self.taking: dict[TopicPartition, asyncio.Task[None]] = {}  # paused until their offsets are stable
        self.error: BaseException | None = None  # a takeover that cannot succeed: the worker stops with it
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Future[AIOKafkaProducer] | None = None
        self._window: _Window | None = None
        self._span_s = settings.transaction_ms / 1000
        # Prometheus children bound once; observed once per transaction (its outcome is the count of them).
        m = metrics
        self._outcomes = {o: m.labels(m.transactions, o) for o in ("committed", "failed")}
        self._phases = [m.labels(m.transaction_time, phase) for phase in ("open", "deliver", "end")]
        self._items = m.labels(m.transaction_items)
        self.fenced_others = 0  # transactional ids of previous owners fenced in a takeover
        self._lock = asyncio.Lock()

    # -- the producer -------------------------------------------------------------------------------------
    async def producer(self) -> AIOKafkaProducer:
        """The worker's transactional producer, started (which settles its id's last transaction) if need be."""
        if self._producer is not None:
            return self._producer
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        starting = self._starting
        try:
            return await asyncio.shield(starting)
        finally:
            if starting.done() and self._starting is starting:
                self._starting = None

    async def _start(self) -> AIOKafkaProducer:
        producer = self._new_producer(self.transactional_id)
        group_commit(producer, lambda: self.member, self.transactional_id, self.settings.group_id)
        drop_gone_partitions(producer, self.outbox.routes)
        retry_refusals_soon(producer)
        try:
            await kafka.start(self.settings, producer)
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        return producer

    def _new_producer(self, transactional_id: str) -> AIOKafkaProducer:
        # A short transaction timeout bounds how long a frozen owner's open transaction can hold back
        # read_committed readers when nothing else aborts it.
        return kafka.producer(self.settings, transactional_id=transactional_id,
                              client_id=f"{self.settings.client_id}-txn",
                              transaction_timeout_ms=max(10_000, 2 * self.settings.session_timeout_ms),
                              max_batch_size=self.settings.producer_batch_bytes,
                              request_timeout_ms=self.settings.produce_timeout_ms)

    async def _discard(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.settings.shutdown_timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.warning("closing the transactional producer failed: %r", exc)

    async def _fence(self, transactional_id: str, why: str) -> None:
        """Start and stop a producer with a previous owner's id: its open transaction is aborted."""
        log.warning("fencing %s, the last to commit partitions taken over: %s", transactional_id, why)
        producer = self._new_producer(transactional_id)
        try:
            await kafka.start(self.settings, producer)
        finally:
            await producer.stop()
        self.fenced_others += 1

    # -- taking partitions over ---------------------------------------------------------------------------
    def assigned(self, member: Member, tps: Iterable[TopicPartition]) -> None:
        """A new assignment: its offsets are committed as ``member``; ``tps`` are taken over."""
        self.member = member
        self.take(tps)

    def take(self, tps: Iterable[TopicPartition]) -> None:
        """Read ``tps`` only from offsets that no open transaction is about to move. Taken over together, and
        readable at once, so that the first fetch serves them all (resumed one by one, the first could fill the
        queue while the others wait)."""
        todo = [tp for tp in tps if tp not in self.taking]
        if not todo:
            return
        self.consumer.pause(*todo)
        task = asyncio.create_task(self._take(todo), name=f"streamer-take-{len(todo)}")
        for tp in todo:
            self.taking[tp] = task

    async def _take(self, tps: list[TopicPartition]) -> None:
        backoff = 0.1
        try:
            while True:
                try:
                    await self.producer()  # settles our own last transaction, if it was left open
                    await self._fence_the_gone(tps)
                    committed = await self._stable_offsets(tps)
                    break
                except (KafkaError, BrokerError) as exc:
                    # A cluster that does not answer now (a broker restarting) is waited for, as the consumer
                    # does; refused credentials or certificates and non-retriable refusals stop the worker.
                    waiting = isinstance(exc, KafkaTimeoutError) or getattr(exc, "retriable", True)
                    if isinstance(exc, AuthenticationFailed | TlsFailed) or not waiting:
                        raise
                    log.warning("%s: taking them over failed (%s); retrying in %.1f s",
                                ", ".join(f"{tp.topic}-{tp.partition}" for tp in tps), exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 2.0)
            for tp in tps:
                if tp not in self.consumer.assignment():
                    continue
                at = committed.get(tp)
                if at is None:
                    await self.consumer.seek_to_beginning(tp)  # as a worker's consumer resets (streamer.kafka)
                else:
                    self.consumer.seek(tp, at)
            mine = self.consumer.assignment()  # as of now: the seeks above may have waited
            self.consumer.resume(*(tp for tp in tps if tp in mine))
        except Exception as exc:  # noqa: BLE001 - handed to the worker's fetch loop, which stops with it
            log.error("cannot take %s over: %r", tps, exc)  # noqa: TRY400 - raised again there
            self.error = exc
        finally:
            for tp in tps:
                if self.taking.get(tp) is asyncio.current_task():
                    del self.taking[tp]

    async def _fence_the_gone(self, tps: list[TopicPartition]) -> None:
        """Fence the transactional ids that last committed ``tps`` (the offsets' metadata) and that no member of
        the group has any more: a worker that died (or was expelled) may have left a transaction open, whose
        records hold back every ``read_committed`` reader of their partitions until it times out (SIGKILLed
        workers held results back 12-15 s so). A live previous owner completed its transaction on revoke."""
        before = await self._fetch(tps, stable=False)
        owners = {c.metadata for c in before.values() if c is not None and c.metadata} - {self.transactional_id}
        if not owners:
            return
        live = {card.txn for card in await self._members()}
        for owner in sorted(owners - live):
            await self._fence(owner, "no member of the group has it")

    async def _members(self) -> list[MemberCard]:
        return await member_cards(self.settings, self.settings.group_id)

    async def _stable_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's offsets of ``tps`` once no open transaction holds any: waited for while their owners may
        complete them, then their transactional ids (the offsets' metadata) fenced."""
        fence_at = time.monotonic() + _FENCE_AFTER_S
        fenced: set[str] = set()
        while True:
            mine = self.consumer.assignment()
            tps = [tp for tp in tps if tp in mine]  # never wait on, or fence for, a partition gone to another
            if not tps:
                return {}
            try:
                stable = await self._fetch(tps, stable=True)
                return {tp: None if c is None else c.offset for tp, c in stable.items()}
            except UnstableOffsets as exc:
                if time.monotonic() >= fence_at:
                    before = await self._fetch(exc.tps or tps, stable=False)
                    owners = {c.metadata for c in before.values() if c is not None and c.metadata}
                    for owner in sorted(owners - fenced - {self.transactional_id}):
                        await self._fence(owner, f"its offsets stayed in an open transaction {_FENCE_AFTER_S:g} s")
                        fenced.add(owner)
                    fence_at = time.monotonic() + _FENCE_AFTER_S
                await asyncio.sleep(0.02)

    async def _fetch(self, tps: list[TopicPartition], *, stable: bool) -> dict[TopicPartition, Committed | None]:
        return await fetch_offsets(self.consumer, self.settings.group_id, tps, stable=stable)

    async def _stop_taking(self, tps: Iterable[TopicPartition]) -> None:
        """Stop taking ``tps`` over (revoked, or the worker stops). Partitions taken over together with them that
        stay ours are taken over again on their own."""
        gone = set(tps)
        tasks = {task for tp in gone if (task := self.taking.get(tp)) is not None}
        others = [tp for tp, task in self.taking.items() if task in tasks and tp not in gone]
        for tp in [*gone, *others]:
            self.taking.pop(tp, None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if others:
            self.take(others)

    # -- the window -----------------------------------------------------------------------------------------
    async def publish(self, batch: Batch, current_epoch: Callable[[TopicPartition], int]) -> None:
        """Send the batch's outputs in the open transaction (opened here if none is)."""
        epochs = {run.tp: run.epoch for run in batch.runs}
        live = {tp for tp, epoch in epochs.items() if epoch == current_epoch(tp) and tp not in self.taking}
        if not live:
            return  # revoked or voided since it was fetched: whoever reads it next does it
        # All of the batch, as a rule: a list of its items only when some of its partitions were voided.
        idx = None if len(live) == len(epochs) else [i for i in range(len(batch)) if batch.tp(i) in live]
        w = self._window
        try:
            if w is None:
                producer = await self.producer()
                await producer.begin_transaction()
                w = self._window = _Window(producer, time.monotonic())
            try:
                w.sent += await self.outbox.publish(batch, w.producer, idx)
            except BaseException:
                w.broken = True
                raise
            w.items += len(batch) if idx is None else len(idx)
            for run in batch.runs:  # in offset order: the last run of a partition has its last offset
                if run.tp in live:
                    w.last[run.tp] = run.records[-1].offset
        except KafkaError as exc:
            await self._failed(exc, live)

    def left_s(self) -> float | None:
        """Seconds until the open transaction is due for its commit (None: none is open)."""
        w = self._window
        return None if w is None else max(0.0, w.opened + self._span_s - time.monotonic())

    def due(self) -> bool:
        """Whether the transaction has been open for ``transaction_ms``."""
        return self.left_s() == 0.0

    async def commit(self) -> None:
        """Commit the open transaction once its records and its offsets are in. The offsets go to the group
        coordinator while the records are on their way (a commit takes one round trip less than one after the
        other): they are part of the transaction, so a record refused aborts them with it."""
        async with self._lock:  # a revoke's release and the process loop may both commit
            w, self._window = self._window, None
            if w is None:
                return
            if w.broken:
                await self._failed(KafkaError("a publish into the transaction was interrupted"), set(w.last))
                return
            offsets: asyncio.Future[None] | None = None
            try:
                started = time.monotonic()
                if w.last:
                    offsets = asyncio.ensure_future(w.producer.send_offsets_to_transaction(
                        {tp: last + 1 for tp, last in w.last.items()}, self.settings.group_id))
                await self._delivered(w.sent, w.producer)
                if offsets is not None:
                    await offsets
                delivered = time.monotonic()
                await w.producer.commit_transaction()
                self._committed(w, started, delivered)
            except KafkaError as exc:
                await self._failed(exc, set(w.last))
            finally:
                if offsets is not None:  # records refused (the transaction aborts) or the commit cancelled
                    offsets.cancel()  # no-op once done
                    offsets.add_done_callback(_retrieve)

    def _committed(self, w: _Window, started: float, delivered: float) -> None:
        open_s, deliver_s, end_s = started - w.opened, delivered - started, time.monotonic() - delivered
        for child, seconds in zip(self._phases, (open_s, deliver_s, end_s), strict=True):
            child.observe(seconds)
        self._items.observe(w.items)
        self._outcomes["committed"].inc()

    async def _delivered(self, sent: list[Delivery], producer: AIOKafkaProducer) -> None:
        """Wait for a transaction's records. A record the cluster refused is learnt from (its reply topic
        is gone, say) and the transaction aborts: it is redone from its start, and this time the record's
        outcome is its dead letter."""
        answers = await asyncio.gather(*(d.future for d in sent), return_exceptions=True)
        for delivery, answer in zip(sent, answers, strict=True):
            if isinstance(answer, Exception):
                await self.outbox.learn(delivery, answer, producer)
                raise answer

    async def _failed(self, exc: KafkaError, tps: set[TopicPartition]) -> None:
        """Unknown outcome, or refused (the group moved on, another owner fenced this worker's id): never guess.
        The producer goes, and ``tps`` are taken over again: the next producer's start aborts the transaction if
        it is still open, and the stable offsets then say where to go on."""
        if self._window is not None:
            tps |= set(self._window.last)
            self._window = None
        self._outcomes["failed"].inc()
        log.warning("transaction failed (%r); settling it and going on from the committed offsets of %s", exc,
                    sorted(f"{tp.topic}-{tp.partition}" for tp in tps))
        await self._discard()
        for tp in tps:
            self.void(tp)
        mine = self.consumer.assignment()
        self.take([tp for tp in tps if tp in mine])

    async def release(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions taken from us: commit what is open (a rebalance takes all of them). A commit that fails
        here (the group moved on already) starts no takeover of them: their next owner reads them."""
        tps = list(tps)
        await self._stop_taking(tps)
        await self.commit()
        await self._stop_taking(tps)

    async def close(self) -> None:
        await self._stop_taking(list(self.taking))
        await self.commit()
        await self._discard()


class _AddPartitions(_sender.AddPartitionsToTxnHandler):  # type: ignore[misc]
    """aiokafka's AddPartitionsToTxn, noting the topics the cluster said it does not know."""

    def __init__(self, sender: Any, tps: Any) -> None:
        super().__init__(sender, tps)
        self.unknown: set[str] = set()

    def handle_response(self, resp: Any) -> float | None:
        self.unknown = {topic for topic, partitions in resp.errors for _, code in partitions
                        if code == UnknownTopicOrPartitionError.errno}
        retry: float | None = super().handle_response(resp)
        return retry


def drop_gone_partitions(producer: AIOKafkaProducer, routes: ReplyRoutes) -> None:
    """Make ``producer`` drop from the partitions waiting to join its transaction those of a topic the cluster
    says is gone (a client's reply topic, deleted as the client closed). aiokafka would ask to add them again
    for ever, and the broker adds none of a request's partitions while one is unknown (the others are
    OPERATION_NOT_ATTEMPTED): no record of the transaction would go, and its commit would wait for ever (a
    reply topic deleted after the outbox checked its route, while the producer's metadata still had it). The
    record batches held for the topic fail (``ReplyRoutes.mark_absent``), so the transaction aborts and is redone,
    their outcome this time a dead letter. Before the producer starts."""
    sender = producer._sender
    txn = producer._txn_manager

    async def _do_add_partitions_to_txn(tps: Any) -> bool:
        node_id = await sender._find_coordinator(CoordinationType.TRANSACTION, txn.transactional_id)
        handler = _AddPartitions(sender, tps)
        done: bool = await handler.do(node_id)
        for topic in sorted(handler.unknown):
            if await routes.confirm_absent(producer, topic):
                txn._pending_txn_partitions -= {tp for tp in txn._pending_txn_partitions if tp.topic == topic}
        return done

    sender._do_add_partitions_to_txn = _do_add_partitions_to_txn


def _retrieve(future: asyncio.Future[None]) -> None:
    """The offsets' answer, retrieved once it no longer matters (asyncio would log it as never retrieved)."""
    if not future.cancelled():
        future.exception()
