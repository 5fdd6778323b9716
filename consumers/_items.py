"""What the worker holds for one consumed record, and what it decides to send for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from schemas import InferenceResult, StageMessage

__all__ = ["DeadLetter", "Item", "Outcome", "Route"]


@dataclass(frozen=True, slots=True)
class Route:
    """What a worker serves: one model, or one stage of a pipeline.

    ``model`` is the name clients send (the model's, or the pipeline's). The first stage (or a
    single model) reads client requests; later stages read stage messages. The last stage (or a
    single model) publishes results; earlier stages forward to ``next_topic`` for ``next_stage``.
    """

    model: str
    stage: str | None = None
    first: bool = True
    next_topic: str | None = None
    next_stage: str | None = None

    def __post_init__(self) -> None:
        if (self.next_topic is None) != (self.next_stage is None):
            raise ValueError("next_topic and next_stage go together")


@dataclass(slots=True)
class Item:
    """One consumed record, from fetch to commit."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes | None]]  # as read: a value may be null, a key may hold U+FFFD
    arrived: float  # time.monotonic() when fetched
    epoch: int  # the partition's assignment epoch when fetched
    message: StageMessage | None = None  # the decoded request, in one shape for every stage
    inputs: Any = None  # what the model's validate() returned


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: str
    message: str


@dataclass(slots=True)
class Outcome:
    """The records to publish for one item: a result or a forwarded message, and/or a dead letter."""

    item: Item
    result: InferenceResult | None = None
    reply_topic: str | None = None
    reply_partition: int | None = None
    forward: StageMessage | None = None
    dead_letter: DeadLetter | None = None
