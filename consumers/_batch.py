"""A batch as the worker holds it, from the queue to the commit: the consumed records, and what to
send for each, as columns. One object per batch (and one per partition's run of records in it), none
per record: the records are aiokafka's own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from schemas import ErrorCode, WireRequest, WireStage

__all__ = ["FORWARDED", "Batch", "BatchStats", "DeadLetter", "Route", "Run"]

FORWARDED = "forwarded"  # a status beside the wire's ok/error/expired: sent on to the next stage


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


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: ErrorCode
    message: str


@dataclass(slots=True)
class Run:
    """Records of one partition, fetched together: they share their arrival time and assignment epoch."""

    tp: TopicPartition
    epoch: int
    arrived: float  # time.monotonic() when fetched
    records: list[Any]  # aiokafka ConsumerRecords, in offset order


@dataclass(slots=True)
class BatchStats:
    """What one batch did, counted once: the worker's logs and its Prometheus metrics both read it."""

    size: int = 0
    runnable: int = 0  # items that reached the model
    statuses: Counter[str] = field(default_factory=Counter)  # ok / error / expired / forwarded
    dead_letters: Counter[str] = field(default_factory=Counter)  # by error code
    inference_s: float = 0.0
    queue_waits: list[tuple[float, int]] = field(default_factory=list)  # (seconds, items) per run that ran
    forward_passes: int = 0
    extra_forward_passes: int = 0


class Batch:
    """The records of a batch and, per record (by index): its decoded message, the encoded record to send
    (a result or a forwarded stage message) with its destination, its status, and its dead letter."""

    __slots__ = ("answered_ns", "answers", "created", "dead", "dest_partition", "dest_topic", "ids", "inputs",
                 "messages", "on_thread", "records", "run_of", "runnable", "runs", "spans", "started", "stats",
                 "status", "values", "writer")

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self.records: list[Any] = []
        self.run_of: list[int] = []
        for k, run in enumerate(runs):
            self.records.extend(run.records)
            self.run_of.extend([k] * len(run.records))
        n = len(self.records)
        self.messages: list[WireRequest | WireStage | None] = [None] * n
        self.ids: list[str | None] = [None] * n  # the request id a result carries (None: no result can be sent)
        self.values: list[bytes | None] = [None] * n
        self.dest_topic: list[str | None] = [None] * n
        self.dest_partition: list[int | None] = [None] * n
        self.status: list[str | None] = [None] * n
        self.created: list[int | None] = [None] * n  # the request's created_ms, for latency
        self.dead: dict[int, DeadLetter] = {}
        self.stats = BatchStats(size=n)
        # Between the runner's steps (check, infer, finish): the items that go to the model and their inputs,
        # what it answered for each, and when the batch was taken (for queue waits).
        self.runnable: list[int] = []
        self.inputs: list[Any] = []
        self.answers: list[Any] | None = None
        self.started = 0.0
        self.on_thread = False  # the model runs it on the model thread (not inline on the event loop)
        self.writer: Any = None  # the encoder of the model version that ran it (weights may be reloaded meanwhile)
        self.spans: list[Any] | None = None  # tracing on: each record's process span (streamer.tracing)
        self.answered_ns = 0  # tracing on: when the model answered (epoch ns)

    def __len__(self) -> int:
        return len(self.records)

    def tp(self, i: int) -> TopicPartition:
        return self.runs[self.run_of[i]].tp

    def where(self, i: int) -> str:
        """``topic-partition@offset (request id)`` of record ``i``, for logs."""
        r, rid = self.records[i], self.ids[i]
        return f"{r.topic}-{r.partition}@{r.offset} (request {(rid or '?')[:128]})"

    def timing(self, i: int) -> tuple[float, int, float]:
        """(queue ms, batch size, model ms) of record ``i``'s result: the wait of its run, from its arrival to
        the batch's start; the size and model time of the batch's model run."""
        st = self.stats
        return max(0.0, self.started - self.runs[self.run_of[i]].arrived) * 1000, st.runnable, st.inference_s * 1000

    def count(self) -> BatchStats:
        """Fill in the batch's statuses and dead letters by code, once its outcomes are final."""
        st = self.stats
        st.statuses = Counter(s for s in self.status if s is not None)
        st.dead_letters = Counter(d.code for d in self.dead.values())
        return st

    def offsets(self) -> dict[TopicPartition, tuple[int, int]]:
        """The next offset to read and the epoch, per partition in the batch."""
        return {run.tp: (run.records[-1].offset + 1, run.epoch) for run in self.runs}
