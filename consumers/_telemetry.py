"""What a worker reports to Prometheus: per record and batch as it goes, lag and scaling every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas import now_ms
from streamer import kafka
from streamer.config import WorkerSettings
from streamer.metrics import WorkerMetrics, scaling_estimate

from ._items import Item, Outcome

__all__ = ["Telemetry"]

log = logging.getLogger("streamer.worker")


class Telemetry:
    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._next: dict[TopicPartition, int] = {}  # next offset to process, per partition
        self._last_end: tuple[float, int] | None = None
        self._arrival = 0.0

    # -- as records go -------------------------------------------------------------------------------------
    def fetched(self, n: int) -> None:
        self.metrics.labels(self.metrics.requests).inc(n)

    def batch(self, size: int, inference_s: float, queue_waits_s: list[float]) -> None:
        m = self.metrics
        m.labels(m.batch_size).observe(size)
        m.labels(m.inference).observe(inference_s)
        wait = m.labels(m.queue_wait)
        for w in queue_waits_s:
            wait.observe(w)

    def published(self, batch: list[Item], outcomes: list[Outcome]) -> None:
        m = self.metrics
        now = now_ms()
        for o in outcomes:
            if o.forward is not None:
                m.labels(m.results, "forwarded").inc()
            elif o.result is not None:
                m.labels(m.results, o.result.status).inc()
                msg = o.item.message
                if msg is not None and msg.created_ms is not None and o.result.status == "ok":
                    m.labels(m.latency).observe(max(0, now - msg.created_ms) / 1000)
            if o.dead_letter is not None:
                m.labels(m.dead_letters, o.dead_letter.code).inc()
        for item in batch:
            self._next[item.tp] = item.offset + 1

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
