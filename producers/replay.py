"""``streamer replay --republish``: feed a range of old requests to the live workers, gently.

The range's requests are re-sent, with their ids, inputs, keys and metadata, to the live input
(the request topic, or a pipeline's first stage), at most ``rate`` per second, so live traffic
keeps its latency. Their replies go to a reply topic of the job's own
(``<results_topic>.replay.<job>``), never to the original callers; the job collects one result
per id there and writes it to the sink. Deadlines are dropped: the old ones have passed. A
record that cannot be decoded is not sent; it gets an error result with id
``TOPIC:PARTITION:OFFSET`` in the sink, as in an offline replay.

A stopped republish job is not resumed: run it again with ``--restart``; the sink then holds
one result per id of the range, as the workers' results are de-duplicated by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiokafka import TopicPartition

from consumers.replay import ReplaySummary
from schemas import Codec, ErrorInfo, InferenceRequest, InferenceResult, ReplyTo, WireError
from streamer import kafka
from streamer.config import WorkerSettings
from streamer.ranges import Span
from streamer.sinks import open_sink

from .client import request_headers

__all__ = ["republish"]

_REPLY_RETENTION_MS = str(24 * 60 * 60 * 1000)


async def republish(
    settings: WorkerSettings, topic: str, job: str, target: str, spans: list[Span], sink_target: str, *,
    rate: float, progress: Callable[[int, int], None] | None = None, timeout_s: float = 600,
) -> ReplaySummary:
    """Send ``spans`` of ``topic`` to the live input for ``target`` (a model, or a pipeline spec)."""
    dest, model = _destination(settings, target)
    reply = ReplyTo(topic=f"{settings.results_topic}.replay.{job}")
    await kafka.ensure_topics(settings, [kafka.TopicSpec(reply.topic, 1, config={"retention.ms": _REPLY_RETENTION_MS})])
    codec = Codec()
    summary = ReplaySummary(range_size=sum(s.size for s in spans))
    sink = open_sink(sink_target, settings)
    await sink.open(None)
    started = time.perf_counter()
    results: dict[str, InferenceResult] = {}
    expected: set[str] = set()
    complete = asyncio.Event()
    collector = asyncio.create_task(_collect(settings, reply, codec, results, expected, progress, summary, complete))
    try:
        await _send(settings, topic, spans, dest, model, reply, codec, rate, expected, results)
        async with asyncio.timeout(timeout_s):
            await complete.wait()
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        ordered = sorted(results.values(), key=lambda r: r.id)
        await sink.write(ordered)
        summary.processed = len(ordered)
        summary.statuses.update(r.status for r in ordered)
        summary.complete = summary.processed == summary.range_size
        summary.elapsed_s = time.perf_counter() - started
        await sink.close(summary.complete)
    return summary


def _destination(settings: WorkerSettings, target: str) -> tuple[str, str]:
    from streamer.pipeline import load_pipeline

    try:
        spec = load_pipeline(target, check_callables=False)
    except Exception:  # noqa: BLE001 - not a pipeline: a model served on the request topic
        return settings.request_topic, target
    return spec.input_topic(spec.order[0].name), spec.name


async def _send(settings: WorkerSettings, topic: str, spans: list[Span], dest: str, model: str, reply: ReplyTo,
                codec: Codec, rate: float, expected: set[str], results: dict[str, InferenceResult]) -> int:
    consumer = kafka.consumer(settings, group_id=None, isolation_level="read_committed")
    producer = kafka.producer(settings)
    async with kafka.translated_errors(settings):
        await consumer.start()
        await producer.start()
    sent = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    try:
        for span in spans:
            if not span.size:
                continue
            tp = TopicPartition(topic, span.partition)
            consumer.assign([tp])
            consumer.seek(tp, span.start)
            pos = span.start
            while pos < span.end:
                batch = (await consumer.getmany(tp, timeout_ms=500, max_records=500)).get(tp, [])
                if not batch and await consumer.position(tp) >= span.end:
                    break
                for r in batch:
                    if r.offset >= span.end:
                        break
                    pos = r.offset + 1
                    try:
                        old = codec.decode_request(r.value or b"")
                    except WireError as exc:
                        rid = f"{topic}:{span.partition}:{r.offset}"
                        results[rid] = InferenceResult(id=rid, model=model, status="error",
                                                       error=ErrorInfo(code=exc.code, message=str(exc)))
                        continue
                    req = InferenceRequest(id=old.id, model=model, inputs=old.inputs, key=old.key, reply_to=reply,
                                           metadata=old.metadata)
                    expected.add(req.id)
                    now = time.monotonic()
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at, now) + interval
                    await producer.send(dest, codec.encode_request(req), key=r.key, headers=request_headers(req))
                    sent += 1
        await producer.flush()
    finally:
        await producer.stop()
        await consumer.stop()
    return sent


async def _collect(settings: WorkerSettings, reply: ReplyTo, codec: Codec, results: dict[str, InferenceResult],
                   expected: set[str], progress: Callable[[int, int], None] | None, summary: ReplaySummary,
                   complete: asyncio.Event) -> None:
    consumer = kafka.consumer(settings, reply.topic, group_id=None, auto_offset_reset="earliest",
                              isolation_level="read_committed")
    await consumer.start()
    try:
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    with contextlib.suppress(WireError):
                        result = codec.decode_result(r.value or b"")
                        if result.id in expected:
                            results.setdefault(result.id, result)
            if progress:
                progress(len(results), summary.range_size)
            if len(results) >= summary.range_size:
                complete.set()
    finally:
        await consumer.stop()

