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
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas import Codec, ErrorInfo, InferenceRequest, InferenceResult, ReplyTo, RoutingHeaders, WireError
from streamer import kafka
from streamer.config import WorkerSettings
from streamer.ranges import Span
from streamer.replay_jobs import ReplaySummary, job_group, plan_metadata, read_plan
from streamer.sinks import open_sink

from .client import request_headers

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
    whole, left, _ = await read_plan(settings, topic, job, fresh)
    summary = ReplaySummary(range_size=sum(s.size for s in whole),
                            done_before=sum(s.size for s in whole) - sum(s.size for s in left))
    stop = stop or asyncio.Event()
    started = time.perf_counter()
    results: dict[str, InferenceResult] = {}
    complete = asyncio.Event()
    collector = asyncio.create_task(_collect(settings, reply, results, summary.range_size, progress, complete))
    try:
        sender = _Sender(settings, topic, job, whole, dest, model, reply, rate, checkpoint_s)
        summary.processed = await sender.run(left, stop)
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
    def __init__(self, settings: WorkerSettings, topic: str, job: str, whole: list[Span], dest: str, model: str,
                 reply: ReplyTo, rate: float, checkpoint_s: float) -> None:
        self.settings = settings
        self.topic = topic
        self.spans = {TopicPartition(topic, s.partition): s for s in whole}
        self.dest, self.model, self.reply = dest, model, reply
        self.interval = 1.0 / rate
        self.checkpoint_s = checkpoint_s
        self.codec = Codec()
        self.consumer = kafka.consumer(settings, group_id=job_group(job), enable_auto_commit=False,
                                       isolation_level="read_committed")
        self.producer = kafka.producer(settings)
        self.nxt: dict[TopicPartition, int] = {}

    async def run(self, left: list[Span], stop: asyncio.Event) -> int:
        """Send what is left; returns how many records this run handled."""
        await kafka.start(self.settings, self.consumer, self.producer)
        handled = 0
        try:
            self.nxt = {TopicPartition(self.topic, s.partition): s.start for s in left}
            self.consumer.assign(sorted(self.spans))  # all of them: commits name every partition of the range
            self.consumer.pause(*self.spans)
            await self._commit()  # the plan, before anything is sent
            next_at = time.monotonic()
            last_commit = time.monotonic()
            for span in left:
                tp = TopicPartition(self.topic, span.partition)
                if stop.is_set() or not span.size:
                    continue
                self.consumer.seek(tp, span.start)
                self.consumer.resume(tp)
                while self.nxt[tp] < span.end and not stop.is_set():
                    batch = (await self.consumer.getmany(tp, timeout_ms=500, max_records=200)).get(tp, [])
                    if not batch and await self.consumer.position(tp) >= span.end:
                        self.nxt[tp] = span.end
                    for r in batch:
                        if r.offset >= span.end or stop.is_set():
                            break
                        now = time.monotonic()
                        if next_at > now:
                            await asyncio.sleep(next_at - now)
                        next_at = max(next_at, now) + self.interval
                        await self._send_one(r)
                        self.nxt[tp] = r.offset + 1
                        handled += 1
                        if time.monotonic() - last_commit >= self.checkpoint_s:
                            await self._commit()
                            last_commit = time.monotonic()
                self.consumer.pause(tp)
            await self._commit()
        finally:
            await self.producer.stop()
            await self.consumer.stop()
        return handled

    async def _send_one(self, r: Any) -> None:
        try:
            old = self.codec.decode_request(r.value or b"")
        except WireError as exc:
            rid = f"{self.topic}:{r.partition}:{r.offset}"
            bad = InferenceResult(id=rid, model=self.model, status="error",
                                  error=ErrorInfo(code=exc.code, message=str(exc)))
            await self.producer.send(self.reply.topic, self.codec.encode_result(bad), key=rid.encode(),
                                     headers=RoutingHeaders(rid, None).build())
            return
        req = InferenceRequest(id=old.id, model=self.model, inputs=old.inputs, key=old.key, reply_to=self.reply,
                               metadata=old.metadata)
        await self.producer.send(self.dest, self.codec.encode_request(req), key=r.key, headers=request_headers(req))

    async def _commit(self) -> None:
        await self.producer.flush()  # acknowledged before it counts as sent
        await self.consumer.commit({tp: OffsetAndMetadata(self.nxt.get(tp, s.end), plan_metadata(s))
                                    for tp, s in self.spans.items()})


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
