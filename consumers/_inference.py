"""From a batch of consumed records to the records to send for it: decode, check, run the model, encode.

One pass over the batch decodes each record (``schemas.FastReader``: msgspec, no pydantic model on
the way) and checks it; the model runs once on the items that passed; the writer encodes every
output from the parts the batch shares (``schemas.ResultWriter``). What each record ends in is
written into the batch's columns (see ``_batch.Batch``). A cheap model runs on the event loop, a
slower one on its own thread so heartbeats and fetching go on during long batches. A batch the
model fails on is bisected, so one poison item fails alone and every other item still gets its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    Codec,
    DecodeError,
    ErrorCode,
    ErrorInfo,
    FastReader,
    InferenceResult,
    ReplyTo,
    ResultWriter,
    RoutingHeaders,
    StageTiming,
    Timings,
    WireError,
    WireReply,
    WireRequest,
    WireStage,
    WireTiming,
    now_ms,
    valid_request_id,
)
from streamer.errors import BadInput
from streamer.models import Model
from streamer.tracing import WorkerTracing

from ._batch import FORWARDED, Batch, DeadLetter, Route

__all__ = ["BatchRunner"]

_SCHEMA = str(SCHEMA_VERSION).encode()
INLINE_BELOW_MS = 1.0
"""A batch the model should take less than this for (estimated from its measured times) runs on the event
loop, not the model thread: handing a tiny batch to a thread costs more than running it."""


class BatchRunner:
    def __init__(self, model: Model, codec: Codec, worker: str, default_reply_topic: str,
                 route: Route | None = None, tracing: WorkerTracing | None = None) -> None:
        self.model = model
        self.tracing = tracing
        self.codec = codec
        self.worker = worker
        self.default_reply_topic = default_reply_topic
        self.route = route or Route(model.name)
        self.reader = FastReader(codec)
        self.writer = ResultWriter(codec, self.route.model, model.version, worker)
        self._next: Model | None = None  # reloaded weights, served from the next batch on
        self.honor_deadlines = True  # replay of old traffic turns this off
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-model")
        # Moving means of the model's time per batch and of the batch size it was measured at.
        self._batch_ms = math.inf
        self._batch_n = 1.0

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def replace(self, model: Model) -> None:
        """Serve ``model`` (reloaded weights) from the next batch the model runs on; a batch that ran on the old one
        is still labelled with the old one's version."""
        self._next = model

    def _swap(self, model: Model) -> None:
        self.model, self._next = model, None
        self.writer = ResultWriter(self.codec, self.route.model, model.version, self.worker)

    def warm_up(self, batch_size: int = 2) -> None:
        """Run the model twice on example inputs; the second run's time decides where batches run at first.

        On an accelerator, also twice on a full batch of ``batch_size``: CUDA loads a kernel when it is first
        used, and a full batch uses others than a small one (a GPU worker's first full batches took 0.2-1.2 s
        each).
        """
        with contextlib.suppress(NotImplementedError):
            inputs = [self.model.validate(x) for x in self.model.example_inputs(2)]
            self.model.run(inputs)
            self._measured(self._timed(inputs)[1] * 1000, len(inputs))
            if batch_size > 2 and getattr(getattr(self.model, "device", None), "type", "cpu") != "cpu":
                full = [self.model.validate(x) for x in self.model.example_inputs(batch_size)]
                for _ in range(2):
                    self.model.run(full)

    def measure_capacity(self, batch_size: int, repeats: int = 3) -> float | None:
        """Items/s of the model at ``batch_size`` on its example inputs (best of ``repeats``); None if it has none."""
        try:
            inputs = [self.model.validate(x) for x in self.model.example_inputs(batch_size)]
        except NotImplementedError:
            return None
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            self.model.run(inputs)
            best = min(best, time.perf_counter() - t)
        return batch_size / max(best, 1e-9)

    async def run(self, batch: Batch) -> None:
        """Decide every record of ``batch``: its encoded result or stage message, or its dead letter."""
        self.check(batch)
        await self.infer_soon(batch)
        self.finish(batch)

    def check(self, batch: Batch) -> None:
        """Decode and check each record: the items that go to the model, with their inputs, are noted in the
        batch (``runnable``, ``inputs``); the others are decided already."""
        batch.started = time.monotonic()
        if self.tracing is not None:
            self.tracing.received(batch)
        batch.runnable, batch.inputs = self._check(batch)

    def infer_soon(self, batch: Batch) -> Awaitable[None]:
        """Start the model on the batch's runnable items: on the model thread at once (the loop meanwhile
        publishes the previous batch and decodes the next), or, when cheaper than a thread hop, on the event
        loop when the result is awaited."""
        if self._next is not None:  # between batches: none is on the model thread now
            self._swap(self._next)
        batch.writer = self.writer
        inputs = batch.inputs
        if inputs and self._estimate_ms(len(inputs)) >= INLINE_BELOW_MS:
            batch.on_thread = True
            return self._answered(batch, asyncio.get_running_loop().run_in_executor(self._executor, self._timed,
                                                                                    inputs))
        return self._inline(batch)

    async def _inline(self, batch: Batch) -> None:
        if batch.inputs:
            # Cheaper than handing it to the model thread (a thread hop costs more than a tiny model):
            # run it here; a model that turns out slower goes back to its thread from the next batch on.
            self._answer(batch, *self._timed(batch.inputs))

    async def _answered(self, batch: Batch, running: Awaitable[tuple[list[Any], float, tuple[int, int]]]) -> None:
        self._answer(batch, *await running)

    def _answer(self, batch: Batch, answers: list[Any], model_s: float, passes: tuple[int, int]) -> None:
        self._measured(model_s * 1000, len(batch.inputs))
        st = batch.stats
        st.runnable, st.inference_s = len(batch.inputs), model_s
        st.forward_passes, st.extra_forward_passes = passes
        batch.answers = answers
        if self.tracing is not None:
            batch.answered_ns = time.time_ns()

    def finish(self, batch: Batch) -> None:
        """Encode what the model answered into the records to send (on the loop, off the model's path)."""
        if batch.answers is not None:
            self._finish(batch, batch.answers)
            batch.answers = None
        if self.tracing is not None:
            self.tracing.ran(batch, (batch.writer or self.writer).model_version, batch.stats.inference_s,
                             batch.answered_ns or time.time_ns())

    # -- decode and check, on the loop ------------------------------------------------------------------
    def _check(self, batch: Batch) -> tuple[list[int], list[Any]]:
        """Decode and check each record; returns the indices that go to the model, and their inputs."""
        route, model = self.route, self.model
        read = self.reader.request if route.first else self.reader.stage
        deadlines = self.honor_deadlines
        now = now_ms()
        runnable: list[int] = []
        inputs: list[Any] = []
        messages, ids, created = batch.messages, batch.ids, batch.created
        for i, rec in enumerate(batch.records):
            try:
                for key, version in rec.headers or ():
                    # Absent or null: version 1. Anything else but "1" is a version this worker cannot read.
                    if key == SCHEMA_HEADER and version is not None and version != _SCHEMA:
                        shown = bytes(version[:64]).decode(errors="replace")
                        raise DecodeError(f"unsupported schema version {shown!r}; this worker reads {SCHEMA_VERSION}")
                msg, payload = read(rec.value or b"")
            except WireError as exc:
                routing = RoutingHeaders.parse(rec.headers)
                reply = exc.reply_to if isinstance(exc.reply_to, ReplyTo) else routing.reply_to
                assert reply is None or isinstance(reply, ReplyTo)
                self.fail(batch, i, exc.code, str(exc), request_id=exc.request_id or routing.request_id,
                          reply_to=reply)
                continue
            messages[i], ids[i], created[i] = msg, msg.id, msg.created_ms
            self._route(batch, i, msg.reply_to)
            if msg.model != route.model:
                what = f"stage {route.stage!r} of {route.model!r}" if route.stage else repr(route.model)
                self.fail(batch, i, "unknown_model", f"this worker group serves {what}, not {msg.model!r}")
            elif type(msg) is WireStage and msg.stage != route.stage:
                self.fail(batch, i, "schema_error", f"a message for stage {msg.stage!r} reached stage {route.stage!r}")
            elif deadlines and msg.deadline_ms is not None and now > msg.deadline_ms:
                self._expired(batch, i, msg)
            else:
                try:
                    inputs.append(model.validate(payload))
                    runnable.append(i)
                except BadInput as exc:
                    self.fail(batch, i, "bad_input", str(exc))
                except Exception as exc:  # noqa: BLE001 - a model's own validate may raise anything on odd input
                    self.fail(batch, i, "bad_input", f"{type(exc).__name__}: {exc}")
        return runnable, inputs

    def _route(self, batch: Batch, i: int, reply: WireReply | ReplyTo | None) -> None:
        batch.dest_topic[i] = reply.topic if reply else self.default_reply_topic
        batch.dest_partition[i] = reply.partition if reply else None

    def _expired(self, batch: Batch, i: int, msg: WireRequest | WireStage) -> None:
        batch.status[i] = "expired"
        batch.values[i] = self.codec.encode_result(InferenceResult(
            id=msg.id, model=msg.model, model_version=self.model.version, status="expired", worker=self.worker,
            error=ErrorInfo(code="deadline_exceeded", message=f"deadline {msg.deadline_ms} passed before inference",
                            stage=self.route.stage)))

    # -- outputs to records ---------------------------------------------------------------------------
    def _finish(self, batch: Batch, answers: list[Any]) -> None:
        route, runnable = self.route, batch.runnable
        n, inference_ms = len(runnable), batch.stats.inference_s * 1000
        # Per run of records (one partition's, fetched together): the timings, and the stage's trail entry.
        per_run: dict[int, tuple[float, int, float]] = {}
        counts: dict[int, int] = {}
        for i in runnable:
            k = batch.run_of[i]
            counts[k] = counts.get(k, 0) + 1
            if k not in per_run:
                per_run[k] = batch.timing(i)
        batch.stats.queue_waits = [(per_run[k][0] / 1000, c) for k, c in counts.items()]
        timings = [per_run[batch.run_of[i]] for i in runnable]
        trails: list[list[WireTiming]] | None = None
        if route.stage is not None:
            done = now_ms()
            entries = {k: WireTiming(stage=route.stage, worker=self.worker, queue_ms=t[0], batch_size=n,
                                     inference_ms=inference_ms, done_ms=done) for k, t in per_run.items()}
            trails = [[*_trail(batch.messages[i]), entries[batch.run_of[i]]] for i in runnable]
        ok_idx, ok_out, ok_t, ok_trails = [], [], [], []
        for j, (i, answer) in enumerate(zip(runnable, answers, strict=True)):
            if isinstance(answer, BaseException):
                code = answer.code if isinstance(answer, BadInput) else "model_error"
                self.fail(batch, i, code, f"{type(answer).__name__}: {answer}", timings[j])
            elif route.next_stage is not None:
                self._forward(batch, i, answer, trails[j] if trails is not None else [])
            else:
                ok_idx.append(i)
                ok_out.append(answer)
                ok_t.append(timings[j])
                if trails is not None:
                    ok_trails.append(trails[j])
        if not ok_idx:
            return
        writer = batch.writer or self.writer
        values = writer.results([batch.ids[i] for i in ok_idx], ok_out, ok_t,  # type: ignore[misc]
                                ok_trails if trails is not None else None)
        status, out = batch.status, batch.values
        for j, (i, value) in enumerate(zip(ok_idx, values, strict=True)):
            if isinstance(value, bytes):
                status[i], out[i] = "ok", value
            else:
                self.fail(batch, i, "model_error", f"output cannot be encoded: {value}", ok_t[j])

    def _forward(self, batch: Batch, i: int, answer: Any, trail: list[WireTiming]) -> None:
        msg = batch.messages[i]
        assert msg is not None and self.route.next_stage is not None
        try:
            batch.values[i] = (batch.writer or self.writer).forward(msg, self.route.next_stage, answer, trail)
        except (WireError, TypeError, ValueError, OverflowError) as exc:
            self.fail(batch, i, "model_error", f"stage output cannot be encoded: {exc}")
            return
        batch.status[i] = FORWARDED
        batch.dest_topic[i], batch.dest_partition[i] = self.route.next_topic, None

    def fail(self, batch: Batch, i: int, code: ErrorCode, message: str, timings: tuple[float, int, float] | None = None,
             *, request_id: str | None = None, reply_to: WireReply | ReplyTo | None = None) -> None:
        """Record ``i`` ends in a dead letter, and an error result where the request can be answered.

        Called again for a record (its output could not be sent), it replaces what was decided before.
        Never raises."""
        batch.dead[i] = DeadLetter(code, message)
        batch.status[i] = "error"
        batch.values[i] = None
        msg = batch.messages[i]
        rid = msg.id if msg is not None else request_id
        if msg is None:
            self._route(batch, i, reply_to)
        if msg is not None and self.route.next_stage is not None and batch.dest_topic[i] == self.route.next_topic:
            self._route(batch, i, msg.reply_to)  # it was to be forwarded: the error result goes to the client
        if not valid_request_id(rid):
            batch.ids[i] = None
            return  # nobody to tell (no id, or one no result can carry): the dead letter alone records it
        batch.ids[i] = rid
        stages = None
        if type(msg) is WireStage and self.route.stage is not None:
            stages = [StageTiming(stage=t.stage, worker=t.worker, queue_ms=t.queue_ms, batch_size=t.batch_size,
                                  inference_ms=t.inference_ms, done_ms=t.done_ms) for t in _trail(msg)] or None
        try:
            batch.values[i] = self.codec.encode_result(InferenceResult(
                id=rid, model=msg.model if msg is not None else self.route.model, model_version=self.model.version,
                status="error", error=ErrorInfo(code=code, message=message, stage=self.route.stage),
                timings=None if timings is None else Timings(queue_ms=timings[0], batch_size=timings[1],
                                                             inference_ms=timings[2]),
                stages=stages, worker=self.worker))
        except (ValidationError, WireError):
            batch.values[i] = None  # cannot happen for what the checks above let through; never raise here

    # -- where batches run ----------------------------------------------------------------------------
    def _estimate_ms(self, n: int) -> float:
        """The model's time for a batch of ``n``: flat below the sizes measured (a small model's time is
        mostly fixed overhead), linear above them."""
        return self._batch_ms * max(1.0, n / self._batch_n)

    def model_time(self) -> tuple[float, float] | None:
        """The moving mean of the model's time per batch (ms) and of the batch size it was measured at; None
        before any run."""
        return None if self._batch_ms == math.inf else (self._batch_ms, self._batch_n)

    def _measured(self, ms: float, n: int) -> None:
        if self._batch_ms == math.inf:
            self._batch_ms, self._batch_n = ms, float(n)
        else:
            self._batch_ms = 0.8 * self._batch_ms + 0.2 * ms
            self._batch_n = 0.8 * self._batch_n + 0.2 * n

    # -- on the model thread (or inline, for a cheap model) ------------------------------------------
    def _timed(self, inputs: list[Any]) -> tuple[list[Any], float, tuple[int, int]]:
        """Outputs (or the exception) per item, seconds taken, and (forward passes, extra ones from bisection)."""
        t0 = time.perf_counter()
        passes = [0, 0]
        answers = self._run_bisect(inputs, passes)
        return answers, time.perf_counter() - t0, (passes[0], passes[1])

    def _run_bisect(self, inputs: list[Any], passes: list[int]) -> list[Any]:
        """Outputs per item, or the exception for the items the model cannot run."""
        passes[0] += 1
        try:
            return self.model.run(inputs)
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated by bisection
            if len(inputs) == 1:
                return [exc]
        mid = len(inputs) // 2
        passes[1] += 2
        return self._run_bisect(inputs[:mid], passes) + self._run_bisect(inputs[mid:], passes)


def _trail(msg: WireRequest | WireStage | None) -> list[WireTiming]:
    return (msg.trail or []) if type(msg) is WireStage else []
