"""At-least-once offset commits (exactly-once commits transactions instead: ``_transactions``).

The rule: a partition's offset is committed only after the results for every record before it
are acknowledged by the broker, and only by the worker that still owns the partition in the same
assignment epoch. ``Committer`` is the seam: the worker commits through its consumer group
(``ConsumerCommitter``), tests through an in-memory one (tests/test_commits.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, RebalanceInProgressError

__all__ = ["Committer", "ConsumerCommitter", "OrderedCommits"]

log = logging.getLogger("streamer.worker")


class Committer(Protocol):
    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets`` (the next offset to read, per partition); False if the group refused."""
        ...


class ConsumerCommitter:
    """At-least-once: commit through the consumer group, after the results are acknowledged."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        owned = self._consumer.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in owned}
        if not mine:
            return True
        try:
            await self._consumer.commit(mine)
        except (CommitFailedError, RebalanceInProgressError, IllegalStateError) as exc:
            # The group moved on: these records will be redelivered to the new owner, whose
            # results the client de-duplicates by request id.
            log.warning("offset commit refused (%s); records will be redelivered", exc)
            return False
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise
            log.warning("offset commit failed (%s); the next commit covers it", exc)
            return False
        return True


class OrderedCommits:
    """Commits batches in the order they were processed, once all their deliveries are acknowledged.

    ``add`` takes a batch's delivery futures and its offsets; one background task awaits them
    in order and commits. ``drain`` waits until every batch added so far is committed.

    Commits are at least ``interval_s`` apart (like Kafka Streams' ``commit.interval.ms``): batches that come
    meanwhile share the next one. An offset commit is a request to the group coordinator and a write to
    ``__consumer_offsets``, for the worker and the broker alike, while the results it follows are already
    with the client; committing after every batch made it a third of a worker's Kafka requests at moderate
    rates. ``drain`` (a rebalance, shutdown) commits at once.
    """

    def __init__(
        self,
        committer: Committer,
        current_epoch: Callable[[TopicPartition], int],
        settle: Callable[[Any, BaseException], Awaitable[list[Any]]] | None = None,
        interval_s: float = 0.0,
    ) -> None:
        self._committer = committer
        self._interval_s = interval_s
        self._last = -math.inf  # time.monotonic() of the last commit sent
        self._draining = 0  # drains waiting: commit what is queued without waiting out the interval
        self._now = asyncio.Event()
        self._epoch = current_epoch
        # A delivery that failed is handed to ``settle`` (the outbox), which returns the deliveries sent
        # instead (dead letters, or each record alone), or raises when the failure is fatal.
        self._settle = settle
        # (deliveries: objects with a ``future``, {partition: (next offset, epoch when fetched)})
        self._queue: asyncio.Queue[tuple[list[Any], dict[TopicPartition, tuple[int, int]]] | None] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self.committed_batches = 0
        self.refused = 0

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="streamer-commits")

    def add(self, deliveries: Iterable[Any], offsets: dict[TopicPartition, tuple[int, int]]) -> None:
        """``deliveries``: objects whose ``future`` the producer resolves (see ``Outbox.publish``)."""
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise a fatal error from the commit task
        self._queue.put_nowait((list(deliveries), offsets))

    async def drain(self) -> None:
        self._draining += 1
        self._now.set()
        try:
            await self._queue.join()
        finally:
            self._draining -= 1
            if not self._draining:
                self._now.clear()

    async def close(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        self._draining += 1  # never cleared: nothing waits out the interval any more
        self._now.set()
        await self._task

    async def _run(self) -> None:
        """Batches that queued up while the last commit was in flight are committed together: one commit
        for all of them, once every one of their deliveries is acknowledged (in order); and those that came
        while the interval since the last commit ran out."""
        while True:
            entries = [await self._queue.get()]
            wait = self._last + self._interval_s - time.monotonic()
            if wait > 0 and entries[-1] is not None and not self._now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), wait)
            while not self._queue.empty() and entries[-1] is not None:
                entries.append(self._queue.get_nowait())
            try:
                mine: dict[TopicPartition, int] = {}
                for entry in entries:
                    if entry is None:
                        break
                    deliveries, offsets = entry
                    await self._delivered(deliveries)
                    # Partitions revoked since these records were fetched are not ours to commit.
                    mine.update((tp, off) for tp, (off, epoch) in offsets.items() if epoch == self._epoch(tp))
                if mine:
                    self._last = time.monotonic()
                    if await self._committer.commit(mine):
                        self.committed_batches += sum(e is not None for e in entries)
                    else:
                        self.refused += 1
                if entries[-1] is None:
                    return
            finally:
                for _ in entries:
                    self._queue.task_done()

    async def _delivered(self, deliveries: list[Any]) -> None:
        """Wait for every delivery; a failed one is settled, or raises and stops the worker with
        nothing committed past it."""
        answers = await asyncio.gather(*(d.future for d in deliveries), return_exceptions=True)
        for delivery, answer in zip(deliveries, answers, strict=True):
            if not isinstance(answer, BaseException):
                continue
            if self._settle is None or not isinstance(answer, Exception):
                raise answer
            instead = await self._settle(delivery, answer)
            if instead:
                await self._delivered(instead)
