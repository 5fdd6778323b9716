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

__all__ = ["FORWARDED", "Batch", "BatchStats", "DeadLetter", "Route", "Run", "RunStats"]

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


@dataclass(slots=True)
class RunStats:
    """Totals since start, for the worker's logs; added to once per batch from its :class:`BatchStats`."""

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

    def add(self, st: BatchStats) -> None:
        self.batches += 1
        self.items += st.size
        self.ok += st.statuses["ok"] + st.statuses[FORWARDED]
        self.errors += st.statuses["error"]
        self.expired += st.statuses["expired"]
        self.dead_letters += sum(st.dead_letters.values())
        self.forward_passes += st.forward_passes
        self.extra_forward_passes += st.extra_forward_passes
        self.queue_ms_total += sum(w * n for w, n in st.queue_waits) * 1000
        self.inference_ms_total += st.inference_s * 1000

    def since(self, prev: RunStats, interval_s: float) -> str | None:
        """What happened since ``prev``, ``interval_s`` ago, as the worker logs it (None: nothing did)."""
        items, batches = self.items - prev.items, self.batches - prev.batches
        if not items:
            return None
        return (f"{items / interval_s:.1f} items/s, mean batch {items / max(batches, 1):.1f}, queue wait "
                f"{(self.queue_ms_total - prev.queue_ms_total) / items:.1f} ms, model "
                f"{(self.inference_ms_total - prev.inference_ms_total) / max(batches, 1):.1f} ms per batch, ok "
                f"{self.ok - prev.ok}, errors {self.errors - prev.errors}, expired {self.expired - prev.expired}, "
                f"dead letters {self.dead_letters - prev.dead_letters}")

    def rates_since(self, prev: RunStats, min_mean_batch: float) -> tuple[float, float] | None:
        """Items/s of model time and of busy wall time since ``prev``, if batches averaged ``min_mean_batch`` items
        at least (light load, small batches, says nothing of what a worker sustains)."""
        items, batches = self.items - prev.items, self.batches - prev.batches
        busy_s = (self.inference_ms_total - prev.inference_ms_total) / 1000
        wall_s = (self.busy_ms_total - prev.busy_ms_total) / 1000
        if batches and busy_s > 0 and wall_s > 0 and items / batches >= min_mean_batch:
            return items / busy_s, items / wall_s
        return None


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
