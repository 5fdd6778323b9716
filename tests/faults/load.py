"""Steady keyed load, and the figures every fault case reports."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord

from producers import StreamerClient
from schemas import Codec, InferenceResult
from streamer import kafka
from streamer.config import KafkaSettings


@dataclass
class Load:
    """Publishes keyed requests at a fixed rate and records when each result first arrives."""

    client: StreamerClient
    model: str
    inputs: list[Any]
    keys: int = 20
    rate: float = 200.0
    futures: list[asyncio.Future[InferenceResult]] = field(default_factory=list)
    arrived: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, request index)
    sent: dict[int, float] = field(default_factory=dict)  # request index -> monotonic time published
    publish_failures: int = 0
    # The last ``tail`` requests wait for release(): a load that must outlast the changes made under it (workers
    # that join, then serve) pauses there rather than ending first when those changes are slow.
    tail: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self._released.set()

    async def run(self) -> None:
        t0 = time.monotonic()
        for i, x in enumerate(self.inputs):
            if self.tail and i == len(self.inputs) - self.tail and not self._released.is_set():
                await self._released.wait()
                t0 = time.monotonic() - i / self.rate
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.sent[i] = time.monotonic()
            fut = await self.client.submit(x, model=self.model, key=f"k{i % self.keys}", timeout_s=240)
            fut.add_done_callback(lambda f, i=i: self._done(f, i))
            self.futures.append(fut)

    def _done(self, fut: asyncio.Future[InferenceResult], i: int) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.arrived.append((time.monotonic(), i))

    async def results(self) -> list[InferenceResult | BaseException]:
        return list(await asyncio.gather(*self.futures, return_exceptions=True))


async def drain(settings: KafkaSettings, topic: str, idle_s: float = 2.0,
                isolation_level: str = "read_uncommitted") -> list[ConsumerRecord]:
    """Every record of ``topic``, read until nothing new arrives for ``idle_s``."""
    consumer = kafka.consumer(settings, topic, group_id=None, auto_offset_reset="earliest",
                              isolation_level=isolation_level)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            got = await consumer.getmany(timeout_ms=200)
            for batch in got.values():
                records.extend(batch)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return records


REPORT: list[str] = []  # printed at the end of the test session (tests/conftest.py)
# bench/reliability.py runs this suite with larger loads, and collects the figures as JSON lines.
SCALE = float(os.environ.get("STREAMER_FAULT_SCALE", "1"))
_REPORT_FILE = os.environ.get("STREAMER_FAULT_REPORT")


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def report(line: str, figures: Figures | None = None, mode: str = "at-least-once") -> None:
    REPORT.append(line)
    print("\n" + line)
    if _REPORT_FILE:
        case = line.split(":", 1)[0]
        data = {"case": case, "mode": mode, "line": line, **(dataclasses.asdict(figures) if figures else {})}
        with open(_REPORT_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")


@dataclass
class Figures:
    requests: int
    lost: int
    duplicates_raw: int
    duplicates_after_dedup: int
    order_violations: int
    recover_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, case: str) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        return (f"{case}: {self.requests} requests, lost {self.lost}, duplicates raw {self.duplicates_raw} / "
                f"after de-duplication {self.duplicates_after_dedup}, order violations {self.order_violations}, "
                f"recovered in {self.recover_s:.1f} s{extra}")


def figures(load: Load, results: list[InferenceResult | BaseException], raw: list[ConsumerRecord],
            fault_times: list[float]) -> Figures:
    ok = [r for r in results if isinstance(r, InferenceResult) and r.status == "ok"]
    ids = Counter(dict(r.headers).get("streamer-request-id", b"").decode() for r in raw)
    seen_by_client = Counter(r.id for r in ok)
    by_key: dict[int, list[int]] = defaultdict(list)
    for _, i in sorted(load.arrived):
        by_key[i % load.keys].append(i)
    violations = sum(sum(1 for a, b in itertools.pairwise(seq) if b < a) for seq in by_key.values())
    # Seconds to recover: the longest a request published around a fault waited for its result
    # (in steady state a result takes milliseconds; a stalled partition shows up here).
    window = [(t, i) for t, i in load.arrived if any(f - 1.0 <= load.sent[i] <= f + 30.0 for f in fault_times)]
    waits = [t - load.sent[i] for t, i in window]
    return Figures(
        requests=len(load.inputs),
        lost=len(load.inputs) - len(ok),
        duplicates_raw=sum(c - 1 for c in ids.values() if c > 1),
        duplicates_after_dedup=sum(c - 1 for c in seen_by_client.values() if c > 1),
        order_violations=violations,
        recover_s=max(waits, default=0.0),
    )


async def explain_duplicates(fig: Figures, settings: KafkaSettings, request_topic: str,
                             raw: list[ConsumerRecord]) -> None:
    """Where duplicate results came from, in ``fig.extra`` so a failing check says it: for a few duplicated
    request ids, the request records that carry the id (two of them: the client's write was duplicated) and each
    result's partition, offset, worker and batch (one request record: the worker answered it twice)."""
    if not fig.duplicates_raw:
        return
    by_id: dict[str, list[ConsumerRecord]] = defaultdict(list)
    for r in raw:
        by_id[dict(r.headers).get("streamer-request-id", b"").decode()].append(r)
    dup = {i: rs for i, rs in by_id.items() if len(rs) > 1}
    requests = await drain(settings, request_topic)
    sources: dict[str, list[str]] = defaultdict(list)
    for r in requests:
        rid = dict(r.headers).get("streamer-request-id", b"").decode()
        if rid in dup:
            sources[rid].append(f"{r.partition}@{r.offset}")
    twice = sum(1 for i in dup if len(sources[i]) > 1)
    lines = []
    for rid, rs in list(dup.items())[:5]:
        answers = []
        for r in rs:
            res = InferenceResult.model_validate(Codec().unpack(r.value))
            t = res.timings
            answers.append(f"{r.partition}@{r.offset} by {res.worker} at {res.created_ms}"
                           + (f" batch {t.batch_size}" if t else ""))
        lines.append(f"{rid}: requests {sources[rid]}, results {answers}")
    fig.extra["duplicated ids"] = len(dup)
    fig.extra["with two request records"] = twice
    fig.extra["examples"] = "; ".join(lines)


MODES = ["at-least-once", "exactly-once"]


def isolation(mode: str) -> str:
    """How to count raw results: exactly-once promises hold for read_committed readers."""
    return "read_committed" if mode == "exactly-once" else "read_uncommitted"


LIVENESS_S = 60.0  # a liveness bound, not a speed goal: a case that takes longer to recover is stuck


def check(fig: Figures, mode: str) -> None:
    assert fig.lost == 0, fig
    assert fig.recover_s <= LIVENESS_S, f"no recovery within {LIVENESS_S:g} s: {fig}"
    assert fig.duplicates_after_dedup == 0, fig
    assert fig.order_violations == 0, fig
    if mode == "exactly-once":
        assert fig.duplicates_raw == 0, f"a duplicate committed result in exactly-once mode: {fig}"
