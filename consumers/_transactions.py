"""Exactly-once delivery: results and consumed offsets in one Kafka transaction per input partition.

aiokafka's transactions lack consumer-group fencing (KIP-447), so zombies are fenced the older
way: one transactional producer per input partition, with ``transactional.id`` =
``<group>.<topic>.<partition>``. Whoever owns the partition next starts a producer with the same
id; the broker then bumps the epoch, aborts the old owner's open transaction and refuses its
later commits (``ProducerFenced``). After an error whose outcome is unknown (a commit timeout),
the producer is discarded: its replacement's start aborts the transaction, and the worker seeks
back to the batch's first offset instead of guessing.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer, TopicPartition

from streamer import kafka
from streamer.config import WorkerSettings

__all__ = ["TransactionalProducers"]

log = logging.getLogger("streamer.worker")


class TransactionalProducers:
    def __init__(self, settings: WorkerSettings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.settings.group_id}.{tp.topic}.{tp.partition}"

    async def get(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is None:
            # A short transaction timeout bounds how long a frozen owner's open transaction can hold
            # back read_committed readers when nothing else aborts it.
            producer = kafka.producer(self.settings, transactional_id=self.transactional_id(tp),
                                      client_id=f"{self.settings.client_id}-txn-{self.worker}",
                                      transaction_timeout_ms=max(10_000, 2 * self.settings.session_timeout_ms),
                                      max_batch_size=self.settings.producer_batch_bytes,
                                      request_timeout_ms=self.settings.produce_timeout_ms)
            async with kafka.translated_errors(self.settings):
                await producer.start()  # fences any older producer of this id and aborts its open transaction
            self._producers[tp] = producer
        return producer

    async def discard(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.settings.shutdown_timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.warning("closing the producer of %s failed: %r", tp, exc)

    async def release(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            await self.discard(tp)

    async def close(self) -> None:
        await self.release(set(self._producers))
