"""Pydantic models of the messages on the wire (see WIRE.md)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from ._errors import ErrorCode

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
    "valid_request_id",
    "valid_topic_name",
]

Status = Literal["ok", "error", "expired"]


MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
_ID = Field(min_length=1, max_length=MAX_ID_CHARS)
_NAME = Field(min_length=1, max_length=MAX_NAME_CHARS)
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_request_id(value: object) -> bool:
    """A request id a result can carry: a str of 1-128 characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def valid_topic_name(value: object) -> bool:
    """A legal Kafka topic name: 1-249 of ``[a-zA-Z0-9._-]``, neither ``.`` nor ``..``."""
    return (isinstance(value, str) and 0 < len(value) <= 249 and value not in (".", "..")
            and _TOPIC_CHARS.issuperset(value))


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
    partition: StrictInt | None = Field(default=None, ge=0)  # an int on the wire: "5" is refused


class InferenceRequest(_Wire):
    id: str = _ID
    model: str = _NAME
    inputs: Any
    key: str | None = Field(default=None, max_length=1024)
    reply_to: ReplyTo | None = None
    deadline_ms: int | None = Field(default=None, ge=0)
    created_ms: int = Field(default_factory=now_ms, ge=0)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    # WIRE.md: optional keys may be absent or nil; nil means the default.
    @field_validator("created_ms", mode="before")
    @classmethod
    def _nil_created(cls, v: Any) -> Any:
        return now_ms() if v is None else v

    @field_validator("metadata", mode="before")
    @classmethod
    def _nil_metadata(cls, v: Any) -> Any:
        return {} if v is None else v


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

    @field_validator("metadata", "trail", mode="before")
    @classmethod
    def _nil_default(cls, v: Any, info: Any) -> Any:
        return ({} if info.field_name == "metadata" else []) if v is None else v


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
