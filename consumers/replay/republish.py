"""``streamer replay --republish``: feed a range of old requests to the live workers, gently.

The range's requests are re-sent, with their ids, inputs, keys and metadata, to the live input
(the request topic, or a pipeline's first stage), at most ``rate`` per second, so live traffic
keeps its latency. Deadlines are dropped: the old ones have passed. Their replies go to the
job's own reply topic (``<results_topic>.replay.<job>``), never to the original callers. A
record that cannot be decoded is not sent: its error result (id ``TOPIC:PARTITION:OFFSET``)
goes straight to that reply topic, so the topic holds one answer for every record of the range.

Resume: the job commits how far it has sent (after the broker acknowledged it) to its group
``streamer-replay.<job>``, with the range in the offset metadata. Stopped and started again, it
sends the rest, then reads its reply topic from the start until every id is answered, and
writes the sink from it. A range that holds one request id twice is answered once per id, and
the job then ends on its timeout, incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from schemas import Codec, InferenceRequest, InferenceResult, ReplyTo, RoutingHeaders, WireError
from streamer import kafka
from streamer.config import WorkerSettings

from .plan import Plan, ReplaySummary, anonymous_error, read_plan
from .ranges import Span
from .reader import RangeReader
from .sinks import open_sink

__all__ = ["forget_replies", "reply_topic", "republish"]

_REPLY_RETENTION_MS = str(7 * 24 * 60 * 60 * 1000)


async def republish(
    settings: WorkerSettings, topic: str, job: str, target: str, fresh: list[Span], sink_target: str, *,
    rate: float, progress: Callable[[int, int], None] | None = None, stop: asyncio.Event | None = None,
    timeout_s: float = 600, checkpoint_s: float = 2.0,
) -> ReplaySummary:
    """Send ``fresh`` (or what is left of this job's range) to the live input for ``target``."""
    dest, model = _destination(settings, target)
    reply = ReplyTo(topic=reply_topic(settings, job))
    await kafka.ensure_topics(settings, [kafka.TopicSpec(reply.topic, 1, config={"retention.ms": _REPLY_RETENTION_MS})])
    plan = await read_plan(settings, topic, job, fresh)
    summary = ReplaySummary.of(plan)
    stop = stop or asyncio.Event()
    started = time.perf_counter()
    results: dict[str, InferenceResult] = {}
    complete = asyncio.Event()
    collector = asyncio.create_task(_collect(settings, reply, results, summary.range_size, progress, complete))
    try:
        sender = _Sender(settings, topic, job, plan, dest, model, reply, rate, checkpoint_s)
        summary.processed = await sender.run(stop)
        if not stop.is_set():
            async with asyncio.timeout(timeout_s):
                done = asyncio.ensure_future(complete.wait())
                halted = asyncio.ensure_future(stop.wait())
                await asyncio.wait([done, halted], return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
                halted.cancel()
    except TimeoutError:
        pass
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        summary.elapsed_s = time.perf_counter() - started
    summary.complete = complete.is_set()
    summary.statuses.update(r.status for r in results.values())
    if summary.complete:
        sink = open_sink(sink_target, settings)
        await sink.open(None)
        try:
            await sink.write(sorted(results.values(), key=lambda r: r.id))
        finally:
            await sink.close(True)
    return summary


def reply_topic(settings: WorkerSettings, job: str) -> str:
    return f"{settings.results_topic}.replay.{job}"


async def forget_replies(settings: WorkerSettings, job: str) -> None:
    """``--restart``: the job's reply topic goes, with every answer an earlier run collected."""
    with contextlib.suppress(Exception):
        await kafka.delete_topics(settings, [reply_topic(settings, job)])


def _destination(settings: WorkerSettings, target: str) -> tuple[str, str]:
    from streamer.pipeline import load_pipeline

    try:
        spec = load_pipeline(target, check_callables=False)
    except Exception:  # noqa: BLE001 - not a pipeline: a model served on the request topic
        return settings.request_topic, target
    return spec.input_topic(spec.order[0].name), spec.name


class _Sender:
    def __init__(self, settings: WorkerSettings, topic: str, job: str, plan: Plan, dest: str, model: str,
                 reply: ReplyTo, rate: float, checkpoint_s: float) -> None:
        self.settings = settings
        self.topic = topic
        self.dest, self.model, self.reply = dest, model, reply
        self.interval = 1.0 / rate
        self.checkpoint_s = checkpoint_s
        self.codec = Codec()
        self.reader = RangeReader(settings, topic, job, plan)
        self.producer = kafka.producer(settings)
        self.handled = 0
        self._next_at = self._last_commit = 0.0

    async def run(self, stop: asyncio.Event) -> int:
        """Send what is left; returns how many records this run handled."""
        await kafka.start(self.settings, self.producer)
        try:
            await self.reader.start()  # records the plan before anything is sent
            self._next_at = self._last_commit = time.monotonic()
            for tp in self.reader.pending():
                if stop.is_set():
                    break
                async with contextlib.aclosing(self.reader.records(tp, 200)) as chunks:
                    async for chunk in chunks:
                        if not await self._send(chunk, stop):
                            break
            await self._commit()
        finally:
            await self.producer.stop()
            await self.reader.stop()
        return self.handled

    async def _send(self, chunk: list[ConsumerRecord], stop: asyncio.Event) -> bool:
        """Send ``chunk`` at the job's rate; False once asked to stop."""
        for r in chunk:
            if stop.is_set():
                return False
            now = time.monotonic()
            if self._next_at > now:
                await asyncio.sleep(self._next_at - now)
            self._next_at = max(self._next_at, now) + self.interval
            await self._send_one(r)
            self.reader.done(r)  # committed as sent only once acknowledged: _commit flushes first
            self.handled += 1
            if time.monotonic() - self._last_commit >= self.checkpoint_s:
                await self._commit()
                self._last_commit = time.monotonic()
        return True

    async def _send_one(self, r: ConsumerRecord) -> None:
        try:
            old = self.codec.decode_request(r.value or b"")
        except WireError as exc:
            bad = anonymous_error(self.topic, r.partition, r.offset, self.model, exc.code, str(exc))
            await self.producer.send(self.reply.topic, self.codec.encode_result(bad), key=bad.id.encode(),
                                     headers=RoutingHeaders(bad.id, None).build())
            return
        req = InferenceRequest(id=old.id, model=self.model, inputs=old.inputs, key=old.key, reply_to=self.reply,
                               metadata=old.metadata)
        await kafka.send_request(self.producer, self.dest, req, self.codec, key=r.key)  # the record's own key

    async def _commit(self) -> None:
        await self.producer.flush()  # acknowledged before it counts as sent
        await self.reader.commit()


async def _collect(settings: WorkerSettings, reply: ReplyTo, results: dict[str, InferenceResult], total: int,
                   progress: Callable[[int, int], None] | None, complete: asyncio.Event) -> None:
    """Every answer on the job's reply topic, from its start (earlier runs' included), one per id."""
    codec = Codec()
    consumer = kafka.consumer(settings, reply.topic, group_id=None, auto_offset_reset="earliest",
                              isolation_level="read_committed")
    await kafka.start(settings, consumer)
    try:
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    with contextlib.suppress(WireError):
                        result = codec.decode_result(r.value or b"")
                        results.setdefault(result.id, result)
            if progress:
                progress(len(results), total)
            if len(results) >= total:
                complete.set()
    finally:
        await consumer.stop()
