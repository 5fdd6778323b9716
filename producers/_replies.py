"""The reply reader: one task that matches results to waiting requests by request id.

If the task dies, every waiter fails with the reason, and so does every later request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from aiokafka import AIOKafkaConsumer

from schemas import Codec, InferenceResult, WireError
from streamer.errors import FatalError

__all__ = ["ReplyRouter"]

log = logging.getLogger("streamer.client")

_REMEMBER = 100_000  # completed ids kept to tell duplicates from strangers


class ReplyRouter:
    def __init__(self, consumer: AIOKafkaConsumer, codec: Codec) -> None:
        self._consumer = consumer
        self._codec = codec
        self._waiters: dict[str, asyncio.Future[InferenceResult]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.duplicates_dropped = 0
        self.unknown_dropped = 0
        self.undecodable = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="streamer-replies")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(FatalError("the client was closed"))

    def expect(self, request_id: str) -> asyncio.Future[InferenceResult]:
        if self._failure is not None:
            raise FatalError(f"the reply reader has stopped: {self._failure!r}") from self._failure
        if request_id in self._waiters or request_id in self._done:
            raise ValueError(f"request id {request_id!r} is already in use by this client")
        fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        return fut

    def forget(self, request_id: str) -> None:
        """The caller gave up (timeout, cancel): a late reply is then dropped as a duplicate."""
        if self._waiters.pop(request_id, None) is not None:
            self._remember(request_id)

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def _remember(self, request_id: str) -> None:
        self._done[request_id] = None
        if len(self._done) > _REMEMBER:
            self._done.popitem(last=False)

    def _fail_all(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _run(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._deliver(record.value or b"")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("the reply reader failed; failing every waiting request")
            self._failure = exc
            self._fail_all(FatalError(f"the reply reader failed: {exc!r}"))
            raise

    def _deliver(self, value: bytes) -> None:
        try:
            result = self._codec.decode_result(value)
        except WireError:
            self.undecodable += 1
            log.warning("dropped an undecodable reply")
            return
        fut = self._waiters.pop(result.id, None)
        if fut is None:
            if result.id in self._done:
                self.duplicates_dropped += 1
            else:
                self.unknown_dropped += 1
            return
        self._remember(result.id)
        if not fut.done():
            fut.set_result(result)
