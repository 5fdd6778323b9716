"""Exactly-once delivery: results and consumed offsets in Kafka transactions, two in flight per worker.

A worker's transactional producers (``transactional.id`` = ``<group>.<worker>.<random>.<0|1>``) carry the results
of all its partitions, and their offsets, in one transaction at a time each. Zombies are fenced by the consumer
group (KIP-447): the offsets go to the group coordinator with the generation of the assignment they were read
under (``_group_fencing``), which refuses them once the group has moved on, so a worker that lost its partitions
cannot commit a transaction over them. (aiokafka alone fences by transactional id only, which takes one
producer per input partition: four partitions were four transactions, each five round trips to the
coordinators, that shared a two-core machine with the broker; one per worker cut the p50 at a fixed rate.)

The two producers take turns, so that the pipeline never waits for a commit: while one window commits (its
offsets, then EndTxn), the next is open on the other producer. Its records go once the last window's are
acknowledged (so they follow them in every partition: per-key order), its offsets once the last window's were
sent (the group coordinator keeps the offsets it was sent last, whatever order the commit markers land in), and
its commit once the last window committed. A window that fails takes every window after it down with it.

A partition taken over (``take``) stays paused until the group's offset for it is stable: a previous owner's
last transaction may still hold offsets for it, and reading the offset committed before that transaction would
process its records twice. The offsets are fetched with ``require_stable``, which answers
``UNSTABLE_OFFSET_COMMIT`` until that transaction is complete. A previous owner that is alive completes it when
its partitions are revoked; one that died leaves it open. Every commit names its committer (the worker's
``<group>.<worker>.<random>``) in the offsets' metadata, and the new owner fences that worker's transactional ids
(starting a producer with an id aborts its open transaction) when no member of the group has it any more (the
members' cards carry it), or when the offsets stay unstable for ``_FENCE_AFTER_S``: a dead owner's open
transaction would otherwise hold back the group's offsets and every ``read_committed`` reader of its records
until it timed out.

A transaction spans a window of batches (like Kafka Streams' ``commit.interval.ms``): it stays open while the
next batch is already at hand, for at most ``transaction_ms``, and is handed to its commit at once when the
worker has nothing more to do, so light load keeps its latency and saturation does not pay a commit per batch.
After an error whose outcome is unknown (a commit whose answer was lost), nothing is guessed: once no commit is
under way, the producers are discarded and the partitions of the failed windows are taken over again, so that
the replacements' start settles their transactions (aborted if open, kept if committed) and the stable offsets
say where to go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.producer import sender as _sender

from streamer import kafka
from streamer.assignors import MemberCard
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError, TlsFailed
from streamer.status import member_cards

from ._batch import Batch
from ._group_fencing import Committed, Member, UnstableOffsets, fetch_offsets, group_commit
from ._outbox import Delivery, Outbox

__all__ = ["TransactionWindows"]

log = logging.getLogger("streamer.worker")

# A transaction's first AddPartitionsToTxn right after the previous commit is refused (CONCURRENT_TRANSACTIONS)
# until the broker has written the commit's markers, a few ms later; aiokafka (0.14) retries it after a fixed
# 20 ms, which was most of a transaction's time here (47 ms a cycle against 26 with 3 ms, on one broker).
_sender.BACKOFF_OVERRIDE = 0.003
# How long a partition's offsets may stay unstable before the transactional id that last committed them is
# fenced: a live previous owner completes its transaction when its partitions are revoked, well within this.
_FENCE_AFTER_S = 2.0


# Transactions in flight per worker: one open for the next batches while the one before it commits, each on a
# producer of its own (a producer has one transaction at a time).
_PRODUCERS = 2


class _Abandoned(KafkaError):  # type: ignore[misc]
    """The transaction committed before this one failed: this one must not commit either."""


@dataclass(slots=True, eq=False)
class _Window:
    slot: int  # which of the worker's producers carries it
    producer: AIOKafkaProducer
    opened: float  # time.monotonic()
    last: dict[TopicPartition, int] = field(default_factory=dict)  # the last offset covered, per partition
    tps: set[TopicPartition] = field(default_factory=set)  # every partition with records in it (or on their way)
    sent: list[Delivery] = field(default_factory=list)
    seq: int = 0  # windows are numbered as they open
    broken: bool = False  # a publish into it was interrupted: it may hold records past ``last``; never commit it
    failed: bool = False  # it or a window before it failed: it never commits
    before: _Window | None = None  # the window handed to its commit just before this one
    # Each step's outcome (True: done; False: the transaction failed), for the window after it: its records may
    # go once these are acknowledged, its offsets once these were sent, and its commit once this one committed.
    acked: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    offsets: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def step(self, step: asyncio.Future[bool]) -> None:
        """A step taken; the window must still be on (a window before it may have failed meanwhile)."""
        if self.failed:
            raise _Abandoned("a transaction before it failed")
        step.set_result(True)

    async def after(self, step: asyncio.Future[bool] | None) -> None:
        """Wait for the window before it to take ``step``; it must take it, and this window still be on."""
        if (step is not None and not await _outcome(step)) or self.failed:
            raise _Abandoned("a transaction before it failed")

    def settle(self, ok: bool) -> None:
        for step in (self.acked, self.offsets, self.done):
            if not step.done():
                step.set_result(ok)


async def _outcome(step: asyncio.Future[bool]) -> bool:
    return await asyncio.shield(step)  # an awaiter cancelled must not cancel the step for the others


class TransactionWindows:
    """The worker's transactions, from a window's first batch to its commit, and the takeover of partitions.

    Two producers take turns: while one window commits (its offsets, then EndTxn: round trips to the
    coordinators), the next one is open on the other producer and the pipeline publishes into it; its records
    go only once the last window's are acknowledged (per-key order), its offsets once the last window's were
    sent (the group keeps the offsets written last) and its commit once the last window committed. A window that
    fails takes every later one with it: their partitions are taken over again from the stable offsets.

    ``void(tp)`` is the worker's: forget what it holds of ``tp`` (a transaction failed); what is read of it next
    comes through ``take``.
    """

    def __init__(self, settings: WorkerSettings, worker: str, outbox: Outbox, consumer: AIOKafkaConsumer,
                 void: Callable[[TopicPartition], None]) -> None:
        self.settings = settings
        # Unique per process: a worker started again must not fence the one before it by id (a zombie could
        # fence it back); a dead one's open transaction is fenced through the offsets' metadata instead. Its
        # producers' ids are this and a suffix (transactional_ids).
        self.transactional_id = f"{settings.group_id}.{worker}.{uuid.uuid4().hex[:8]}"
        self.outbox = outbox
        self.consumer = consumer
        self.void = void
        self.member = Member(-1, "", settings.group_instance_id)  # as of the assignment in hand
        self.taking: dict[TopicPartition, asyncio.Task[None]] = {}  # paused until their offsets are stable
        self.error: BaseException | None = None  # a takeover that cannot succeed: the worker stops with it
        self._producers: list[AIOKafkaProducer | None] = [None] * _PRODUCERS
        self._starting: list[asyncio.Future[AIOKafkaProducer] | None] = [None] * _PRODUCERS
        self._window: _Window | None = None  # open: the pipeline publishes into it
        self._last: _Window | None = None  # the last window handed to its commit
        self._users: list[_Window | None] = [None] * _PRODUCERS  # the last window of each producer
        self._commits: set[asyncio.Task[None]] = set()
        self._resetting: asyncio.Future[None] | None = None  # a failure being settled: no window opens meanwhile
        self._idle = asyncio.Event()  # no publish under way (a producer is replaced only then; one publishes at a time)
        self._idle.set()
        self._opened = 0  # windows opened so far
        self._span_s = settings.transaction_ms / 1000
        self.committed = 0  # transactions committed
        self.fenced_others = 0  # transactional ids of previous owners fenced in a takeover

    @staticmethod
    def transactional_ids(base: str) -> list[str]:
        """The transactional ids of the producers of the worker whose offsets' metadata (and card) says ``base``."""
        return [f"{base}.{slot}" for slot in range(_PRODUCERS)]

    # -- the producers ------------------------------------------------------------------------------------
    async def producer(self, slot: int = 0) -> AIOKafkaProducer:
        """One of the worker's transactional producers, started (which settles its id's last transaction) if
        need be."""
        producer = self._producers[slot]
        if producer is not None:
            return producer
        starting = self._starting[slot]
        if starting is None:
            starting = self._starting[slot] = asyncio.ensure_future(self._start(slot))
        try:
            return await asyncio.shield(starting)
        finally:
            if starting.done() and self._starting[slot] is starting:
                self._starting[slot] = None

    async def producers(self) -> None:
        """Every producer started: their ids' last transactions settled."""
        await asyncio.gather(*(self.producer(slot) for slot in range(_PRODUCERS)))

    async def _start(self, slot: int) -> AIOKafkaProducer:
        producer = self._new_producer(self.transactional_ids(self.transactional_id)[slot])
        group_commit(producer, lambda: self.member, self.transactional_id, self.settings.group_id)
        try:
            await kafka.start(self.settings, producer)
        except BaseException:
            await producer.stop()
            raise
        self._producers[slot] = producer
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
        starting = [s for s in self._starting if s is not None]
        self._starting = [None] * _PRODUCERS
        await asyncio.gather(*starting, return_exceptions=True)
        producers, self._producers = self._producers, [None] * _PRODUCERS
        for producer in producers:
            if producer is None:
                continue
            try:
                await asyncio.wait_for(producer.stop(), self.settings.shutdown_timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.warning("closing a transactional producer failed: %r", exc)

    async def _fence(self, base: str, why: str) -> None:
        """Start and stop producers with a previous owner's ids: its open transactions are aborted."""
        log.warning("fencing %s, the last to commit partitions taken over: %s", base, why)
        for transactional_id in self.transactional_ids(base):
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
                while self._resetting is not None:  # the producers are being replaced
                    await asyncio.shield(self._resetting)
                try:
                    await self.producers()  # settles our own last transactions, if one was left open
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

    # -- the windows ----------------------------------------------------------------------------------------
    async def publish(self, batch: Batch, current_epoch: Callable[[TopicPartition], int]) -> None:
        """Send the batch's outputs in the open transaction (opened here if none is)."""
        epochs = {run.tp: run.epoch for run in batch.runs}

        def live() -> set[TopicPartition]:
            return {tp for tp, epoch in epochs.items() if epoch == current_epoch(tp) and tp not in self.taking}

        now = live()
        if not now:
            return  # revoked or voided since it was fetched: whoever reads it next does it
        w = self._window
        if w is None:
            try:
                w = await self._open()
            except (KafkaError, BrokerError) as exc:  # its producer could not start: taken over again, retried there
                self._lose(now, exc)
                return
            now = live()  # as of now: a failure may have voided some meanwhile
            if not now:
                return
        # All of the batch, as a rule: a list of its items only when some of its partitions were voided.
        idx = None if len(now) == len(epochs) else [i for i in range(len(batch)) if batch.tp(i) in now]
        w.tps |= now  # before any record goes: a failure from here on voids them
        self._idle.clear()
        try:
            w.sent += await self.outbox.publish(batch, w.producer, idx)
        except KafkaError as exc:
            if w is self._window:
                self._fail(w, exc)
            return  # else it failed already, and its partitions were voided
        except BaseException:
            w.broken = True
            raise
        finally:
            self._idle.set()
        for run in batch.runs:  # in offset order: the last run of a partition has its last offset
            if run.tp in now:
                w.last[run.tp] = run.records[-1].offset

    async def _open(self) -> _Window:
        """A window on the producer whose last window is over, once the last window's records are acknowledged
        (then this one's records come after them in every partition)."""
        while True:
            if self._window is not None:
                return self._window
            if self._resetting is not None:
                await asyncio.shield(self._resetting)
                continue
            last = self._last
            slot = 0 if last is None else (last.slot + 1) % _PRODUCERS
            previous = self._users[slot]
            if previous is not None and not previous.done.done():
                await _outcome(previous.done)
                continue
            if last is not None and not last.acked.done():
                await _outcome(last.acked)
                continue
            producer = await self.producer(slot)
            if self._resetting is not None or self._last is not last:
                continue
            try:
                await producer.begin_transaction()
            except Exception:
                if self._producers[slot] is producer:
                    raise
                continue  # replaced meanwhile (a failure): the next one
            if self._resetting is None and self._producers[slot] is producer:
                break
            # A failure meanwhile: this producer is replaced (its next start aborts what it began).
        self._opened += 1
        w = self._window = self._users[slot] = _Window(slot, producer, time.monotonic(), seq=self._opened)
        return w

    def left_s(self) -> float | None:
        """Seconds until the open transaction is due for its commit (None: none is open)."""
        w = self._window
        return None if w is None else max(0.0, w.opened + self._span_s - time.monotonic())

    def due(self) -> bool:
        """Whether the transaction has been open for ``transaction_ms``."""
        return self.left_s() == 0.0

    async def commit(self) -> None:
        """Hand the open transaction to its commit, which goes on meanwhile (``settled`` waits for it); the next
        window opens once its records are acknowledged."""
        await self._idle.wait()  # a revoke's release may commit while the pipeline publishes
        w, self._window = self._window, None
        if w is None:
            return
        if w.broken:
            self._fail(w, KafkaError("a publish into the transaction was interrupted"))
            return
        w.before, self._last = self._last, w
        self._spawn(self._commit(w), "streamer-txn-commit")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, w: _Window) -> None:
        """The window's records, then its offsets, then its commit: each step after the window before it took
        the same step."""
        before = w.before
        try:
            await self._delivered(w.sent, w.producer)
            w.step(w.acked)
            await w.after(None if before is None else before.offsets)
            if w.last:
                await w.producer.send_offsets_to_transaction({tp: last + 1 for tp, last in w.last.items()},
                                                             self.settings.group_id)
            w.step(w.offsets)
            await w.after(None if before is None else before.done)
            await w.producer.commit_transaction()
            self.committed += 1
            w.step(w.done)
        except KafkaError as exc:
            self._fail(w, exc)
        except Exception as exc:
            log.exception("committing a transaction failed unexpectedly; the worker stops")
            self.error = exc  # the worker's fetch loop stops with it
            self._fail(w, KafkaError(repr(exc)))
        finally:
            w.settle(False)  # cancelled (the worker stops): never committed here

    async def _delivered(self, sent: list[Delivery], producer: AIOKafkaProducer) -> None:
        """Wait for a transaction's records. A record the cluster refused is learnt from (its reply topic
        is gone, say) and the transaction aborts: it is redone from its start, and this time the record's
        outcome is its dead letter."""
        answers = await asyncio.gather(*(d.future for d in sent), return_exceptions=True)
        for delivery, answer in zip(sent, answers, strict=True):
            if isinstance(answer, Exception):
                await self.outbox.learn(delivery, answer, producer)
                raise answer

    def _fail(self, w: _Window, exc: KafkaError) -> None:
        """Unknown outcome, or refused (the group moved on, another owner fenced this worker's id): never guess.
        ``w`` fails, and every window after it (their offsets would pass its records; those before it may still
        commit, and the stable offsets will say). What they cover is void at once and taken over again, which
        waits until the producers are replaced (``_reset``)."""
        if w.failed:  # with a window before it: its partitions were voided then
            w.settle(False)
            return
        doomed = {x for x in (w, *self._users, self._window) if x is not None and x.seq >= w.seq and not x.failed}
        for x in doomed:
            x.failed = True
            x.settle(False)
        if self._window in doomed:
            self._window = None
        self._lose(set().union(*(x.tps for x in doomed)), exc)
        if self._resetting is None:
            self._resetting = asyncio.get_running_loop().create_future()
            self._spawn(self._reset(), "streamer-txn-reset")

    def _lose(self, tps: set[TopicPartition], exc: BaseException) -> None:
        """What the worker holds of ``tps`` is void; they are read again from their stable offsets."""
        log.warning("transaction failed (%r); going on from the committed offsets of %s", exc,
                    sorted(f"{tp.topic}-{tp.partition}" for tp in tps))
        for tp in tps:
            self.void(tp)
        mine = self.consumer.assignment()
        self.take([tp for tp in tps if tp in mine])

    async def _reset(self) -> None:
        """The producers go once no commit is under way and no publish (their next start aborts a transaction
        still open); takeovers wait for it."""
        assert self._resetting is not None
        try:
            while others := [t for t in self._commits if t is not asyncio.current_task()]:
                await asyncio.gather(*others, return_exceptions=True)
            await self._idle.wait()
            if self._window is not None:  # opened as the failure happened: it never commits (its producer goes)
                self._fail(self._window, KafkaError("its producer is replaced"))
            await self._discard()
            self._last, self._users = None, [None] * _PRODUCERS
        finally:
            resetting, self._resetting = self._resetting, None
            resetting.set_result(None)

    async def settled(self) -> None:
        """Wait until every window handed to its commit is over (committed, or failed and settled)."""
        while self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)

    async def release(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions taken from us: commit what is open (a rebalance takes all of them) and wait for every
        commit under way. A commit that fails here (the group moved on already) starts no takeover of them:
        their next owner reads them."""
        tps = list(tps)
        await self._stop_taking(tps)
        await self.commit()
        await self.settled()
        await self._stop_taking(tps)

    async def close(self) -> None:
        await self._stop_taking(list(self.taking))
        await self.commit()
        await self.settled()
        await self._stop_taking(list(self.taking))
        await self._discard()
