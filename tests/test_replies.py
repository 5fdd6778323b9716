"""The client's reply router without a broker: results to their waiters by id, duplicates and strangers
dropped and counted, deadlines from one timer, the in-flight window, and a reader that dies failing everyone."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord, TopicPartition

from producers._replies import ReplyRouter, Sink
from schemas import Codec, InferenceResult
from streamer.errors import FatalError, InferenceTimeout

CODEC = Codec()
TP = TopicPartition("replies", 0)


class Replies:
    """A consumer whose ``getmany`` hands out the reply values put into it (or raises ``error``)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.error: BaseException | None = None
        self.offset = 0
        self._handed = 0

    def put(self, value: bytes) -> None:
        self.queue.put_nowait(value)

    async def handled(self) -> None:
        """Returns once the router has handled every value put so far (it came back for more)."""
        await self.queue.join()

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[ConsumerRecord]]:
        while self._handed:  # the router is back: what it was handed last time is handled
            self._handed -= 1
            self.queue.task_done()
        if self.error is not None:
            raise self.error
        try:
            value = await asyncio.wait_for(self.queue.get(), 0.01)
        except TimeoutError:
            return {}
        self._handed += 1
        self.offset += 1
        return {TP: [ConsumerRecord("replies", 0, self.offset, 0, 0, None, value, None, 0, len(value), ())]}


def _result(rid: str) -> bytes:
    return CODEC.encode_result(InferenceResult(id=rid, model="m", status="ok", outputs=[1.0]))


async def _router(max_in_flight: int = 100) -> tuple[ReplyRouter, Replies]:
    replies = Replies()
    router = ReplyRouter(replies, CODEC, max_in_flight)  # type: ignore[arg-type]
    router.start()
    return router, replies


async def test_each_result_reaches_its_waiter_once_and_the_rest_is_counted() -> None:
    router, replies = await _router()
    try:
        a: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        router.expect("a", a, 10)
        replies.put(_result("a"))
        assert (await asyncio.wait_for(a, 2)).id == "a"
        replies.put(_result("a"))  # the worker answered twice (at-least-once redelivery)
        replies.put(_result("nobody"))  # another client's, or a stale one
        replies.put(b"\xc1 not a result")
        await replies.handled()
        assert (router.duplicates_dropped, router.unknown_dropped, router.undecodable) == (1, 1, 1)
        with pytest.raises(ValueError, match="already in use"):
            router.expect("a", asyncio.get_running_loop().create_future(), 10)
    finally:
        await router.close()


async def test_a_request_past_its_deadline_times_out_and_its_late_result_is_a_duplicate() -> None:
    router, replies = await _router()
    try:
        late: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        router.expect("late", late, 0.05)
        with pytest.raises(InferenceTimeout):
            await asyncio.wait_for(late, 2)
        assert router.pending == 0
        replies.put(_result("late"))
        await replies.handled()
        assert router.duplicates_dropped == 1
    finally:
        await router.close()


async def test_the_window_opens_as_results_arrive() -> None:
    router, replies = await _router(max_in_flight=2)
    try:
        loop = asyncio.get_running_loop()
        futures = {rid: loop.create_future() for rid in ("a", "b")}
        for rid, fut in futures.items():
            router.expect(rid, fut, 10)
        assert router.full
        waiting = asyncio.create_task(router.room())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        replies.put(_result("b"))
        await asyncio.wait_for(waiting, 2)
        assert router.pending == 1 and not router.full
    finally:
        await router.close()


async def test_a_stream_sink_gathers_its_results_and_gives_up_the_rest() -> None:
    router, replies = await _router()
    try:
        sink = Sink()
        for rid in ("s1", "s2", "s3"):
            router.expect(rid, sink, 10)
        sink.outstanding = 3
        replies.put(_result("s2"))
        replies.put(_result("s1"))
        while len(sink.results) < 2:
            await sink.wait()
        assert [r.id for r in sink.results] == ["s2", "s1"] and sink.outstanding == 1
        router.forget_sink(sink)  # the stream ended early
        assert router.pending == 0
    finally:
        await router.close()


async def test_a_reader_that_dies_fails_every_waiter_and_every_later_request() -> None:
    router, replies = await _router()
    waiter: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
    router.expect("w", waiter, 10)
    replies.error = KafkaConnectionError("gone")
    with pytest.raises(FatalError, match="reply reader failed"):
        await asyncio.wait_for(waiter, 2)
    with pytest.raises(FatalError, match="has stopped"):
        router.expect("later", asyncio.get_running_loop().create_future(), 10)
    await router.close()


def test_sink_failure_keeps_the_first_error() -> None:
    sink = Sink()
    first, second = ValueError("first"), ValueError("second")
    sink.fail(first)
    sink.fail(second)
    assert sink.error is first
