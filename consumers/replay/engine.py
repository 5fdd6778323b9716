"""Replay for offline batch inference: a fixed range of a request topic through a model or a pipeline.

The job reads each partition's span (``reader``), runs large batches through the same
code the live workers run (``BatchRunner``: decoding, validation, bisection of failing batches;
a pipeline's stages one after the other, their messages encoded as on the wire), and writes one
result per record to a sink: the request's own result, or an error result. A record that has no
readable id gets the id ``TOPIC:PARTITION:OFFSET``, so every offset of the range is accounted for.

Deadlines are ignored by default (old traffic is past them all); ``keep_deadlines`` honours them
and counts the expired apart.

Progress is committed to the job's consumer group ``streamer-replay.<job>`` after each sink
checkpoint, with the span and the sink's checkpoint in the offset metadata. A job started again
under the same name reads them back, cuts the sink back to the checkpoint and continues; a
finished job has nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas import Codec, InferenceResult, Limits, RoutingHeaders
from streamer.config import WorkerSettings
from streamer.models import load_model
from streamer.pipeline import PipelineSpec, load_pipeline

from .._batch import FORWARDED, Batch, DeadLetter, Route, Run
from .._inference import BatchRunner
from ..stage import stage_route
from .plan import ReplaySummary, anonymous_error, read_plan
from .ranges import Span
from .reader import RangeReader
from .sinks import Sink, open_sink

__all__ = ["Engine", "ReplayJob", "replay_codec", "replay_offline"]

log = logging.getLogger("streamer.replay")


class Engine:
    """Batches of request records -> one final result each, through one model or a pipeline's stages."""

    def __init__(self, runners: list[BatchRunner], codec: Codec) -> None:
        self.runners = runners
        self.codec = codec

    @classmethod
    def for_model(cls, model: str, device: str | None, codec: Codec, *, keep_deadlines: bool = False,
                  **options: Any) -> Engine:
        m = load_model(model, device, **options)
        return cls([_runner(BatchRunner(m, codec, "replay", "", Route(m.name)), keep_deadlines)], codec)

    @classmethod
    def for_pipeline(cls, spec: PipelineSpec, device: str | None, codec: Codec, *,
                     keep_deadlines: bool = False) -> Engine:
        runners = []
        for st in spec.order:
            m = load_model(st.callable, device or st.device, **st.options)
            runners.append(_runner(BatchRunner(m, codec, "replay", "", stage_route(spec, st.name)), keep_deadlines))
        return cls(runners, codec)

    def close(self) -> None:
        for r in self.runners:
            r.close()

    def warm_up(self) -> None:
        """One small batch through each model (lazy initialisation, kernels), before the clock starts."""
        for r in self.runners:
            r.warm_up()

    async def run(self, records: list[Any]) -> list[InferenceResult]:
        """One final result per record, in order (records of one topic, as consumed)."""
        final: dict[int, InferenceResult] = {}
        origin = list(range(len(records)))  # the index in ``records`` of each record of the stage's batch
        todo = records
        for runner in self.runners:
            if not todo:
                break
            batch = Batch(_runs(todo))
            await runner.run(batch)
            forwarded, nxt_origin = [], []
            for i, rec in enumerate(batch.records):
                value = batch.values[i]
                if batch.status[i] == FORWARDED and value is not None:
                    msg = batch.messages[i]
                    assert msg is not None
                    forwarded.append(ConsumerRecord(rec.topic, rec.partition, rec.offset, rec.timestamp,
                                                    rec.timestamp_type, rec.key, value, None, 0, len(value),
                                                    RoutingHeaders(msg.id, msg.reply_to).build()))
                    nxt_origin.append(origin[i])
                elif value is not None:
                    final[origin[i]] = self.codec.decode_result(value)
                else:
                    final[origin[i]] = _anonymous_error(rec, batch.dead.get(i), runner.route)
            todo, origin = forwarded, nxt_origin
        return [final[i] for i in range(len(records))]


def _runs(records: list[Any]) -> list[Run]:
    """Consecutive records of one partition, one run each."""
    now, runs = time.monotonic(), []  # type: float, list[Run]
    for rec in records:
        if runs and runs[-1].tp.partition == rec.partition:
            runs[-1].records.append(rec)
        else:
            runs.append(Run(TopicPartition(rec.topic, rec.partition), 0, now, [rec]))
    return runs


def _runner(runner: BatchRunner, keep_deadlines: bool) -> BatchRunner:
    runner.honor_deadlines = keep_deadlines
    return runner


def _anonymous_error(rec: Any, dl: DeadLetter | None, route: Route) -> InferenceResult:
    return anonymous_error(rec.topic, rec.partition, rec.offset, route.model, dl.code if dl else "model_error",
                           dl.message if dl else "no result", route.stage)


