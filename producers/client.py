"""StreamerClient: publish requests, await their results.

Reply routing: each client reads its own reply route and nothing else. By default that is
a private reply topic (``<results_topic>.reply.<client-id>``, one partition) created at
start and deleted at close. A client that may not create topics names a shared topic and
a partition of it to own (``reply_topic`` + ``reply_partition``). Either way the route is
written into every request, and workers publish the result there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from aiokafka import TopicPartition

from schemas import (
    Codec,
    InferenceRequest,
    InferenceResult,
    Limits,
    ReplyTo,
    RequestWriter,
    RoutingHeaders,
    now_ms,
)
from streamer import kafka
from streamer.config import ClientSettings, load_settings
from streamer.errors import FatalError, InferenceError
from streamer.tracing import ClientTracing, tracing

from ._replies import ReplyRouter, Sink

__all__ = ["StreamerClient", "request_headers"]

_REPLY_RETENTION_MS = str(60 * 60 * 1000)
_CHUNK = 256  # the most inputs of a stream encoded and handed to the producer in one go


def request_headers(request: InferenceRequest) -> list[tuple[str, bytes]]:
    """Kafka headers for a request: the schema version and the routing facts (see WIRE.md)."""
    return RoutingHeaders(request.id, request.reply_to).build()


class StreamerClient:
    """Async context manager: ``async with StreamerClient(...) as client: await client.infer(...)``."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        reply_partition: int | None = None,
        limits: Limits | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings or load_settings(ClientSettings, **overrides)
        self.client_uid = uuid.uuid4().hex[:12]
        self.codec = Codec(limits)
        self._private = self.settings.reply_topic is None
        topic = self.settings.reply_topic or f"{self.settings.results_topic}.reply.{self.client_uid}"
        if not self._private and reply_partition is None:
            raise ValueError("a shared reply_topic needs a reply_partition that this client owns")
        self.reply_to = ReplyTo(topic=topic, partition=None if self._private else reply_partition)
        cid = f"{self.settings.client_id}-client-{self.client_uid}"
        self._producer = kafka.producer(self.settings, client_id=cid, linger_ms=0)
        # read_committed: results of aborted transactions (exactly-once workers) are never seen.
        self._consumer = kafka.consumer(self.settings, client_id=cid, group_id=None, isolation_level="read_committed")
        self._router = ReplyRouter(self._consumer, self.codec, self.settings.max_in_flight)
        tracer = tracing()
        self._tracing = ClientTracing(tracer, self.settings.request_topic) if tracer is not None else None
        if self._tracing is not None:
            self._router.observer = self._tracing.answered
        self._writer = RequestWriter(self.codec, self.reply_to)
        self._headers = RoutingHeaders.for_route(self.reply_to)
        self._partitions = kafka.KeyPartitions()
        self._tps: dict[int, TopicPartition] = {}
        self._open: dict[TopicPartition, tuple[Any, list[str]]] = {}  # the record batch being filled, its ids
        self._known: set[str] = set()
        # Request ids: 80 random bits for this client, then a counter (unique without a uuid per request).
        self._id_prefix = uuid.uuid4().hex[:20]
        self._counter = itertools.count()
        self._started = False

    @property
    def duplicates_dropped(self) -> int:
        """Results for requests already answered (at-least-once redelivery), dropped."""
        return self._router.duplicates_dropped

    @property
    def unknown_dropped(self) -> int:
        """Results on the reply topic for requests this client is not waiting for (another client's), dropped."""
        return self._router.unknown_dropped

    @property
    def undecodable_dropped(self) -> int:
        """Records on the reply topic that are not results, dropped (each is logged)."""
        return self._router.undecodable

    @property
    def pending(self) -> int:
        return self._router.pending

    async def __aenter__(self) -> StreamerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        tp = TopicPartition(self.reply_to.topic, self.reply_to.partition or 0)
        try:
            if self._private:
                spec = kafka.TopicSpec(self.reply_to.topic, partitions=1,
                                       config={"retention.ms": _REPLY_RETENTION_MS})
                await kafka.ensure_topics(self.settings, [spec])
            async with kafka.translated_errors(self.settings):
                await self._producer.start()
                await self._consumer.start()
            self._consumer.assign([tp])
            if self._private:
                await self._consumer.seek_to_beginning(tp)
            else:
                await self._consumer.seek_to_end(tp)
            await self._consumer.position(tp)  # resolve now, before any request is sent
        except BaseException:
            await self._consumer.stop()
            await self._producer.stop()
            raise
        self._router.start()
        self._started = True

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        await self._router.close()
        await self._consumer.stop()
        await self._producer.stop()
        if self._private:
            with contextlib.suppress(Exception):
                await kafka.delete_topics(self.settings, [self.reply_to.topic])

    # -- requests --------------------------------------------------------------------------------------
    async def submit(
        self,
        inputs: Any,
        *,
        model: str,
        key: str | None = None,
        timeout_s: float | None = None,
        deadline_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> asyncio.Future[InferenceResult]:
        """Publish one request; the future resolves to its result (any status) or raises
        :class:`InferenceTimeout`. Cancelling the future abandons the request."""
        self._check_started()
        if self._router.full:
            await self._router.room()
        timeout = timeout_s if timeout_s is not None else self.settings.timeout_s
        created = now_ms()
        rid = request_id if request_id is not None else self._next_id()
        value = self._writer.request(rid, model, inputs, key, deadline_ms if deadline_ms is not None
                                     else created + int(timeout * 1000), created, metadata,
                                     self._writer.metadata(metadata))
        fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self._router.expect(rid, fut, timeout)
        fut.add_done_callback(functools.partial(self._abandoned, rid))
        try:
            await self._send([rid], [key.encode() if key is not None else None], [value], model)
        except BaseException:
            self._router.forget(rid)
            fut.cancel()  # the caller gets the exception, not the future
            raise
        return fut

    async def infer(self, inputs: Any, *, model: str, check: bool = True, **kwargs: Any) -> InferenceResult:
        """Publish one request and wait for its result.

        Raises :class:`InferenceTimeout` when no result arrives in time, and (with ``check``)
        :class:`InferenceError` for an ``error`` or ``expired`` result.
        """
        result = await (await self.submit(inputs, model=model, **kwargs))
        if check and result.status != "ok":
            raise InferenceError(result)
        return result

    async def stream(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        model: str,
        key: Callable[[Any], str | None] | None = None,
        timeout_s: float | None = None,
        deadline_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AsyncIterator[InferenceResult]:
        """Publish every input and yield results as they complete (any status).

        At most ``max_in_flight`` requests are outstanding at once; a timeout raises
        :class:`InferenceTimeout`, and so does an input that cannot be sent (what :meth:`submit` raises).
        This is the client's fast path: requests are encoded and handed to the producer as they come, a chunk
        at a time, with no future, timer or validated model per request.
        """
        self._check_started()
        sink = Sink()
        feeder = asyncio.create_task(self._feed(inputs, sink, model, key, timeout_s, deadline_ms, metadata))
        try:
            while True:
                if sink.results:
                    yield sink.results.popleft()
                    continue
                if sink.error is not None:
                    raise sink.error
                if feeder.done() and sink.outstanding == 0:
                    return
                await sink.wait()
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            self._router.forget_sink(sink)

    async def _feed(self, inputs: Iterable[Any] | AsyncIterable[Any], sink: Sink, model: str,
                    key: Callable[[Any], str | None] | None, timeout_s: float | None, deadline_ms: int | None,
                    metadata: dict[str, Any] | None) -> None:
        """Sends the stream's requests, a chunk at a time (what the iterator gives at once, up to the window)."""
        timeout = timeout_s if timeout_s is not None else self.settings.timeout_s
        meta = self._writer.metadata(metadata)
        try:
            if isinstance(inputs, AsyncIterable):
                async for x in inputs:
                    await self._feed_chunk([x], sink, model, key, timeout, deadline_ms, metadata, meta)
            else:
                it = iter(inputs)
                while True:
                    if self._router.full:
                        await self._router.room()
                    chunk = list(itertools.islice(it, min(_CHUNK, self._router.max_in_flight - self._router.pending)))
                    if not chunk:
                        break
                    await self._feed_chunk(chunk, sink, model, key, timeout, deadline_ms, metadata, meta)
        except Exception as exc:  # noqa: BLE001 - the stream raises it
            sink.fail(exc)
        finally:
            sink._notify()  # the feed is over: the stream may end

    async def _feed_chunk(self, chunk: list[Any], sink: Sink, model: str, key: Callable[[Any], str | None] | None,
                          timeout_s: float, deadline_ms: int | None, metadata: dict[str, Any] | None,
                          meta: bytes | None) -> None:
        if self._router.full:
            await self._router.room()
        created = now_ms()
        deadline = deadline_ms if deadline_ms is not None else created + int(timeout_s * 1000)
        ids, keys, values = [], [], []
        write, next_id, expect = self._writer.request, self._next_id, self._router.expect
        for x in chunk:
            k = key(x) if key is not None else None
            rid = next_id()
            values.append(write(rid, model, x, k, deadline, created, metadata, meta))
            keys.append(k.encode() if k is not None else None)
            ids.append(rid)
        for rid in ids:
            expect(rid, sink, timeout_s)
        sink.outstanding += len(ids)
        try:
            await self._send(ids, keys, values, model)
        except BaseException as exc:
            for rid in ids:
                self._router.fail(rid, exc)
            raise

    async def _send(self, ids: list[str], keys: list[bytes | None], values: list[bytes], model: str) -> None:
        """Hands requests to the producer: appended to the open record batch of each one's partition (see
        ``streamer.kafka.append_record``); a record batch that fails fails the requests in it."""
        producer, topic = self._producer, self.settings.request_topic
        if topic not in self._known:
            await producer.client._wait_on_metadata(topic)  # what producer.send does first (aiokafka 0.14)
            self._known.add(topic)
        partition, headers, traced = self._partitions.partition, self._headers, self._tracing
        for rid, k, value in zip(ids, keys, values, strict=True):
            tp = self._tps.get(p := partition(producer, topic, k))
            if tp is None:
                tp = self._tps[p] = TopicPartition(topic, p)
            h = headers(rid)
            if traced is not None:
                h += traced.started(rid, model)
            batch = kafka.append_open(producer, tp, k, value, h) or await kafka.append_record(
                producer, tp, k, value, h)
            current = self._open.get(tp)
            if current is not None and current[0] is batch:
                current[1].append(rid)
                continue
            sent = [rid]
            self._open[tp] = (batch, sent)
            batch.future.add_done_callback(functools.partial(self._delivered, tp, batch, sent))

    def _delivered(self, tp: TopicPartition, batch: Any, ids: list[str], future: asyncio.Future[Any]) -> None:
        if (current := self._open.get(tp)) is not None and current[0] is batch:
            del self._open[tp]
        if future.cancelled():  # the producer dropped it (closing): a failure to send, not the caller's cancel
            exc: BaseException | None = FatalError("the request was not sent: the producer dropped its record batch")
        else:
            exc = future.exception()
        if self._tracing is not None:
            self._tracing.published(ids, exc)
        if exc is not None:
            for rid in ids:
                self._router.fail(rid, exc)

    def _abandoned(self, request_id: str, fut: asyncio.Future[InferenceResult]) -> None:
        if fut.cancelled():
            self._router.forget(request_id)

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter):012x}"

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("the client is not started: use 'async with StreamerClient(...)'")


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x
