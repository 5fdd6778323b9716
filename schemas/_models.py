"""Pydantic models of the messages on the wire (see WIRE.md)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorCode",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResult",
    "ReplyTo",
    "StageMessage",
    "StageTiming",
    "Status",
    "Timings",
    "new_request_id",
    "now_ms",
]

Status = Literal["ok", "error", "expired"]

ErrorCode = Literal[
    "decode_error",  # the bytes are not a valid message (msgpack, UTF-8, limits)
    "schema_error",  # valid msgpack, but not a valid request
    "unknown_model",  # no worker model by that name on this topic
    "bad_input",  # the model rejected this item's inputs (dtype, shape, NaN, ...)
    "model_error",  # the model raised while running
    "deadline_exceeded",  # the deadline passed before inference (status "expired")
    "internal_error",
]

_ID = Field(min_length=1, max_length=128)
_NAME = Field(min_length=1, max_length=256)


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return uuid.uuid4().hex


class _Wire(BaseModel):
    # Unknown fields are ignored, so a newer writer can add optional fields within one schema version.
    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True)


class ReplyTo(_Wire):
    """Where a worker publishes the result: a topic, and optionally a fixed partition."""

    topic: str = _NAME
    partition: int | None = Field(default=None, ge=0)


class InferenceRequest(_Wire):
    id: str = _ID
    model: str = _NAME
    inputs: Any
    key: str | None = Field(default=None, max_length=1024)
    reply_to: ReplyTo | None = None
    deadline_ms: int | None = Field(default=None, ge=0)
    created_ms: int = Field(default_factory=now_ms, ge=0)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    def expired(self, at_ms: int | None = None) -> bool:
        return self.deadline_ms is not None and (at_ms if at_ms is not None else now_ms()) > self.deadline_ms


class ErrorInfo(_Wire):
    code: ErrorCode
    message: str
    stage: str | None = Field(default=None, description="the pipeline stage that failed, if any")


class Timings(_Wire):
    queue_ms: float = Field(ge=0, description="from the request's arrival at the worker to its batch's start")
    batch_size: int = Field(ge=0)
    inference_ms: float = Field(ge=0)


class StageTiming(_Wire):
    """One pipeline stage's part in a request: who ran it, how long it waited and ran."""

    stage: str
    worker: str
    queue_ms: float = Field(ge=0)
    batch_size: int = Field(ge=0)
    inference_ms: float = Field(ge=0)
    done_ms: int = Field(ge=0, description="when the stage finished this item, Unix epoch ms")


class StageMessage(_Wire):
    """A request in flight between two pipeline stages (an intermediate topic's record)."""

    id: str = _ID
    model: str = _NAME  # the pipeline's name, as the client sent it
    stage: str = _NAME  # the stage this message is for
    payload: Any
    key: str | None = Field(default=None, max_length=1024)
    reply_to: ReplyTo | None = None
    deadline_ms: int | None = Field(default=None, ge=0)
    created_ms: int = Field(ge=0)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    trail: list[StageTiming] = Field(default_factory=list)


class InferenceResult(_Wire):
    id: str = _ID
    model: str
    model_version: str = ""
    status: Status
    outputs: Any = None
    error: ErrorInfo | None = None
    timings: Timings | None = None
    stages: list[StageTiming] | None = Field(default=None, description="per-stage trail, for pipelines")
    worker: str = ""
    created_ms: int = Field(default_factory=now_ms, ge=0)