class ReplayJob:
    """One replay job: ``spans`` of ``topic`` through ``engine`` into ``sink``, resumable under ``job``."""

    def __init__(self, settings: WorkerSettings, topic: str, job: str, engine: Engine, sink: Sink, *,
                 batch_size: int = 256, checkpoint_s: float = 2.0) -> None:
        self.settings = settings
        self.topic = topic
        self.job = job
        self.engine = engine
        self.sink = sink
        self.batch_size = batch_size
        self.checkpoint_s = checkpoint_s
        self.codec = engine.codec
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        """Stop after the batch in hand; what is done is committed (SIGINT/SIGTERM)."""
        self._stop.set()

    async def run(self, fresh: list[Span], progress: Callable[[int, int], None] | None = None) -> ReplaySummary:
        plan = await read_plan(self.settings, self.topic, self.job, fresh)
        summary = ReplaySummary.of(plan)
        if plan.sink_at is not None:
            log.info("job %s resumes: %d of %d records were done", self.job, summary.done_before, summary.range_size)
            if summary.done_before == summary.range_size:
                summary.complete = True  # finished before: the sink is whole, leave it be
                self.engine.close()
                return summary
        await self.sink.open(plan.sink_at)
        reader = RangeReader(self.settings, self.topic, self.job, plan, max_partition_fetch_bytes=4 << 20,
                             fetch_max_bytes=32 << 20)
        started = time.perf_counter()
        if progress:
            progress(summary.done_before, summary.range_size)
        try:
            await reader.start()
            batches: asyncio.Queue[list[Any] | None] = asyncio.Queue(maxsize=2)
            feeder = asyncio.create_task(self._read(reader, batches))
            last_checkpoint = time.monotonic()
            done: tuple[list[Any], list[InferenceResult]] | None = None
            try:
                while True:
                    batch = None if self._stop.is_set() else await batches.get()
                    running = asyncio.create_task(self.engine.run(batch)) if batch else None
                    await asyncio.sleep(0)  # the next batch is decoded and in the model before the last is written
                    if done is not None:
                        await self.sink.write(done[1])
                        for rec in done[0]:
                            reader.done(rec)
                        summary.processed += len(done[0])
                        summary.statuses.update(r.status for r in done[1])
                        if progress:
                            progress(summary.done_before + summary.processed, summary.range_size)
                        if time.monotonic() - last_checkpoint >= self.checkpoint_s:
                            await reader.commit(await self.sink.checkpoint())
                            last_checkpoint = time.monotonic()
                    if running is None or batch is None:
                        break
                    done = (batch, await running)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            await reader.commit(await self.sink.checkpoint())
            summary.complete = reader.complete
        finally:
            summary.elapsed_s = time.perf_counter() - started
            await reader.stop()
            await self.sink.close(summary.complete)
            self.engine.close()
        return summary

    async def _read(self, reader: RangeReader, out: asyncio.Queue[list[ConsumerRecord] | None]) -> None:
        """The range in batches of ``batch_size``, across partitions in partition order, so that replaying it again
        runs the model on the very same batches (bit-identical outputs, even where batch shape matters). None when
        every span is read."""
        buf: list[ConsumerRecord] = []
        for tp in reader.pending():
            async for chunk in reader.records(tp, self.batch_size):
                buf.extend(chunk)
                while len(buf) >= self.batch_size:
                    await out.put(buf[: self.batch_size])
                    buf = buf[self.batch_size:]
        if buf:
            await out.put(buf)
        await out.put(None)


def replay_codec(settings: WorkerSettings) -> Codec:
    return Codec(Limits(max_message_bytes=settings.max_message_bytes, max_tensor_elements=settings.max_tensor_elements))


async def replay_offline(settings: WorkerSettings, topic: str, job: str, spans: list[Span], sink: str, *,
                         model: str | None = None, pipeline: str | None = None, device: str | None = None,
                         batch_size: int = 256, checkpoint_s: float = 2.0, keep_deadlines: bool = False,
                         progress: Callable[[int, int], None] | None = None,
                         stop_on_signals: bool = True) -> ReplaySummary:
    """``spans`` of ``topic`` through ``model`` (default: the settings') or ``pipeline`` into ``sink``, as job
    ``job``: what ``streamer replay`` runs, in this process. SIGINT/SIGTERM stop it after the batch in hand."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    codec = replay_codec(settings)
    if pipeline:
        engine = Engine.for_pipeline(load_pipeline(pipeline), device, codec, keep_deadlines=keep_deadlines)
    else:
        engine = Engine.for_model(model or settings.model, device or settings.device, codec,
                                  keep_deadlines=keep_deadlines)
    await asyncio.to_thread(engine.warm_up)
    job_run = ReplayJob(settings, topic, job, engine, open_sink(sink, settings), batch_size=batch_size,
                        checkpoint_s=checkpoint_s)
    if stop_on_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, job_run.request_stop)
    return await job_run.run(spans, progress)
