"""From a batch of consumed records to one outcome each: decode, check, run the model, split.

Decoding and checks run on the event loop (they are cheap); the model runs on its own
thread so heartbeats and fetching go on during long batches. A batch the model fails on
is bisected, so one poison item fails alone and every other item still gets its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from schemas import (
    SCHEMA_VERSION,
    Codec,
    DecodeError,
    ErrorInfo,
    InferenceResult,
    ReplyTo,
    RoutingHeaders,
    Timings,
    WireError,
    now_ms,
)
from streamer.errors import BadInput
from streamer.models import Model

from ._items import DeadLetter, Item, Outcome

__all__ = ["BatchRunner", "RunStats"]

_SCHEMA = str(SCHEMA_VERSION).encode()


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


class BatchRunner:
    def __init__(self, model: Model, codec: Codec, worker: str, default_reply_topic: str) -> None:
        self.model = model
        self.codec = codec
        self.worker = worker
        self.default_reply_topic = default_reply_topic
        self.stats = RunStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-model")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def warm_up(self) -> None:
        with contextlib.suppress(NotImplementedError):
            self.model.run(self.model.example_inputs(2))

    async def run(self, batch: list[Item]) -> list[Outcome]:
        """One outcome per item, in the batch's order."""
        self.stats.batches += 1
        self.stats.items += len(batch)
        start = time.monotonic()
        outcomes: list[Outcome] = []
        runnable: list[tuple[Outcome, Any]] = []
        for item in batch:
            outcome = self._check(item)
            outcomes.append(outcome)
            if outcome.result is None and outcome.dead_letter is None:
                runnable.append((outcome, item.inputs))
        if runnable:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            answers = await loop.run_in_executor(self._executor, self._run_bisect, [x for _, x in runnable])
            inference_ms = (time.perf_counter() - t0) * 1000
            for (outcome, _), answer in zip(runnable, answers, strict=True):
                item = outcome.item
                assert item.request is not None
                timings = Timings(
                    queue_ms=max(0.0, (start - item.arrived) * 1000),
                    batch_size=len(runnable),
                    inference_ms=inference_ms,
                )
                if isinstance(answer, BaseException):
                    code = answer.code if isinstance(answer, BadInput) else "model_error"
                    msg = f"{type(answer).__name__}: {answer}"
                    self.fail(outcome, code, msg, timings)
                else:
                    outcome.result = self._result(item, "ok", outputs=answer, timings=timings)
                    self.stats.ok += 1
        return outcomes

    # -- per item, on the loop -------------------------------------------------------------------------
    def _check(self, item: Item) -> Outcome:
        outcome = Outcome(item)
        try:
            version = dict(item.headers).get("streamer-schema", _SCHEMA)
            if version != _SCHEMA:
                raise DecodeError(f"unsupported schema version {version.decode(errors='replace')!r}; "
                                  f"this worker reads {SCHEMA_VERSION}")
            req = self.codec.decode_request(item.value)
        except WireError as exc:
            routing = RoutingHeaders.parse(item.headers)
            rid = exc.request_id or routing.request_id
            reply = exc.reply_to if isinstance(exc.reply_to, ReplyTo) else routing.reply_to
            self.fail(outcome, exc.code, str(exc), None, request_id=rid, reply_to=reply)
            return outcome
        item.request = req
        self._route(outcome, req.reply_to)
        if req.model != self.model.name:
            self.fail(outcome, "unknown_model",
                       f"this worker group serves {self.model.name!r}, not {req.model!r}", None)
        elif req.expired():
            outcome.result = self._result(item, "expired", error=ErrorInfo(
                code="deadline_exceeded", message=f"deadline {req.deadline_ms} passed before inference"))
            self.stats.expired += 1
        else:
            try:
                item.inputs = self.model.validate(req.inputs)
            except BadInput as exc:
                self.fail(outcome, "bad_input", str(exc), None)
        return outcome

    def _route(self, outcome: Outcome, reply: ReplyTo | None) -> None:
        outcome.reply_topic = reply.topic if reply else self.default_reply_topic
        outcome.reply_partition = reply.partition if reply else None

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
        if outcome.result is not None and outcome.result.status == "ok":
            self.stats.ok -= 1
        self.stats.errors += 1
        self.stats.dead_letters += 1
        outcome.dead_letter = DeadLetter(code, message)
        req = outcome.item.request
        rid = req.id if req else request_id
        if rid is None:
            return  # nobody to tell: the dead letter alone records it
        if req is None:
            self._route(outcome, reply_to)
        outcome.result = InferenceResult(
            id=rid,
            model=req.model if req else self.model.name,
            model_version=self.model.version,
            status="error",
            error=ErrorInfo(code=code, message=message),
            timings=timings,
            worker=self.worker,
        )

    def _result(self, item: Item, status: Any, **fields: Any) -> InferenceResult:
        assert item.request is not None
        return InferenceResult(
            id=item.request.id,
            model=self.model.name,
            model_version=self.model.version,
            status=status,
            worker=self.worker,
            created_ms=now_ms(),
            **fields,
        )

    # -- on the model thread -----------------------------------------------------------------------
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
