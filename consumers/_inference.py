"""From a batch of consumed records to one outcome each: decode, check, run the model, split.

Decoding and checks run on the event loop (they are cheap); the model runs on its own
thread so heartbeats and fetching go on during long batches. A batch the model fails on
is bisected, so one poison item fails alone and every other item still gets its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    Codec,
    DecodeError,
    ErrorInfo,
    InferenceResult,
    ReplyTo,
    RoutingHeaders,
    SchemaError,
    StageMessage,
    StageTiming,
    Timings,
    WireError,
    now_ms,
    valid_request_id,
)
from streamer.errors import BadInput
from streamer.models import Model

from ._items import DeadLetter, Item, Outcome, Route

__all__ = ["BatchRunner", "RunStats"]

_SCHEMA = str(SCHEMA_VERSION).encode()
INLINE_BELOW_MS = 1.0
"""A batch the model should take less than this for (estimated from its measured times) runs on the event
loop, not the model thread: handing a tiny batch to a thread costs more than running it."""


@dataclass(slots=True)
class RunStats:
    batches: int = 0
    items: int = 0
    ok: int = 0
    errors: int = 0
    expired: int = 0
    dead_letters: int = 0
    forward_passes: int = 0
    extra_forward_passes: int = 0  # caused by bisecting failed batches
    queue_ms_total: float = 0.0
    inference_ms_total: float = 0.0
    busy_ms_total: float = 0.0  # from taking a batch to publishing its outputs


class BatchRunner:
    def __init__(self, model: Model, codec: Codec, worker: str, default_reply_topic: str,
                 route: Route | None = None) -> None:
        self.model = model
        self.codec = codec
        self.worker = worker
        self.default_reply_topic = default_reply_topic
        self.route = route or Route(model.name)
        self.stats = RunStats()
        self.on_batch: Callable[[int, float, list[float]], None] | None = None  # size, model s, queue waits s
        self.honor_deadlines = True  # replay of old traffic turns this off
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-model")
        # Moving means of the model's time per batch and of the batch size it was measured at.
        self._batch_ms = math.inf
        self._batch_n = 1.0

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def warm_up(self) -> None:
        """Run the model twice on example inputs; the second run's time decides where batches run at first."""
        with contextlib.suppress(NotImplementedError):
            inputs = [self.model.validate(x) for x in self.model.example_inputs(2)]
            self.model.run(inputs)
            self._measured(self._timed(inputs)[1] * 1000, len(inputs))

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

    async def run(self, batch: list[Item]) -> list[Outcome]:
        """One outcome per item, in the batch's order."""
        self.stats.batches += 1
        self.stats.items += len(batch)
        start = time.monotonic()
        outcomes = [self._check(item) for item in batch]
        runnable = [o for o in outcomes if o.result is None and o.dead_letter is None]
        if not runnable:
            return outcomes
        inputs = [o.item.inputs for o in runnable]
        if self._estimate_ms(len(inputs)) < INLINE_BELOW_MS:
            # Cheaper than handing it to the model thread (a thread hop costs more than a tiny model):
            # run it here; a model that turns out slower goes back to its thread from the next batch on.
            answers, model_s = self._timed(inputs)
        else:
            answers, model_s = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, inputs)
        inference_ms = model_s * 1000
        self._measured(inference_ms, len(inputs))
        self.stats.inference_ms_total += inference_ms
        waits_s = [max(0.0, start - o.item.arrived) for o in runnable]
        if self.on_batch is not None:
            self.on_batch(len(runnable), inference_ms / 1000, waits_s)
        for outcome, answer, wait_s in zip(runnable, answers, waits_s, strict=True):
            queue_ms = wait_s * 1000
            self.stats.queue_ms_total += queue_ms
            timings = Timings(queue_ms=queue_ms, batch_size=len(runnable), inference_ms=inference_ms)
            if isinstance(answer, BaseException):
                code = answer.code if isinstance(answer, BadInput) else "model_error"
                self.fail(outcome, code, f"{type(answer).__name__}: {answer}", timings)
            else:
                self._succeed(outcome, answer, timings)
        return outcomes

    # -- per item, on the loop -------------------------------------------------------------------------
    def _decode(self, item: Item) -> StageMessage:
        for key, version in item.headers:
            # Absent or null: version 1. Anything else but "1" is a version this worker cannot read.
            if key == SCHEMA_HEADER and version is not None and version != _SCHEMA:
                raise DecodeError(f"unsupported schema version {bytes(version[:64]).decode(errors='replace')!r}; "
                                  f"this worker reads {SCHEMA_VERSION}")
        route = self.route
        if not route.first:
            msg = self.codec.decode_stage(item.value)
            if msg.model == route.model and msg.stage != route.stage:
                raise SchemaError(f"a message for stage {msg.stage!r} reached stage {route.stage!r}",
                                  request_id=msg.id, reply_to=msg.reply_to)
            return msg
        req = self.codec.decode_request(item.value)
        return StageMessage(
            id=req.id, model=req.model, stage=route.stage or route.model, payload=req.inputs, key=req.key,
            reply_to=req.reply_to, deadline_ms=req.deadline_ms, created_ms=req.created_ms, metadata=req.metadata,
        )

    def _check(self, item: Item) -> Outcome:
        outcome = Outcome(item)
        try:
            msg = self._decode(item)
        except WireError as exc:
            routing = RoutingHeaders.parse(item.headers)
            rid = exc.request_id or routing.request_id
            reply = exc.reply_to if isinstance(exc.reply_to, ReplyTo) else routing.reply_to
            self.fail(outcome, exc.code, str(exc), None, request_id=rid, reply_to=reply)
            return outcome
        item.message = msg
        self._route(outcome, msg.reply_to)
        if msg.model != self.route.model:
            what = f"stage {self.route.stage!r} of {self.route.model!r}" if self.route.stage else repr(self.route.model)
            self.fail(outcome, "unknown_model", f"this worker group serves {what}, not {msg.model!r}", None)
        elif self.honor_deadlines and msg.deadline_ms is not None and now_ms() > msg.deadline_ms:
            outcome.result = self._result(msg, "expired", error=ErrorInfo(
                code="deadline_exceeded", message=f"deadline {msg.deadline_ms} passed before inference",
                stage=self.route.stage))
            self.stats.expired += 1
        else:
            try:
                item.inputs = self.model.validate(msg.payload)
            except BadInput as exc:
                self.fail(outcome, "bad_input", str(exc), None)
            except Exception as exc:  # noqa: BLE001 - a model's own validate may raise anything on odd input
                self.fail(outcome, "bad_input", f"{type(exc).__name__}: {exc}", None)
        return outcome

    def _route(self, outcome: Outcome, reply: ReplyTo | None) -> None:
        outcome.reply_topic = reply.topic if reply else self.default_reply_topic
        outcome.reply_partition = reply.partition if reply else None

    def _succeed(self, outcome: Outcome, answer: Any, timings: Timings) -> None:
        msg = outcome.item.message
        assert msg is not None
        route = self.route
        trail = msg.trail
        if route.stage is not None:
            trail = [*trail, StageTiming(stage=route.stage, worker=self.worker, queue_ms=timings.queue_ms,
                                         batch_size=timings.batch_size, inference_ms=timings.inference_ms,
                                         done_ms=now_ms())]
        if route.next_stage is not None:
            outcome.forward = msg.model_copy(update={"stage": route.next_stage, "payload": answer, "trail": trail})
        else:
            outcome.result = self._result(msg, "ok", outputs=answer, timings=timings,
                                          stages=trail if route.stage is not None else None)
        self.stats.ok += 1

    def fail(
        self,
        outcome: Outcome,
        code: Any,
        message: str,
        timings: Timings | None,
        *,
        request_id: str | None = None,
        reply_to: ReplyTo | None = None,
    ) -> None:
        """An error result (when the request can be routed) and a dead letter."""
        if (outcome.result is not None and outcome.result.status == "ok") or outcome.forward is not None:
            self.stats.ok -= 1
        outcome.forward = None
        self.stats.errors += 1
        self.stats.dead_letters += 1
        outcome.dead_letter = DeadLetter(code, message)
        msg = outcome.item.message
        rid = msg.id if msg else request_id
        outcome.result = None
        if not valid_request_id(rid):
            return  # nobody to tell (no id, or one no result can carry): the dead letter alone records it
        assert rid is not None
        if msg is None:
            self._route(outcome, reply_to)
        try:
            outcome.result = InferenceResult(
                id=rid,
                model=msg.model if msg else self.route.model,
                model_version=self.model.version,
                status="error",
                error=ErrorInfo(code=code, message=message, stage=self.route.stage),
                timings=timings,
                stages=(msg.trail or None) if msg is not None and self.route.stage is not None else None,
                worker=self.worker,
            )
        except ValidationError:
            outcome.result = None  # cannot happen for what the checks above let through; never raise here

    def _result(self, msg: StageMessage, status: Any, **fields: Any) -> InferenceResult:
        return InferenceResult(
            id=msg.id,
            model=msg.model,
            model_version=self.model.version,
            status=status,
            worker=self.worker,
            created_ms=now_ms(),
            **fields,
        )

    def _estimate_ms(self, n: int) -> float:
        """The model's time for a batch of ``n``: flat below the sizes measured (a small model's time is
        mostly fixed overhead), linear above them."""
        return self._batch_ms * max(1.0, n / self._batch_n)

    def _measured(self, ms: float, n: int) -> None:
        if self._batch_ms == math.inf:
            self._batch_ms, self._batch_n = ms, float(n)
        else:
            self._batch_ms = 0.8 * self._batch_ms + 0.2 * ms
            self._batch_n = 0.8 * self._batch_n + 0.2 * n

    # -- on the model thread (or inline, for a cheap model) ------------------------------------------
    def _timed(self, inputs: list[Any]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        answers = self._run_bisect(inputs)
        return answers, time.perf_counter() - t0

    def _run_bisect(self, inputs: list[Any]) -> list[Any]:
        """Outputs per item, or the exception for the items the model cannot run."""
        self.stats.forward_passes += 1
        try:
            return self.model.run(inputs)
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated by bisection
            if len(inputs) == 1:
                return [exc]
        mid = len(inputs) // 2
        self.stats.extra_forward_passes += 2
        return self._run_bisect(inputs[:mid]) + self._run_bisect(inputs[mid:])
