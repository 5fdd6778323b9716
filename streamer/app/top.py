"""``streamer top``: a live terminal view of a worker group, what an operator keeps open while scaling.

Every ``--interval`` seconds it reads the group's description (members, their cards: model, version, capacity
and metrics port; see :class:`streamer.assignors.MemberCard`), its committed offsets and the log-end offsets,
and scrapes the Prometheus exporter of each member that serves one. From two such samples it shows:

- per member: model, version, advertised capacity, partitions, lag, results/s, and (from its metrics) the
  mean batch size and p50/p99 end-to-end latency over the interval;
- per partition: owner, committed and log-end offsets, lag and its trend (records/s, + growing);
- in the header: the group's state, total lag with its trend and a sparkline of its history, results/s.

Results/s come from a member's ``streamer_results_total`` where it serves metrics, else from the records its
partitions committed over the interval. Latency percentiles are interpolated within the histogram's buckets
(as Prometheus' ``histogram_quantile`` does).
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import KafkaSettings
from ..status import GroupStatus, MemberStatus, group_status

__all__ = ["Frame", "MemberScrape", "TopSampler", "histogram_quantile", "parse_metrics", "render"]

_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True, slots=True)
class MemberScrape:
    """The figures ``top`` reads from one member's exporter (totals since the process started)."""

    results: float = 0.0
    batches: float = 0.0
    batch_items: float = 0.0
    latency: tuple[tuple[float, float], ...] = ()
    """Cumulative counts of ``streamer_end_to_end_latency_seconds`` per upper bound, +Inf last."""


def parse_metrics(text: str) -> MemberScrape:
    """The figures of one exporter's text (summed over label sets: a process serves one model)."""
    from prometheus_client.parser import text_string_to_metric_families

    results = batches = items = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for name, labels, value, *_ in family.samples:
            if name == "streamer_results_total":
                results += value
            elif name == "streamer_batch_size_count":
                batches += value
            elif name == "streamer_batch_size_sum":
                items += value
            elif name == "streamer_end_to_end_latency_seconds_bucket":
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
    return MemberScrape(results, batches, items, tuple(sorted(buckets.items())))


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound, count), linear within a bucket; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: its bound is all that is known
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


async def scrape(host: str, port: int, timeout_s: float = 1.5) -> MemberScrape | None:
    """One member's exporter, or None if it does not answer (the view shows "-")."""
    def get() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as response:
            return str(response.read().decode())

    try:
        return parse_metrics(await asyncio.to_thread(get))
    except (OSError, ValueError):
        return None


@dataclass
class MemberRow:
    member: MemberStatus
    lag: int
    results_per_s: float | None
    mean_batch: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class PartitionRow:
    name: str
    owner: str
    committed: int | None
    log_end: int
    lag: int
    trend_per_s: float | None


@dataclass
class Frame:
    """What one refresh shows."""

    status: GroupStatus
    at: float
    interval_s: float | None
    members: list[MemberRow] = field(default_factory=list)
    partitions: list[PartitionRow] = field(default_factory=list)
    lag_trend_per_s: float | None = None
    results_per_s: float | None = None
    lag_history: list[int] = field(default_factory=list)


