"""The worker: one consumer-group member that batches requests, runs the model and replies.

The public class starts, stops, follows the group's rebalances and reloads weights; three
background tasks do the work: fetch (here: consumer -> batch queue, pausing partitions when the
queue is full), process (``_pipeline``: batch queue -> model -> producer, in order) and commit
(``_commit``: acknowledged results -> committed offsets, in order; exactly-once commits
transactions instead, ``_transactions``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from schemas import Codec, Limits
from streamer import kafka
from streamer.assignors import MemberCard, assignors
from streamer.batching import BatchPolicy, BatchQueue, FetchPacing, LatencyTarget
from streamer.config import WorkerSettings
from streamer.logs import quiet
from streamer.metrics import WorkerMetrics
from streamer.models import Model
from streamer.tracing import WorkerTracing, tracing

from ._batch import Route, RunStats
from ._commit import ConsumerCommitter, OrderedCommits
from ._group_fencing import member_of
from ._inference import BatchRunner
from ._outbox import Outbox
from ._pipeline import Key, Pipeline
from ._served import Reloader, load_served_model
from ._telemetry import Telemetry
from ._transactions import TransactionWindows

__all__ = ["Worker"]

log = logging.getLogger("streamer.worker")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker._on_assigned(set(assigned))


class Worker:
    """One member of the worker group. Use ``await worker.run()`` or start/stop explicitly."""

    def __init__(
        self,
        settings: WorkerSettings,
        model: Model | None = None,
        limits: Limits | None = None,
        route: Route | None = None,
        source: kafka.TopicSource = kafka.REQUEST_TOPIC,
    ) -> None:
        self.settings = settings
        self._source = source
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model = model or load_served_model(settings)
        if model is not None and settings.model_version:
            self.model.version = settings.model_version
        self.policy = BatchPolicy(settings.max_batch_size, settings.max_wait_ms)
        self.max_buffered = settings.max_buffered or 4 * settings.max_batch_size
        self.codec = Codec(limits or Limits(max_message_bytes=settings.max_message_bytes,
                                            max_tensor_elements=settings.max_tensor_elements))
        self.route = route or Route(self.model.name)
        tracer = tracing()
        self.runner = BatchRunner(self.model, self.codec, self.name, settings.results_topic, self.route,
                                  WorkerTracing(tracer, self.route.model, self.route.stage) if tracer else None)
        self.metrics = WorkerMetrics(self.route.model, self.route.stage or "")
        self.telemetry = Telemetry(settings, self.metrics)
        self.stats = RunStats()
        self.outbox = Outbox(settings, self.runner, self.route, self.metrics, self.name, self.stats)
        self._watcher: asyncio.Task[None] | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.weights = Reloader(settings, self.runner, self._served)
        # Runs of records keyed (partition, assignment epoch, fetch time).
        self._queue: BatchQueue[Key, Any] = BatchQueue(self.policy)
        # Batching to a latency target: the batch limit and wait, chosen before each batch (streamer.batching).
        self.target = (LatencyTarget(settings.latency_target_ms, settings.max_batch_size)
                       if settings.latency_target_ms else None)
        # While records come fast, a fetch waits at the broker for a batch's worth of them (streamer.batching).
        # Off with a latency target: it chooses the wait as it goes, and its fetches come back at once.
        self.pacing = FetchPacing(self.policy, time.monotonic()) if self.target is None else None
        self._epochs: defaultdict[TopicPartition, int] = defaultdict(int)
        self._revoking: set[TopicPartition] = set()
        self._paused = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rebalances = 0
        self._measured: float | None = None  # items/s of model time (for the assignor)
        self._throughput: float | None = None  # items/s of busy wall time (for the scaling signal)
        self._consumer = kafka.consumer(
            settings,
            group_id=settings.group_id,
            group_instance_id=settings.group_instance_id,
            partition_assignment_strategy=assignors(settings.assignor, self._card),
            client_id=f"{settings.client_id}-worker-{self.name}",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            max_poll_records=settings.max_batch_size,
            isolation_level="read_committed",  # never read what an aborted transaction wrote
        )
        self._producer = kafka.producer(settings, client_id=f"{settings.client_id}-worker-{self.name}",
                                        max_batch_size=settings.producer_batch_bytes,
                                        request_timeout_ms=settings.produce_timeout_ms)
        self._commits = OrderedCommits(ConsumerCommitter(self._consumer), lambda tp: self._epochs[tp],
                                       lambda d, exc: self.outbox.settle(d, exc, self._producer),
                                       interval_s=settings.commit_interval_ms / 1000)
        self._txn = (TransactionWindows(settings, self.name, self.outbox, self._consumer, self._void, self.metrics)
                     if settings.delivery == "exactly-once" else None)
        self.pipeline = Pipeline(self._queue, self.runner, self.outbox, self._producer, self._commits, self._txn,
                                 self.telemetry, self.stats, self.metrics, self.target, self._epochs.__getitem__,
                                 self._stopping, hold_records=16 * settings.max_batch_size)

    def _scaling_capacity(self) -> float:
        """Items/s this worker sustains when busy: measured wall time, else the model-time figure."""
        return self._throughput or self._advertised_capacity()

    def _card(self) -> MemberCard:
        """What this member tells its group (read at each join): see streamer.assignors."""
        return MemberCard(self.settings.group_instance_id or self.name, self._advertised_capacity() or None,
                          self.model.name, str(self.runner.model.version), self.metrics.port,
                          self.settings.traffic_share, self._txn.transactional_id if self._txn is not None else None)

    def _seed_target(self, full: float | None) -> None:
        """The latency target's first fit, from the smallest and the largest batch timed before serving (best of
        three, in a quiet process): sizes far apart give a slope that later batches, timed under load, refine.
        From one run alone, a cold start's slow run or a noisy one decided the first batches (CI saw the cap
        taken on such a fit)."""
        assert self.target is not None
        small = self.runner.measure_capacity(2)
        if small is None or full is None:  # a model without example inputs: its warm-up run, if any
            if (seen := self.runner.model_time()) is not None:
                self.target.observed(round(seen[1]), seen[0])
            return
        self.target.observed(2, 2000 / small)
        self.target.observed(self.policy.max_batch_size, 1000 * self.policy.max_batch_size / full)

    def _advertised_capacity(self) -> float:
        """Items/s of model time: the configured figure, else the latest measure (0: unknown)."""
        return self.settings.capacity or self._measured or 0.0

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.runner.warm_up, self.policy.max_batch_size)
            full: float | None = None  # items/s on full batches
            if self.target is not None or (self.settings.capacity is None and self.settings.assignor == "capacity"):
                full = await loop.run_in_executor(None, self.runner.measure_capacity, self.policy.max_batch_size)
            if self.settings.capacity is None and self.settings.assignor == "capacity":
                self._measured = full
            if self.target is not None:
                await loop.run_in_executor(None, self._seed_target, full)
            self._consumer.subscribe([self.settings.request_topic], listener=_Rebalance(self))
            self.metrics.labels(self.metrics.batch_limit).set(self.policy.max_batch_size)
            self.metrics.labels(self.metrics.batch_wait).set(self.policy.max_wait_ms / 1000)
            if self.settings.metrics_port is not None:  # up before the group sees this member
                port = self.metrics.serve(self.settings.metrics_port)
                log.info("metrics on http://0.0.0.0:%d/metrics", port)
            # The cluster and the request topic, waited for as the CLI's check before loading the model does.
            await kafka.preflight(self.settings, self.settings.startup_timeout_s, self.settings.request_topic,
                                  self._source)
            with quiet("aiokafka"):  # the cluster answers now; a failure is said in one line
                async with kafka.translated_errors(self.settings):
                    await self._producer.start()
            # What start-up made (modules, the model, torch's state) lives as long as the process: keep it out of
            # the cyclic collector's scans, which the hot path's allocations would otherwise trigger on the whole
            # heap. Done before joining the group, so the pause is not a member's.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*_GC_THRESHOLDS)
            async with kafka.translated_errors(self.settings):
                await self._consumer.start()
        except BaseException:
            await self._consumer.stop()
            await self._producer.stop()
            self.metrics.close()
            self.runner.close()
            raise
        self._commits.start()
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name="streamer-fetch"),
            asyncio.create_task(self.pipeline.run(), name="streamer-process"),
        ]
        self._reporter = asyncio.create_task(self._report_loop(), name="streamer-report")
        if self.settings.weights:
            self._reloader = asyncio.create_task(self.weights.run(Path(self.settings.weights)),
                                                 name="streamer-reload")
        if self.settings.metrics_port is not None:
            self._watcher = asyncio.create_task(self.telemetry.run(self._consumer, self._scaling_capacity),
                                                name="streamer-telemetry")
        capacity = ""
        if self.settings.assignor == "capacity":
            capacity = f", capacity {self._advertised_capacity():,.0f} items/s"
        log.info("worker %s serving %s (%s v%s) on %s (group %s, batch %d, wait %g ms, assignor %s%s)", self.name,
                 self.describe(), self.model.name, self.model.version, self.settings.request_topic,
                 self.settings.group_id, self.policy.max_batch_size, self.policy.max_wait_ms, self.settings.assignor,
                 capacity)

    def request_stop(self) -> None:
        """Stop fetching; the batch in flight finishes and is committed (used by SIGTERM)."""
        self._stopping.set()
        self._queue.close()  # also wakes a fetch loop waiting for queue room

    async def stop(self) -> None:
        self.request_stop()
        try:
            done, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_timeout_s)
            for task in pending:
                log.warning("%s did not stop within %g s; cancelling it", task.get_name(),
                            self.settings.shutdown_timeout_s)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.wait_for(self._commits.close(), self.settings.shutdown_timeout_s)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._reporter.cancel()
            if self._reloader is not None:
                self._reloader.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
            self.metrics.close()
            if self._txn is not None:
                await self._txn.close()
            await self._consumer.stop()  # leaves the group
            await self._producer.stop()
            self.runner.close()
            log.info("worker %s stopped: %s", self.name, self.stats)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT (or a fatal error), then stop cleanly."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)  # not the default: SIGHUP would end the process
        await self.start()
        try:
            watched = [*self._tasks, *([self._commits.task] if self._commits.task else [])]
            stop_wait = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*watched, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await self.stop()

    def reload(self) -> None:
        """Reload the weights file (SIGHUP): loaded off the event loop, served from the next batch on."""
        if not self.settings.weights:
            log.warning("SIGHUP: no weights file to reload (--weights or STREAMER_WEIGHTS); serving on")
            return
        self.weights.request()

    def _served(self, model: Model) -> None:
        self.model = model

    def describe(self) -> str:
        return f"stage {self.route.stage} of {self.route.model}" if self.route.stage else self.model.name

    async def _report_loop(self) -> None:
        """Log throughput, batch size, queue wait and time in the model every ``stats_interval_s``."""
        prev = dataclasses.replace(self.stats)
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            now = self.stats
            line = now.since(prev, self.settings.stats_interval_s)
            if line is not None:
                log.info("%s: %s, buffered %d", self.describe(), line, len(self._queue))
            # The capacity figure (items/s of model time) goes out at the group's next rebalance.
            rates = now.rates_since(prev, self.policy.max_batch_size / 2)
            if rates is not None:
                rate, sustained = rates
                self._measured = rate if self._measured is None else 0.7 * self._measured + 0.3 * rate
                self._throughput = sustained if self._throughput is None else 0.7 * self._throughput + 0.3 * sustained
            prev = dataclasses.replace(now)

    # -- rebalance ---------------------------------------------------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalances += 1
        self.telemetry.rebalanced(revoked)
        if not revoked:
            return
        self._revoking = revoked
        dropped = self._queue.drop(lambda key: key[0] not in revoked)
        # Finish and commit what is already running, while the partitions are still ours.
        try:
            await asyncio.wait_for(self.pipeline.drain(), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning("revoke: in-flight work did not finish in time; it will not be committed here")
        for tp in revoked:
            self._epochs[tp] += 1
        if self._txn is not None:
            await self._txn.release(revoked)
        log.info("partitions revoked: %s (%d queued records left for the next owner)",
                 sorted(f"{tp.topic}-{tp.partition}" for tp in revoked), dropped)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._revoking = set()
        self._paused = False
        if self._txn is not None:
            # Paused until their offsets are stable; the transactions' offsets go as this generation's member.
            self._txn.assigned(member_of(self._consumer, self.settings.group_instance_id), assigned)
        log.info("partitions assigned: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

    # -- background tasks ----------------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        while not self._stopping.is_set():
            room = self.max_buffered - len(self._queue)
            if room <= 0:
                await self._wait_for_room()
                continue
            if self._paused:
                consumer.resume(*(consumer.paused() - (self._txn.taking.keys() if self._txn is not None else set())))
                self._paused = False
            if self._txn is not None and self._txn.error is not None:
                raise self._txn.error
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=room)
            except (KafkaError, UnicodeDecodeError, ValueError, AssertionError) as exc:
                # What a record holds never gets here (see streamer._records); a poll that fails is
                # the cluster's trouble (or aiokafka's). Retriable: say so (once per interval) and poll
                # again. Not retriable (authorisation, fencing): this member cannot go on.
                if isinstance(exc, KafkaError) and not exc.retriable:
                    raise
                log.warning("polling for records failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if self._stopping.is_set():
                break  # not started: these records go to whoever reads the partition next
            self._enqueue(batches)

    def _enqueue(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Records fetched, into the batch queue: those of partitions still ours and readable."""
        now = time.monotonic()
        if self.target is not None:
            self.target.arrived(sum(len(records) for records in batches.values()), now)
        waited_s = 0.0
        if self.pacing is not None:
            waited_s = self.pacing.waited_s  # as these records were fetched
            self._pace(batches, now)
        owned = self._consumer.assignment()
        for tp, records in batches.items():
            if tp not in owned or tp in self._revoking or (
                    self._txn is not None and tp in self._txn.taking):
                continue
            self.telemetry.fetched(len(records))
            self._queue.put((tp, self._epochs[tp], now), records, waited_s=waited_s)

    def _pace(self, batches: dict[TopicPartition, list[Any]], now: float) -> None:
        """Count a poll's records for the fetch pacing (the first record of each run stands for its run's size),
        and hand a new pacing to the fetcher: its next fetches use it."""
        assert self.pacing is not None
        count = size = 0
        for records in batches.values():
            value = records[0].value
            count += len(records)
            size += len(records) * (len(value) if value is not None else 0)
        if self.pacing.seen(count, size, now, self._leaders):
            fetcher = self._consumer._fetcher  # aiokafka reads both for every fetch request it builds
            fetcher._fetch_min_bytes = self.pacing.min_bytes
            fetcher._fetch_max_wait_ms = self.pacing.max_wait_ms

    def _leaders(self) -> int:
        """How many brokers lead the partitions this worker reads (each gets a fetch of its own)."""
        cluster = self._consumer._client.cluster
        return len({cluster.leader_for_partition(tp) for tp in self._consumer.assignment()})

    async def _wait_for_room(self) -> None:
        """Backpressure: stop fetching while the queue is full.

        Not fetching is enough: the consumer holds at most one fetch response per partition.
        Pausing would drop that prefetched data, so partitions are paused only when the queue
        stays full for a third of ``max_poll_interval_ms``; then an empty poll keeps this member
        alive in the group while the model catches up.
        """
        patience = self.settings.max_poll_interval_ms / 3000
        try:
            await asyncio.wait_for(self._queue.wait_for_room(self.max_buffered), patience)
        except TimeoutError:
            if not self._paused:
                self._consumer.pause(*self._consumer.assignment())
                self._paused = True
            # Paused: returns nothing and resets the poll timer; unless an exactly-once takeover resumed a
            # partition meanwhile, and what it returns then is queued, never dropped (its offsets would be passed).
            batches = await self._consumer.getmany(timeout_ms=0)
            if not self._stopping.is_set():  # (stopping: not started, so whoever reads the partition next does)
                self._enqueue(batches)

    def _void(self, tp: TopicPartition) -> None:
        """Exactly-once: what this worker holds of ``tp`` is void (a transaction failed, or the partition was
        fenced); batches fetched before are skipped, and what is read of it next comes after a takeover."""
        self._epochs[tp] += 1
        self._queue.drop(lambda key: key[0] != tp)


# The cyclic collector runs a young-generation pass every 700 allocations by default: a batch of records makes
# thousands of short-lived objects (freed by reference counting, cycle-free), so pass less often.
_GC_THRESHOLDS = (20_000, 20, 20)
