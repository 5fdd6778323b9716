"""What a worker reports to Prometheus: per record and batch as it goes, lag and scaling every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas import now_ms
from streamer import kafka
from streamer.config import WorkerSettings
from streamer.metrics import WorkerMetrics, observe_many, scaling_estimate

from ._batch import Batch, BatchStats

__all__ = ["Telemetry"]

log = logging.getLogger("streamer.worker")


class Telemetry:
    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._next: dict[TopicPartition, int] = {}  # next offset to process, per partition
        self._last_end: tuple[float, int] | None = None
        self._arrival = 0.0
        # Children bound once: a label lookup per record would cost more than the count.
        m = metrics
        self._requests = m.labels(m.requests)
        self._statuses = {s: m.labels(m.results, s) for s in ("ok", "error", "expired", "forwarded")}
        self._latency = m.labels(m.latency)
        self._batch_size = m.labels(m.batch_size)
        self._inference = m.labels(m.inference)
        self._queue_wait = m.labels(m.queue_wait)
        self._dead: dict[str, Any] = {}

    # -- as records go -------------------------------------------------------------------------------------
    def fetched(self, n: int) -> None:
        self._requests.inc(n)

    def published(self, batch: Batch, st: BatchStats) -> None:
        """Counted once per batch, from its stats: batch size, model time and queue waits of the items that
        ran, results by status, dead letters by code, and the latency of each ok result."""
        if st.runnable:
            self._batch_size.observe(st.runnable)
            self._inference.observe(st.inference_s)
            for wait_s, n in st.queue_waits:
                observe_many(self._queue_wait, wait_s, n)
        for status, n in st.statuses.items():
            self._statuses[status].inc(n)
        for code, n in st.dead_letters.items():
            child = self._dead.get(code)
            if child is None:
                child = self._dead[code] = self.metrics.labels(self.metrics.dead_letters, code)
            child.inc(n)
        if st.statuses["ok"]:
            # Latency in whole ms (created_ms's resolution): a batch's results share a few values, each
            # observed once with its count.
            now, ages = now_ms(), Counter[int]()
            for st_i, created in zip(batch.status, batch.created, strict=True):
                if st_i == "ok" and created is not None:
                    ages[max(0, now - created)] += 1
            for age, n in ages.items():
                observe_many(self._latency, age / 1000, n)
        for run in batch.runs:
            self._next[run.tp] = run.records[-1].offset + 1

    def rebalanced(self, revoked: set[TopicPartition]) -> None:
        self.metrics.labels(self.metrics.rebalances).inc()
        for tp in revoked:
            self._next.pop(tp, None)

    # -- every few seconds ----------------------------------------------------------------------------------
    async def run(self, consumer: AIOKafkaConsumer, capacity: Callable[[], float], interval_s: float = 2.0) -> None:
        """Lag per assigned partition, the topic's arrival rate and lag, and the scaling signal."""
        async with kafka.admin(self.settings) as admin:  # raises only if the cluster went away since start
            while True:
                with contextlib.suppress(KafkaError):
                    await self._sample(consumer, admin, capacity)
                await asyncio.sleep(interval_s)

    async def _sample(
        self, consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient, capacity: Callable[[], float]
    ) -> None:
        topic = self.settings.request_topic
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        lags: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            done = self._next.get(tp)
            if done is None:
                with contextlib.suppress(KafkaError, AssertionError):
                    done = await consumer.position(tp)
            if tp in ends and done is not None:
                lags[(tp.topic, tp.partition)] = max(0, ends[tp] - done)
        m = self.metrics
        m.set_lag(lags)
        committed = await admin.list_consumer_group_offsets(self.settings.group_id, partitions=tps)
        total_lag = 0
        for tp in tps:
            done = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else starts[tp]
            total_lag += max(0, ends[tp] - done)
        now, end_sum = time.monotonic(), sum(ends.values())
        if self._last_end is not None and now > self._last_end[0]:
            rate = (end_sum - self._last_end[1]) / (now - self._last_end[0])
            self._arrival = rate if not self._arrival else 0.5 * self._arrival + 0.5 * rate
        self._last_end = (now, end_sum)
        cap = capacity()
        m.labels(m.arrival).set(self._arrival)
        m.labels(m.topic_lag).set(total_lag)
        m.labels(m.capacity).set(cap)
        m.labels(m.workers_needed).set(scaling_estimate(self._arrival, total_lag, cap, self.settings.scale_drain_s))
