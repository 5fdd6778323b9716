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
    RoutingHeaders,
    new_request_id,
    now_ms,
)
from streamer import kafka
from streamer.config import ClientSettings, load_settings
from streamer.errors import InferenceError, InferenceTimeout

from ._replies import ReplyRouter

__all__ = ["StreamerClient", "request_headers"]

_REPLY_RETENTION_MS = str(60 * 60 * 1000)


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
        self._router = ReplyRouter(self._consumer, self.codec)
        self._window = asyncio.Semaphore(self.settings.max_in_flight)
        self._started = False

    @property
    def duplicates_dropped(self) -> int:
        return self._router.duplicates_dropped

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
        if not self._started:
            raise RuntimeError("the client is not started: use 'async with StreamerClient(...)'")
        timeout = timeout_s if timeout_s is not None else self.settings.timeout_s
        created = now_ms()
        request = InferenceRequest(
            id=request_id or new_request_id(),
            model=model,
            inputs=inputs,
            key=key,
            reply_to=self.reply_to,
            deadline_ms=deadline_ms if deadline_ms is not None else created + int(timeout * 1000),
            created_ms=created,
            metadata=metadata or {},
        )
        value = self.codec.encode_request(request)
        await self._window.acquire()
        try:
            fut = self._router.expect(request.id)
        except BaseException:
            self._window.release()
            raise
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, self._time_out, fut, request.id, timeout)

        def _done(f: asyncio.Future[InferenceResult]) -> None:
            timer.cancel()
            self._window.release()
            if f.cancelled():
                self._router.forget(request.id)

        fut.add_done_callback(_done)
        try:
            delivery = await self._producer.send(
                self.settings.request_topic, value,
                key=key.encode() if key is not None else None, headers=request_headers(request),
            )
        except BaseException as exc:
            self._router.forget(request.id)
            if not fut.done():
                fut.set_exception(exc)
            raise
        delivery.add_done_callback(lambda d: self._delivery_failed(d, fut, request.id))
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
        **kwargs: Any,
    ) -> AsyncIterator[InferenceResult]:
        """Publish every input and yield results as they complete (any status).

        At most ``max_in_flight`` requests are outstanding at once; a timeout raises.
        """
        done: asyncio.Queue[asyncio.Future[InferenceResult] | None] = asyncio.Queue()
        futures: list[asyncio.Future[InferenceResult]] = []

        async def feed() -> None:
            try:
                async for x in _aiter(inputs):
                    fut = await self.submit(x, model=model, key=key(x) if key else None, **kwargs)
                    futures.append(fut)
                    fut.add_done_callback(done.put_nowait)
            finally:
                done.put_nowait(None)

        feeder = asyncio.create_task(feed())
        remaining, fed = 0, False
        try:
            while not fed or remaining:
                item = await done.get()
                if item is None:
                    fed = True
                    feeder.result()  # re-raise a publishing error
                    remaining += len(futures)
                    continue
                remaining -= 1
                yield item.result()
        finally:
            feeder.cancel()
            for fut in futures:
                fut.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    def _time_out(self, fut: asyncio.Future[InferenceResult], request_id: str, timeout: float) -> None:
        if not fut.done():
            self._router.forget(request_id)
            fut.set_exception(InferenceTimeout(request_id, timeout))

    def _delivery_failed(self, delivery: asyncio.Future[Any], fut: asyncio.Future[InferenceResult],
                         request_id: str) -> None:
        if delivery.cancelled() or delivery.exception() is None or fut.done():
            return
        self._router.forget(request_id)
        fut.set_exception(delivery.exception())  # type: ignore[arg-type]


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x
