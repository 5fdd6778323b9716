"""The worker's pipeline inside one process, from the batch queue to the producer.

The model runs batch N+1 while batch N is published and batch N+2 decoded (at most one decoded
batch waits); a model cheaper than a thread hop runs on the event loop (``BatchRunner``). Cheap
batches' records are held and handed to the producer together (:meth:`Pipeline._flush`), so a
produce request carries several batches. At-least-once: acknowledged offsets go to the ordered
commits. Exactly-once: records go into the worker's open transaction
(``TransactionWindows``), committed when ``transaction_ms`` is up or when nothing more is at hand.

The worker (``consumers.worker``) owns the clients, the group and the fetch loop that fills the
queue; this module owns what happens to a batch once it is taken from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from streamer.batching import BatchQueue, LatencyTarget
from streamer.metrics import WorkerMetrics

from ._batch import Batch, Run, RunStats
from ._commit import OrderedCommits
from ._inference import BatchRunner
from ._outbox import Outbox
from ._telemetry import Telemetry
from ._transactions import TransactionWindows

__all__ = ["Pipeline"]

log = logging.getLogger("streamer.worker")

Key = tuple[TopicPartition, int, float]  # a run's partition, assignment epoch and fetch time


class Pipeline:
    """Batches from ``queue`` through the model to the producer, in order; ``run`` until ``stopping``."""

    def __init__(self, queue: BatchQueue[Key, Any], runner: BatchRunner, outbox: Outbox, producer: AIOKafkaProducer,
                 commits: OrderedCommits, txn: TransactionWindows | None, telemetry: Telemetry, stats: RunStats,
                 metrics: WorkerMetrics, target: LatencyTarget | None, epoch: Callable[[TopicPartition], int],
                 stopping: asyncio.Event, hold_records: int) -> None:
        self._queue = queue
        self.runner = runner
        self.outbox = outbox
        self._producer = producer
        self._commits = commits
        self._txn = txn
        self.telemetry = telemetry
        self.stats = stats
        self.metrics = metrics
        self.target = target
        self._epoch = epoch
        self._stopping = stopping
        self._target_said = (0, -1.0, 0.0)  # the choice last logged, and when
        # Batches taken from the queue, and finished (published, or left when stopping): in order, as the
        # pipeline is. A revoke waits for every batch taken before it to finish.
        self._taken = self._finished = 0
        self._progress = asyncio.Event()
        self._busy_since: float | None = None
        # Batches whose records wait to be handed to the producer together (see _flush).
        self._held: list[Batch] = []
        self._held_records = 0
        self._hold_records = hold_records

    async def drain(self) -> None:
        """Wait until every batch taken so far is published, and its offsets committed."""
        target = self._taken
        while self._finished < target:
            self._progress.clear()
            await self._progress.wait()
        await self._commits.drain()

    async def run(self) -> None:
        """The model on batch N while batch N-1 is published and batch N+1 decoded (at most one decoded batch
        waits). A batch is published as soon as its model ran when no next batch is at hand."""
        ready: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        decoder = asyncio.create_task(self._decode_loop(ready), name="streamer-decode")
        done: Batch | None = None  # its model ran; not published yet
        running: asyncio.Future[None] | None = None
        try:
            while True:
                nxt = await ready.get() if done is None else (ready.get_nowait() if not ready.empty() else _NOTHING)
                if nxt is None or (nxt is not _NOTHING and self._stopping.is_set()):
                    if isinstance(nxt, Batch):
                        self._finish_batch(nxt)  # not started: its records go to whoever reads the partition next
                    if done is not None:
                        await self._publish(done, more=False)
                    return
                # The model starts on the next batch now (on its thread), before this one is published.
                running = asyncio.ensure_future(self.runner.infer_soon(nxt)) if isinstance(nxt, Batch) else None
                if done is not None:
                    # While the model runs the next batch. The records of a cheap model's batches are handed to
                    # the producer together while more are at hand (see _hold), so they share produce requests.
                    more = running is not None and not nxt.on_thread
                    await self._publish(done, more=more, busy=running is not None)
                    done = None
                if running is not None:
                    await self._model_done(running)
                    done = nxt
                    if self.target is not None and nxt.stats.runnable:
                        self.target.observed(nxt.stats.runnable, nxt.stats.inference_s * 1000)
        finally:
            for task in (decoder, running):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._txn is not None:
                await self._txn.commit()

    async def _model_done(self, running: asyncio.Future[None]) -> None:
        """Wait for the model; exactly-once commits its open transactions meanwhile if they fall due (a slow
        model must not hold results back past ``transaction_ms``)."""
        if self._txn is not None:
            left = self._txn.left_s()
            if left is not None:
                finished, _ = await asyncio.wait({running}, timeout=left)
                if not finished:
                    await self._txn.commit()
        await running

    def _choose(self, target: LatencyTarget) -> None:
        """The batch limit and wait for the next batch; said in the log when it changes (at most every 5 s)."""
        now = time.monotonic()
        choice = target.choose(len(self._queue), now)
        policy = choice.policy
        self._queue.policy = policy
        self.metrics.labels(self.metrics.batch_limit).set(policy.max_batch_size)
        self.metrics.labels(self.metrics.batch_wait).set(policy.max_wait_ms / 1000)
        limit, wait, at = self._target_said
        if (policy.max_batch_size, policy.max_wait_ms) != (limit, wait) and now - at >= 5.0:
            self._target_said = (policy.max_batch_size, policy.max_wait_ms, now)
            log.info("latency target %g ms: batches of up to %d, wait %.1f ms (model about %.1f ms at %d; "
                     "arriving %.0f/s)%s", target.target_ms, policy.max_batch_size, policy.max_wait_ms,
                     choice.model_ms, policy.max_batch_size, target.rate(now),
                     "" if choice.reachable else "; the target is out of reach even one item at a time")

    async def _decode_loop(self, ready: asyncio.Queue[Batch | None]) -> None:
        while True:
            if self.target is not None:
                self._choose(self.target)
            runs = await self._queue.next_batch()
            if self._stopping.is_set():
                await ready.put(None)  # what is queued is left for redelivery
                return
            if not runs:
                continue
            self._taken += 1
            if self._busy_since is None:
                self._busy_since = time.perf_counter()
            batch = Batch([Run(tp, epoch, arrived, records) for (tp, epoch, arrived), records in runs])
            self.runner.check(batch)
            await ready.put(batch)

    async def _publish(self, batch: Batch, *, more: bool, busy: bool = False) -> None:
        """Encode the batch's records and hold them; hand what is held to the producer (see :meth:`_flush`) once
        no ``more`` work is at hand that could join them (the next batch runs inline), or enough is held, or the
        first held batch has waited ``_HOLD_S``. ``busy``: a next batch is running (inline or on the model
        thread), so an exactly-once transaction stays open for it."""
        self.runner.finish(batch)
        held = self._held
        held.append(batch)
        self._held_records += len(batch)
        if not more or self._held_records >= self._hold_records or time.monotonic() - held[0].started > _HOLD_S:
            await self._flush(more=more or busy)

    async def _flush(self, *, more: bool) -> None:
        """Hand the held batches' records to the producer, in order and without a pause between them, so the
        producer's sender takes them in as few requests as it can. At-least-once: their offsets go to the
        commit task. Exactly-once: into the worker's open transaction, committed when ``transaction_ms``
        is up or at once when no ``more`` work is at hand."""
        held, self._held, self._held_records = self._held, [], 0
        for batch in held:
            if self._txn is not None:
                await self._txn.publish(batch, self._epoch)
            else:
                self._commits.add(await self.outbox.publish(batch, self._producer), batch.offsets())
        if self._txn is not None and (not more or self._txn.due()):
            await self._txn.commit()
        for batch in held:
            self._account(batch)

    def _account(self, batch: Batch) -> None:
        stats = batch.count()
        self.stats.add(stats)
        self.telemetry.published(batch, stats)
        self._finish_batch(batch)

    def _finish_batch(self, batch: Batch) -> None:
        if batch.spans is not None and self.runner.tracing is not None:
            self.runner.tracing.finished(batch)
        self._finished += 1
        self._progress.set()
        if self._busy_since is not None:  # busy: while any batch is in the pipeline
            now = time.perf_counter()
            self.stats.busy_ms_total += (now - self._busy_since) * 1000
            self._busy_since = now if self._finished < self._taken else None


_NOTHING: Any = object()  # no next batch at hand
_HOLD_S = 0.005  # the longest a batch's records are held back for the next batches' (while more are at hand)
