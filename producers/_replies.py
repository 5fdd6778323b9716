"""The reply reader: one task that matches results to waiting requests by request id.

A waiting request is a future (``submit``) or a stream's sink (``stream``, which needs no future per
request). Deadlines are kept in one queue per timeout, in the order requests were sent, and checked by one
timer for the whole client, not a timer per request. The number of waiting requests is the client's
window (``max_in_flight``).

If the task dies, every waiter fails with the reason, and so does every later request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from schemas import Codec, InferenceResult, ResultReader, WireError
from streamer.errors import FatalError, InferenceTimeout

__all__ = ["ReplyRouter", "Sink"]

log = logging.getLogger("streamer.client")

_REMEMBER = 100_000  # completed ids kept to tell duplicates from strangers
_SWEEP_S = 0.1  # the longest the deadline timer sleeps: it also drops answered requests from the queues


class Sink:
    """Where a stream's results go: a queue the stream reads, and the error that ends it."""

    __slots__ = ("_wake", "error", "outstanding", "results")

    def __init__(self) -> None:
        self.results: deque[InferenceResult] = deque()
        self.outstanding = 0  # sent and not answered
        self.error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None

    def put(self, result: InferenceResult) -> None:
        self.results.append(result)
        self.outstanding -= 1
        self._notify()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait(self) -> None:
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None


Waiter = asyncio.Future[InferenceResult] | Sink


class ReplyRouter:
    def __init__(self, consumer: AIOKafkaConsumer, codec: Codec, max_in_flight: int = 10_000) -> None:
        self._consumer = consumer
        self._reader = ResultReader(codec)
        self.max_in_flight = max_in_flight
        self._waiters: dict[str, Waiter] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._deadlines: dict[float, deque[tuple[float, str]]] = {}  # timeout -> (expiry, id), in sending order
        self._timer: asyncio.TimerHandle | None = None
        self._room: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.duplicates_dropped = 0
        self.unknown_dropped = 0
        self.undecodable = 0
        # Told when each request is over: its result, or the exception its waiter got, or neither (given up).
        # Tracing only (streamer.tracing.ClientTracing.answered); None costs nothing.
        self.observer: Callable[..., None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="streamer-replies")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        self._fail_all(FatalError("the client was closed"))

    # -- the window ------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        return len(self._waiters) >= self.max_in_flight

    async def room(self) -> None:
        """Returns once fewer than ``max_in_flight`` requests wait for their results."""
        while len(self._waiters) >= self.max_in_flight:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _freed(self) -> None:
        if self._room is not None and len(self._waiters) < self.max_in_flight:
            if not self._room.done():
                self._room.set_result(None)
            self._room = None

    # -- waiters -----------------------------------------------------------------------------------------
    def expect(self, request_id: str, waiter: Waiter, timeout_s: float) -> None:
        """``waiter`` gets the result of ``request_id``, or :class:`InferenceTimeout` after ``timeout_s``."""
        if self._failure is not None:
            raise FatalError(f"the reply reader has stopped: {self._failure!r}") from self._failure
        if request_id in self._waiters or request_id in self._done:
            raise ValueError(f"request id {request_id!r} is already in use by this client")
        self._waiters[request_id] = waiter
        queue = self._deadlines.get(timeout_s)
        if queue is None:
            queue = self._deadlines[timeout_s] = deque()
        queue.append((time.monotonic() + timeout_s, request_id))
        if self._timer is None:
            self._arm()

    def forget(self, request_id: str) -> None:
        """The caller gave up (timeout, cancel): a late reply is then dropped as a duplicate."""
        if self._waiters.pop(request_id, None) is not None:
            self._remember(request_id)
            self._freed()
            if self.observer is not None:
                self.observer(request_id)

    def forget_sink(self, sink: Sink) -> None:
        """A stream ended: its requests still waiting are given up."""
        for rid in [rid for rid, w in self._waiters.items() if w is sink]:
            self.forget(rid)

    def fail(self, request_id: str, exc: BaseException) -> None:
        """The request was not sent (its delivery failed): its waiter gets ``exc``."""
        waiter = self._waiters.pop(request_id, None)
        if waiter is None:
            return
        self._remember(request_id)
        self._freed()
        if self.observer is not None:
            self.observer(request_id, exc=exc)
        _fail(waiter, exc)

    def _remember(self, request_id: str) -> None:
        self._done[request_id] = None
        if len(self._done) > _REMEMBER:
            self._done.popitem(last=False)

    def _fail_all(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for rid, waiter in waiters.items():
            if self.observer is not None:
                self.observer(rid, exc=exc)
            _fail(waiter, exc)
        self._freed()

    # -- deadlines ---------------------------------------------------------------------------------------
    def _arm(self) -> None:
        heads = [q[0][0] for q in self._deadlines.values() if q]
        if not heads:
            self._timer = None
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + min(max(min(heads) - time.monotonic(), 0.0), _SWEEP_S), self._sweep)

    def _sweep(self) -> None:
        """Times out the requests past their deadline; drops answered ones from the deadline queues."""
        now = time.monotonic()
        for timeout, queue in list(self._deadlines.items()):
            while queue:
                expiry, rid = queue[0]
                waiter = self._waiters.get(rid)
                if waiter is not None:  # (a cancelled submit is forgotten by its own callback)
                    if expiry > now:
                        break
                    exc = InferenceTimeout(rid, timeout)
                    if self.observer is not None:
                        self.observer(rid, exc=exc)
                    self.forget(rid)
                    _fail(waiter, exc)
                queue.popleft()
            if not queue:
                del self._deadlines[timeout]
        self._arm()

    # -- reading ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._deliver(record.value or b"")
                self._freed()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("the reply reader failed; failing every waiting request")
            self._failure = exc
            self._fail_all(FatalError(f"the reply reader failed: {exc!r}"))
            raise

    def _deliver(self, value: bytes) -> None:
        try:
            result = self._reader.result(value)
        except WireError:
            self.undecodable += 1
            log.warning("dropped an undecodable reply")
            return
        waiter = self._waiters.pop(result.id, None)
        if waiter is None:
            if result.id in self._done:
                self.duplicates_dropped += 1
            else:
                self.unknown_dropped += 1
            return
        self._remember(result.id)
        if self.observer is not None:
            self.observer(result.id, result)
        if type(waiter) is Sink:
            waiter.put(result)
        elif not waiter.done():  # type: ignore[union-attr]
            waiter.set_result(result)  # type: ignore[union-attr]


def _fail(waiter: Any, exc: BaseException) -> None:
    if type(waiter) is Sink:
        waiter.fail(exc)
    elif not waiter.done():
        waiter.set_exception(exc)