def _delta_buckets(now: tuple[tuple[float, float], ...],
                   before: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    old = dict(before)
    return tuple((bound, count - old.get(bound, 0.0)) for bound, count in now)


class TopSampler:
    """Takes samples of a group and turns each pair into a :class:`Frame`."""

    def __init__(self, settings: KafkaSettings, group: str, topics: list[str] | None = None,
                 history: int = 40) -> None:
        self.settings = settings
        self.group = group
        self.topics = topics or []
        self._last: tuple[float, GroupStatus, dict[str, MemberScrape]] | None = None
        self._history: deque[int] = deque(maxlen=history)

    async def sample(self) -> Frame:
        status = await group_status(self.settings, self.group, self.topics)
        at = time.monotonic()
        scraped = await self._scrape(status)
        frame = self._frame(at, status, scraped)
        self._last = (at, status, scraped)
        return frame

    async def _scrape(self, status: GroupStatus) -> dict[str, MemberScrape]:
        served = [m for m in status.members if m.metrics_port]
        found = await asyncio.gather(*(scrape(m.host, m.metrics_port or 0) for m in served))
        return {f"{m.host}:{m.metrics_port}": s for m, s in zip(served, found, strict=True) if s is not None}

    def _frame(self, at: float, status: GroupStatus, scraped: dict[str, MemberScrape]) -> Frame:
        self._history.append(status.total_lag)
        last_at, last_status, last_scraped = self._last if self._last else (None, None, {})
        dt = at - last_at if last_at is not None else None
        before = {(p.topic, p.partition): p for p in last_status.partitions} if last_status else {}
        frame = Frame(status, at, dt, lag_history=list(self._history))
        lag_by_member: dict[str | None, int] = {}
        committed_by_member: dict[str | None, float] = {}
        for p in status.partitions:
            old = before.get((p.topic, p.partition))
            trend = (p.lag - old.lag) / dt if old is not None and dt else None
            frame.partitions.append(PartitionRow(f"{p.topic}-{p.partition}", p.client_id or "-", p.committed,
                                                 p.log_end, p.lag, trend))
            lag_by_member[p.member_id] = lag_by_member.get(p.member_id, 0) + p.lag
            if old is not None and dt and p.committed is not None:
                committed_by_member[p.member_id] = (committed_by_member.get(p.member_id, 0.0)
                                                    + (p.committed - (old.committed or p.committed)) / dt)
        if last_status is not None and dt:
            frame.lag_trend_per_s = (status.total_lag - last_status.total_lag) / dt
        total = 0.0
        for m in status.members:
            key = f"{m.host}:{m.metrics_port}"
            now, then = scraped.get(key), last_scraped.get(key)
            row = MemberRow(m, lag_by_member.get(m.member_id, 0), committed_by_member.get(m.member_id))
            if now is not None and then is not None and dt:
                row.results_per_s = max(0.0, now.results - then.results) / dt
                batches = now.batches - then.batches
                if batches > 0:
                    row.mean_batch = (now.batch_items - then.batch_items) / batches
                window = _delta_buckets(now.latency, then.latency)
                p50, p99 = histogram_quantile(0.5, window), histogram_quantile(0.99, window)
                row.p50_ms = p50 * 1000 if p50 is not None else None
                row.p99_ms = p99 * 1000 if p99 is not None else None
            total += row.results_per_s or 0.0
            frame.members.append(row)
        frame.results_per_s = total if dt else None
        return frame


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _trend(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:+,.0f}/s" if abs(x) >= 0.5 else "0/s"


def _spark(values: list[int]) -> str:
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return _SPARK[0] * len(values)
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))] for v in values)


def _ranges(partitions: list[str]) -> str:
    """``t-0, t-1, t-2, t-5`` -> ``0-2,5``: one member's partitions in a narrow column."""
    runs: list[list[int]] = []
    for n in sorted(int(p.rsplit("-", 1)[1]) for p in partitions):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def render(frame: Frame, interval_s: float) -> Any:
    """Rich renderables of one frame: a header, the members table and the partitions table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = frame.status
    head = Text.assemble(
        ("streamer top", "bold"), f"  group {s.group}: {s.state or '-'}, assignor {s.assignor or '-'}, ",
        (f"{len(s.members)} members", "bold"), "  lag ", (f"{s.total_lag:,}", "bold"),
        f" ({_trend(frame.lag_trend_per_s)}) {_spark(frame.lag_history)}  results ",
        (f"{_num(frame.results_per_s)}/s", "bold"),
        f"\n{time.strftime('%H:%M:%S')}, every {interval_s:g} s; Ctrl-C quits",
    )
    members = Table("MEMBER", "HOST", "MODEL", "VERSION", "CAPACITY", "PARTITIONS", "LAG", "RESULTS/S", "BATCH",
                    "P50 MS", "P99 MS", title="members", title_justify="left")
    for row in sorted(frame.members, key=lambda r: r.member.client_id):
        m = row.member
        members.add_row(m.client_id, m.host, m.model or "-", m.version or "-",
                        f"{m.capacity:,.0f}/s" if m.capacity else "-",
                        f"{len(m.partitions)}: {_ranges(m.partitions)}", f"{row.lag:,}", _num(row.results_per_s),
                        _num(row.mean_batch, ".1f"), _num(row.p50_ms, ".1f"), _num(row.p99_ms, ".1f"))
    if not frame.members:
        members.add_row("(no members)", *["" for _ in range(10)])
    parts = Table("PARTITION", "OWNER", "COMMITTED", "LOG-END", "LAG", "TREND", title="partitions",
                  title_justify="left")
    for p in frame.partitions:
        parts.add_row(p.name, p.owner, _num(p.committed, ","), f"{p.log_end:,}", f"{p.lag:,}", _trend(p.trend_per_s))
    return Group(head, members, parts)


async def run_top(settings: KafkaSettings, group: str, topics: list[str], interval_s: float,
                  iterations: int | None) -> None:
    """Refresh the view every ``interval_s`` until Ctrl-C (or after ``iterations`` refreshes)."""
    from rich.console import Console
    from rich.live import Live

    sampler = TopSampler(settings, group, topics)
    frame = await sampler.sample()
    console = Console()
    with Live(render(frame, interval_s), console=console, auto_refresh=False, screen=False) as live:
        shown = 1
        while iterations is None or shown < iterations:
            await asyncio.sleep(interval_s)
            frame = await sampler.sample()
            live.update(render(frame, interval_s), refresh=True)
            shown += 1
