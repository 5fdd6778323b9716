"""Producing records the way the data is shaped: appended to the producer's open record batch per partition.

``producer.send`` costs a coroutine, a future and a partitioner call per record. Where records come in
batches (a worker's results, a client's stream of requests) they are appended to the accumulator's open
record batch of each destination partition instead, with one delivery future per record batch, and the
partition of each key is remembered. Both read aiokafka's (pinned, 0.14) internals; the tests of the worker
and the client cover them.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerClosed

from schemas import Codec, InferenceRequest, RoutingHeaders

__all__ = ["KeyPartitions", "append_open", "append_record", "fail_pending", "pending_topics", "send_request"]

_OWN_KEY: Any = object()
QUEUED_BATCHES = 16  # per partition (of max_batch_size bytes each, 16 KiB by default) before a record waits


async def send_request(producer: AIOKafkaProducer, topic: str, request: InferenceRequest, codec: Codec,
                       key: bytes | None = _OWN_KEY) -> asyncio.Future[Any]:
    """One request built as a model, sent as a record: its encoding, its key (``request.key`` unless ``key`` is
    given) and its routing headers (WIRE.md). How ``streamer publish`` and replay's republish send requests; the
    client's stream and submit encode and append whole chunks instead (``StreamerClient._send``)."""
    if key is _OWN_KEY:
        key = request.key.encode() if request.key else None
    future: asyncio.Future[Any] = await producer.send(topic, codec.encode_request(request), key=key,
                                                      headers=RoutingHeaders(request.id, request.reply_to).build())
    return future


async def append_record(producer: AIOKafkaProducer, tp: TopicPartition, key: bytes | None, value: bytes,
                        headers: list[tuple[str, bytes]]) -> Any:
    """The producer's open record batch for ``tp`` with the record appended: the one the sender has not taken
    yet, else a new one. Records so share a produce request while the last one is in flight, as
    ``producer.send`` would, without its per-record future and coroutine. The record batch's ``future``
    resolves when it is written (or fails).

    Unlike ``send``, which waits while one full batch for ``tp`` waits for the sender, up to ``QUEUED_BATCHES``
    batches queue per partition before this waits (at most ``request_timeout_ms``): while a partition has no
    leader (its broker died, and the cluster has not moved its leadership yet, 9 s by default), records for the
    others go on, as the Java producer's ``buffer.memory`` allows, rather than every caller stopping at the
    first record for that partition. The sender takes them in order, one request at a time per partition.

    Reads aiokafka's message accumulator: ``_batches``, ``_append_batch``, ``MessageBatch._builder``.
    """
    acc = producer._message_accumulator
    timeout = producer._request_timeout_ms / 1000
    while True:
        if acc._closed:
            raise ProducerClosed()
        if acc._exception is not None:
            raise copy.copy(acc._exception)
        pending = acc._batches.get(tp)
        if pending:
            last = pending[-1]
            if last._builder.append(timestamp=None, key=key, value=value, headers=headers) is not None:
                return last
            if len(pending) >= QUEUED_BATCHES:
                await pending[0].wait_drain(timeout)  # back-pressure, as send has
                continue
        batch = acc._append_batch(acc.create_builder(), tp)  # wakes the sender
        batch._builder.append(timestamp=None, key=key, value=value, headers=headers)  # the first record always fits
        return batch


def append_open(producer: AIOKafkaProducer, tp: TopicPartition, key: bytes | None, value: bytes,
                headers: list[tuple[str, bytes]]) -> Any:
    """Appends to the open record batch of ``tp`` (one the sender has not taken) if there is one with room, and
    returns it; else None (then :func:`append_record`). Never a batch the sender took: it has its sequence
    numbers by then, and a record added after would break the idempotent producer's sequence."""
    pending = producer._message_accumulator._batches.get(tp)
    if pending:
        last = pending[-1]
        if last._builder.append(timestamp=None, key=key, value=value, headers=headers) is not None:
            return last
    return None


def fail_pending(producer: AIOKafkaProducer, topic: str, exc: BaseException) -> int:
    """Fails every record batch for ``topic`` that the producer still holds (not in flight), and stops tracking
    the topic: for a topic found deleted, whose records would otherwise wait ``request_timeout_ms`` for a
    partition leader that will not come, and which every later metadata refresh would ask about again (aiokafka
    tracks each topic a producer ever wrote to: a worker serving short-lived clients would ask for more and more
    deleted reply topics). A send to the topic tracks it again. Returns how many record batches failed. Reads
    aiokafka's message accumulator (``_batches``, ``_pop_batch``) and client (``_topics``)."""
    producer.client._topics.discard(topic)
    acc = producer._message_accumulator
    failed = 0
    for tp in [tp for tp in acc._batches if tp.topic == topic]:
        while acc._batches.get(tp):
            acc._pop_batch(tp).failure(exception=copy.copy(exc))
            failed += 1
    return failed


def pending_topics(producer: AIOKafkaProducer) -> set[str]:
    """The topics of the record batches the producer holds and has not sent (a batch the sender took and must
    retry is held again once its produce request failed). Reads aiokafka's message accumulator."""
    return {tp.topic for tp, queued in producer._message_accumulator._batches.items() if queued}


class KeyPartitions:
    """The producers' partitioner's choice for each key, remembered while the topic's partition count holds
    (for producers made alike, by :func:`streamer.kafka.producer` from one configuration)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], dict[bytes, int]] = {}  # (topic, partition count) -> key -> partition

    def partition(self, producer: AIOKafkaProducer, topic: str, key: bytes | None) -> int:
        count = len(producer.client.cluster.partitions_for_topic(topic) or ())
        if key is None or not count:
            return int(producer._partition(topic, None, None, None, key, None))
        cache = self._cache.get((topic, count))
        if cache is None:
            if len(self._cache) > 1000:
                self._cache.clear()
            cache = self._cache[(topic, count)] = {}
        p = cache.get(key)
        if p is None:
            if len(cache) > 100_000:
                cache.clear()
            p = cache[key] = int(producer._partition(topic, None, None, None, key, None))
        return p
