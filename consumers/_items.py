"""What the worker holds for one consumed record, and what it decides to send for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from schemas import InferenceRequest, InferenceResult

__all__ = ["DeadLetter", "Item", "Outcome"]


@dataclass(slots=True)
class Item:
    """One consumed record, from fetch to commit."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    arrived: float  # time.monotonic() when fetched
    epoch: int  # the worker's assignment epoch when fetched
    request: InferenceRequest | None = None
    inputs: Any = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: str
    message: str


@dataclass(slots=True)
class Outcome:
    """The records to publish for one item: a result (when it can be routed) and/or a dead letter."""

    item: Item
    result: InferenceResult | None = None
    reply_topic: str | None = None
    reply_partition: int | None = None
    dead_letter: DeadLetter | None = None
    extra: dict[str, Any] = field(default_factory=dict)
