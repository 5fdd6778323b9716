"""Exactly-once delivery: results and consumed offsets in Kafka transactions, one per input partition.

aiokafka's transactions lack consumer-group fencing (KIP-447), so zombies are fenced the older
way: one transactional producer per input partition, with ``transactional.id`` =
``<group>.<topic>.<partition>``. Whoever owns the partition next starts a producer with the same
id; the broker then bumps the epoch, aborts the old owner's open transaction and refuses its
later commits (``ProducerFenced``).

Starting that producer is also what makes the group's committed offset of the partition
trustworthy: the broker answers it only once the previous owner's last transaction is complete
(committed, or aborted by the fence), and that transaction may hold the partition's newest
offset. aiokafka reads the committed offsets as soon as partitions are assigned, so a partition
taken over (``take``) stays paused until its producer has started, then its committed offset is
read again and the consumer seeks there (Kafka Streams before KIP-447 did the same). Read before
the fence, a commit landing in between would be processed twice.

A transaction spans a window of batches (like Kafka Streams' ``commit.interval.ms``): it stays
open while the next batch is already at hand, for at most ``transaction_ms``, and is committed at
once when the worker has nothing more to do, so light load keeps its latency and saturation does
not pay a commit per batch. After an error whose outcome is unknown (a commit whose answer was
lost), nothing is guessed: the producer is discarded and the partition taken over again, so the
replacement's start settles the transaction (aborted if it was open, kept if it was committed)
and the committed offset says where to go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerFenced
from aiokafka.producer import sender as _sender

from streamer import kafka
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError, TlsFailed

from ._batch import Batch
from ._outbox import Delivery, Outbox

__all__ = ["TransactionWindows"]

log = logging.getLogger("streamer.worker")

# A transaction's first AddPartitionsToTxn right after the previous commit is refused (CONCURRENT_TRANSACTIONS)
# until the broker has written the commit's markers, a few ms later; aiokafka (0.14) retries it after a fixed
# 20 ms, which was most of a transaction's time here (47 ms a cycle against 26 with 3 ms, on one broker).
_sender.BACKOFF_OVERRIDE = 0.003


class TransactionalProducers:
    """One transactional producer per input partition, started (which fences the previous owner's) when needed."""

    def __init__(self, settings: WorkerSettings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._starting: dict[TopicPartition, asyncio.Future[AIOKafkaProducer]] = {}  # one start per partition

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.settings.group_id}.{tp.topic}.{tp.partition}"

    async def get(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is not None:
            return producer
        starting = self._starting.get(tp)
        if starting is None:  # two starts of one id would fence each other
            starting = self._starting[tp] = asyncio.ensure_future(self._start(tp))
            starting.add_done_callback(lambda _f: self._starting.pop(tp, None))
        return await asyncio.shield(starting)

    async def _start(self, tp: TopicPartition) -> AIOKafkaProducer:
        # A short transaction timeout bounds how long a frozen owner's open transaction can hold
        # back read_committed readers when nothing else aborts it.
        producer = kafka.producer(self.settings, transactional_id=self.transactional_id(tp),
                                  client_id=f"{self.settings.client_id}-txn-{self.worker}",
                                  transaction_timeout_ms=max(10_000, 2 * self.settings.session_timeout_ms),
                                  max_batch_size=self.settings.producer_batch_bytes,
                                  request_timeout_ms=self.settings.produce_timeout_ms)
        await kafka.start(self.settings, producer)  # fences any older producer of this id, aborts its open transaction
        self._producers[tp] = producer
        return producer

    async def discard(self, tp: TopicPartition) -> None:
        starting = self._starting.pop(tp, None)
        if starting is not None:
            await asyncio.gather(starting, return_exceptions=True)
        producer = self._producers.pop(tp, None)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.settings.shutdown_timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.warning("closing the producer of %s failed: %r", tp, exc)

    async def close(self) -> None:
        for tp in list(self._producers):
            await self.discard(tp)


@dataclass(slots=True)
class _Window:
    producer: AIOKafkaProducer
    last: int  # the last offset the transaction covers
    opened: float  # time.monotonic()
    sent: list[Delivery] = field(default_factory=list)
    broken: bool = False  # a publish into it was interrupted: it may hold records past ``last``; never commit it


class TransactionWindows:
    """The open transaction of each input partition, from its first batch to its commit.

    ``void(tp)`` is the worker's: forget what it holds of ``tp`` (a transaction failed, or the partition was
    fenced); what is read of it next comes through ``take``.
    """

    def __init__(self, settings: WorkerSettings, worker: str, outbox: Outbox, consumer: AIOKafkaConsumer,
                 void: Callable[[TopicPartition], None]) -> None:
        self.settings = settings
        self.producers = TransactionalProducers(settings, worker)
        self.outbox = outbox
        self.consumer = consumer
        self.void = void
        self.fenced: set[TopicPartition] = set()  # partitions a newer owner took from us
        self.taking: dict[TopicPartition, asyncio.Task[None]] = {}  # paused until fenced and positioned
        self.error: BaseException | None = None  # a takeover that cannot succeed: the worker stops with it
        self._open: dict[TopicPartition, _Window] = {}
        self._span_s = settings.transaction_ms / 1000
        self.committed = 0  # transactions committed
        self._lock = asyncio.Lock()

    # -- taking partitions over ---------------------------------------------------------------------------
    def take(self, tps: Iterable[TopicPartition]) -> None:
        """Read ``tps`` only once their producers started (fencing the previous owners, completing their last
        transactions) and from the offsets committed by then. Taken over together: producers start side by side,
        and the partitions become readable at once, so that the first fetch serves them all (resumed one by one,
        the first could fill the queue while the others wait)."""
        todo = []
        for tp in tps:
            self.fenced.discard(tp)
            if tp not in self.taking:
                todo.append(tp)
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
                    # Each start returns once the previous owner's transaction is complete.
                    await asyncio.gather(*(self.producers.get(tp) for tp in tps))
                    committed = await asyncio.gather(*(self.consumer.committed(tp) for tp in tps))
                    break
                except (KafkaError, BrokerError) as exc:
                    # A cluster that does not answer now (a broker restarting) is waited for, as the consumer
                    # does; refused credentials or certificates and non-retriable refusals stop the worker.
                    waiting = isinstance(exc, KafkaTimeoutError) or getattr(exc, "retriable", True)
                    if isinstance(exc, AuthenticationFailed | TlsFailed) or not waiting:
                        raise
                    log.warning("%s: starting their transactional producers failed (%s); retrying in %.1f s",
                                ", ".join(f"{tp.topic}-{tp.partition}" for tp in tps), exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 2.0)
            for tp, offset in zip(tps, committed, strict=True):
                if tp not in self.consumer.assignment():
                    continue
                if offset is None:
                    await self.consumer.seek_to_beginning(tp)  # as a worker's consumer resets (streamer.kafka)
                else:
                    self.consumer.seek(tp, offset)
            mine = self.consumer.assignment()  # as of now: the seeks above may have waited
            self.consumer.resume(*(tp for tp in tps if tp in mine))
        except Exception as exc:  # noqa: BLE001 - handed to the worker's fetch loop, which stops with it
            log.error("cannot take %s over: %r", tps, exc)  # noqa: TRY400 - raised again there
            self.error = exc
        finally:
            for tp in tps:
                if self.taking.get(tp) is asyncio.current_task():
                    del self.taking[tp]

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

    async def publish(self, batch: Batch, current_epoch: Callable[[TopicPartition], int]) -> None:
        """Send each partition's outputs in its open transaction (opened here if none is)."""
        by_tp: dict[TopicPartition, list[int]] = {}
        for i in range(len(batch)):
            by_tp.setdefault(batch.tp(i), []).append(i)
        epochs = {run.tp: run.epoch for run in batch.runs}
        for tp, idx in by_tp.items():
            if epochs[tp] != current_epoch(tp) or tp in self.fenced or tp in self.taking:
                continue  # revoked, fenced or voided since it was fetched: whoever reads it next does it
            last = batch.records[idx[-1]].offset
            w = self._open.get(tp)
            try:
                if w is None:
                    producer = await self.producers.get(tp)
                    await producer.begin_transaction()
                    w = self._open[tp] = _Window(producer, last, time.monotonic())
                try:
                    w.sent += await self.outbox.publish(batch, w.producer, idx)
                except BaseException:
                    w.broken = True
                    raise
                w.last = last
            except KafkaError as exc:
                await self._failed(tp, exc)

    def left_s(self) -> float | None:
        """Seconds until the oldest open transaction is due for its commit (None: none is open)."""
        if not self._open:
            return None
        return max(0.0, min(w.opened for w in self._open.values()) + self._span_s - time.monotonic())

    def due(self) -> bool:
        """Whether a transaction has been open for ``transaction_ms``."""
        return self.left_s() == 0.0

    async def commit(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Commit the open transactions (of ``tps``, default all): their records, then their offsets."""
        async with self._lock:  # a revoke's release and the process loop may both commit
            await self._commit(tps)

    async def _commit(self, tps: Iterable[TopicPartition] | None) -> None:
        """Each partition's transaction has its own producer: they commit side by side, not one after another."""
        todo = [(tp, self._open.pop(tp)) for tp in list(self._open if tps is None else tps) if tp in self._open]
        await asyncio.gather(*(self._commit_one(tp, w) for tp, w in todo))

    async def _commit_one(self, tp: TopicPartition, w: _Window) -> None:
        if w.broken:
            await self._failed(tp, KafkaError("a publish into the transaction was interrupted"))
            return
        try:
            await self._delivered(w.sent, w.producer)
            await w.producer.send_offsets_to_transaction({tp: w.last + 1}, self.settings.group_id)
            await w.producer.commit_transaction()
            self.committed += 1
        except KafkaError as exc:
            await self._failed(tp, exc)

    async def _delivered(self, sent: list[Delivery], producer: AIOKafkaProducer) -> None:
        """Wait for a transaction's records. A record the cluster refused is learnt from (its reply topic
        is gone, say) and the transaction aborts: it is redone from its start, and this time the record's
        outcome is its dead letter."""
        answers = await asyncio.gather(*(d.future for d in sent), return_exceptions=True)
        for delivery, answer in zip(sent, answers, strict=True):
            if isinstance(answer, Exception):
                await self.outbox.learn(delivery, answer, producer)
                raise answer

    async def _failed(self, tp: TopicPartition, exc: KafkaError) -> None:
        self._open.pop(tp, None)
        await self.producers.discard(tp)
        self.void(tp)
        if isinstance(exc, ProducerFenced):
            # A newer owner of the partition started its producer: we are a zombie for this one. Never start a
            # producer for it again until the group assigns it to us anew: that would fence the rightful owner.
            log.warning("%s: fenced by a newer owner; dropping its queued records", tp)
            self.fenced.add(tp)
        else:
            # Unknown outcome: never guess. Take the partition over again: the new producer's start aborts the
            # transaction if it is still open, and the committed offset then says where to go on.
            log.warning("%s: transaction failed (%r); settling it and going on from the committed offset", tp, exc)
            self.take([tp])

    async def release(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions taken from us: commit what is open for them, then close their producers."""
        tps = list(tps)
        await self._stop_taking(tps)
        async with self._lock:
            await self._commit([tp for tp in tps if tp in self._open])
            for tp in tps:
                await self.producers.discard(tp)

    async def close(self) -> None:
        await self._stop_taking(list(self.taking))
        await self.commit()
        await self.producers.close()
