"""The dynamic batching policy, the one loop that applies it, and batching to a latency target.

A batch closes when it holds ``max_batch_size`` items, or when ``max_wait_ms``
has passed since its first item arrived, whichever comes first. With a latency target
(:class:`LatencyTarget`) the worker chooses both while it runs.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchPolicy", "BatchQueue", "Choice", "FetchPacing", "LatencyTarget"]

EXPECTED_ITEMS = 0.25  # a batch waits only when at least this many more items are expected within the wait
LIGHT_LOAD = 0.5  # batches wait to fill only below this share of what full batches can serve
UTILISATION = 0.9  # batches may not be so small that the model is busier than this (queues grow without bound)
BACKLOG_GAIN = 0.8  # a backlog takes full batches only if they cost at most this share per item of the limit's
FITTED_SIZES = 16  # the fit is over the batch sizes seen last (a median over every two of them)
RATE_WINDOW_S = 1.0  # the arrival rate is what arrived in this last while
PACING_WINDOW_S = 0.25  # a fetch pacing is chosen from what arrived in this last while
PACED_ABOVE = 1.0  # fetches wait for a batch once more than this many records arrive within the wait ...
UNPACED_BELOW = 0.5  # ... and come back at the first record again once fewer than this many do
LONGEST_FETCH_WAIT_MS = 500  # aiokafka's default: a fetch must come back well within request_timeout_ms

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")


class BatchQueue(Generic[K, T]):
    """An unbounded FIFO of runs (items that came together under one key, such as one partition's records
    of one fetch), from which whole batches are taken under a :class:`BatchPolicy`.

    A batch is a list of ``(key, items)`` runs holding at most ``max_batch_size`` items in all; a run
    longer than the room left is split, its rest staying at the head. Bounding is the producer's job
    (the worker stops fetching when ``len(queue)`` is over its limit), so ``put`` never blocks.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._runs: deque[tuple[K, list[T]]] = deque()
        self._len = 0
        self._head_since = 0.0  # loop time at which the current head run arrived
        self._arrived = asyncio.Event()
        self._shrunk = asyncio.Event()  # set whenever items leave the queue, by any way
        self._closed = False

    def __len__(self) -> int:
        return self._len

    def put(self, key: K, items: list[T], waited_s: float = 0.0) -> None:
        """``waited_s``: how long the items may have waited already (a fetch that waited at the broker for more):
        counted in the batch's wait, so it is not waited again here."""
        if not items:
            return
        if not self._runs:
            self._head_since = asyncio.get_running_loop().time() - waited_s
        self._runs.append((key, items))
        self._len += len(items)
        self._arrived.set()

    def close(self) -> None:
        """Wake any waiter; ``next_batch`` then returns what is left, then empty lists."""
        self._closed = True
        self._arrived.set()
        self._shrunk.set()

    def drop(self, keep: Callable[[K], bool]) -> int:
        """Remove the runs whose key ``keep`` refuses; returns how many items were removed."""
        before = self._len
        self._runs = deque(r for r in self._runs if keep(r[0]))
        self._len = sum(len(items) for _, items in self._runs)
        if self._len < before:
            self._shrunk.set()
        return before - self._len

    async def wait_for_room(self, limit: int) -> None:
        """Return once fewer than ``limit`` items are queued, or the queue is closed.

        Every way items leave (a batch taken, items dropped on a rebalance) wakes the waiter.
        """
        while self._len >= limit and not self._closed:
            self._shrunk.clear()
            await self._shrunk.wait()

    async def next_batch(self) -> list[tuple[K, list[T]]]:
        """Wait for a first item, then until ``max_wait_ms`` after its arrival for the batch to fill."""
        while not self._runs:
            if self._closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        size = self.policy.max_batch_size
        if self._len < size and self.policy.max_wait_ms > 0 and not self._closed:
            loop = asyncio.get_running_loop()
            deadline = self._head_since + self.policy.max_wait_ms / 1000
            while self._len < size and not self._closed:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
        batch: list[tuple[K, list[T]]] = []
        room = size
        while room and self._runs:
            key, items = self._runs[0]
            if len(items) <= room:
                self._runs.popleft()
                batch.append((key, items))
                room -= len(items)
            else:
                batch.append((key, items[:room]))
                self._runs[0] = (key, items[room:])
                room = 0
        taken = size - room
        self._len -= taken
        if taken:
            self._shrunk.set()
        if self._runs:
            # The new head has waited since at least now; it was already here.
            self._head_since = asyncio.get_running_loop().time()
        return batch


class FetchPacing:
    """How a worker's fetches wait at the broker: for a batch's worth of records while they come fast, for the
    first record otherwise.

    Paced, a fetch waits for ``max_batch_size`` records of the mean size seen, for at most ``max_wait_ms``
    (at most 500 ms): one fetch, and one socket write each side, per batch rather than per record or two. The
    batch queue then counts that wait as the batch's (``waited_s``). That pays only while more than one record
    arrives within the wait (``PACED_ABOVE``): with fewer, a paced fetch would come back empty every
    ``max_wait_ms``, and an idle worker would fetch hundreds of times a second. So below ``UNPACED_BELOW`` a
    fetch comes back with the first record, or after 500 ms when none comes (aiokafka's defaults). The arrival
    rate is what :meth:`seen` counted over the last ``PACING_WINDOW_S``, shared among the brokers fetched from
    (``nodes``: the consumer sends one fetch per leader at a time, so each leader's share is what counts).
    """

    def __init__(self, policy: BatchPolicy, now: float) -> None:
        self.policy = policy
        self.wait_ms = min(int(policy.max_wait_ms), LONGEST_FETCH_WAIT_MS)
        self.paced = False
        self._record_bytes = 0.0  # the records' mean size (exponentially weighted)
        self._since = now
        self._count = 0

    @property
    def min_bytes(self) -> int:
        return max(1, int(self.policy.max_batch_size * self._record_bytes)) if self.paced else 1

    @property
    def max_wait_ms(self) -> int:
        return self.wait_ms if self.paced else LONGEST_FETCH_WAIT_MS

    @property
    def waited_s(self) -> float:
        """How long records fetched now may have waited at the broker already."""
        return self.wait_ms / 1000 if self.paced else 0.0

    def seen(self, records: int, nbytes: int, now: float, nodes: Callable[[], int] = lambda: 1) -> bool:
        """Count a poll's ``records`` (``nbytes`` in all; zero for an empty poll); True when :attr:`min_bytes` or
        :attr:`max_wait_ms` changed. ``nodes``: how many brokers lead the partitions read (asked once a window)."""
        before = (self.min_bytes, self.max_wait_ms)
        if records:
            mean = nbytes / records
            self._record_bytes = mean if not self._record_bytes else 0.8 * self._record_bytes + 0.2 * mean
            self._count += records
        elapsed = now - self._since
        if elapsed >= PACING_WINDOW_S:
            # records arriving at each leader within one wait
            expected = self._count / elapsed * self.wait_ms / 1000 / max(1, nodes())
            self.paced = self.wait_ms >= 1 and expected > (UNPACED_BELOW if self.paced else PACED_ABOVE)
            self._since, self._count = now, 0
        return (self.min_bytes, self.max_wait_ms) != before


@dataclass(frozen=True, slots=True)
class Choice:
    """What :class:`LatencyTarget` chose for the next batches, and the model-time estimate behind it."""

    policy: BatchPolicy
    model_ms: float  # the estimated model time of a batch of ``policy.max_batch_size``
    reachable: bool  # False: even a batch of one is over the budget


class LatencyTarget:
    """Batching to a latency target: how large a batch to take and how long to wait for it, chosen while the
    worker runs, so that an item's queue wait plus its batch's model time stays under ``target_ms``.

    The worker reports each batch's size and model time (:meth:`observed`) and the items it fetched
    (:meth:`arrived`); a worker seeds it with the smallest and the largest batch, timed before it serves. The
    model's time per batch is fitted as ``a + b * n`` (Theil-Sen: medians, so that a few batches held up by the
    scheduler do not move it; over the last 16 sizes seen, each an average of its recent batches; one size seen:
    proportional to the size above it, which overestimates what batching gains, so the choice errs on the small
    side until larger batches are seen).

    With a budget of ``headroom * target_ms`` (0.8: room for the tail), an item may wait for its batch to fill,
    then for the batch ahead of it on the model, then for its own: the batch limit is the largest ``n`` (up to
    ``cap``) with ``wait + 2 * t(n)`` within the budget. A batch waits to fill only while less than a batch of the
    limit without a wait is queued (a burst fills it at once), at light load (arrivals over
    the last second under ``LIGHT_LOAD`` of what full batches serve) and only when another item is likely
    within the model's fixed cost per batch (the fit's intercept ``a``: ``rate * a >= 0.25``), and then for at
    most that cost (what running a batch without the next item costs again: the ski-rental rule) and what the
    budget leaves. Near saturation nothing waits: the model is busy anyway, and items gather while it runs.
    The limit is never below the smallest batch that keeps the model under ``UTILISATION`` (90%) busy at that
    rate (all of ``cap`` when none does): batches too small for the load grow the queue without bound, and the
    target with it. With more queued than the limit (a backlog: the target is lost for those items already)
    the limit is ``cap`` only if full batches cost at most ``BACKLOG_GAIN`` (80%) per item of the limit's (as
    measured: a fit over three sizes or more with a cost per item): for a model paid per item, a full batch
    drains a backlog no sooner and holds every item that arrives meanwhile for longer.
    """

    def __init__(self, target_ms: float, cap: int, headroom: float = 0.8, alpha: float = 0.2) -> None:
        self.target_ms = target_ms
        self.cap = cap
        self.budget_ms = headroom * target_ms
        self._alpha = alpha
        self._cost: dict[int, float] = {}  # batch size -> moving mean of its model ms
        self._fit: tuple[float, float, int] | None = None  # (a, b, n0) of model_ms, until the next observation
        self._arrivals: deque[tuple[float, int]] = deque()  # (when, how many) in the last RATE_WINDOW_S
        self._in_window = 0
        self.choice = Choice(BatchPolicy(1, 0.0), 0.0, True)

    def observed(self, n: int, model_ms: float) -> None:
        """A batch of ``n`` items took ``model_ms`` on the model."""
        if n <= 0 or not math.isfinite(model_ms) or model_ms < 0:
            return
        old = self._cost.pop(n, None)  # and in again, last: the dict's order is the order last seen
        self._cost[n] = model_ms if old is None else old + self._alpha * (model_ms - old)
        self._fit = None
        if len(self._cost) > FITTED_SIZES:  # keep the sizes seen last
            self._cost.pop(next(iter(self._cost)))

    def arrived(self, items: int, now: float) -> None:
        """``items`` more arrived at ``now`` (seconds, monotonic)."""
        if items > 0:
            self._arrivals.append((now, items))
            self._in_window += items
        self._forget(now)

    def rate(self, now: float) -> float:
        """Items/s that arrived in the last ``RATE_WINDOW_S`` seconds (0 once nothing has for that long)."""
        self._forget(now)
        return self._in_window / RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= now - RATE_WINDOW_S:
            self._in_window -= arrivals.popleft()[1]

    def model_ms(self, n: int) -> float:
        """The fitted model time of a batch of ``n`` (0 before any batch was seen)."""
        if self._fit is None:
            self._fit = self._fitted()
        a, b, n0 = self._fit
        return a + b * n if n0 == 0 else a * max(1.0, n / n0)

    def _fitted(self) -> tuple[float, float, int]:
        """``(a, b, 0)``: ``t(n) = a + b n`` (Theil-Sen) over the sizes seen last; ``(t(n0), 0, n0)`` while one size
        ``n0`` was seen, or the times do not grow with the size (proportional above the largest); ``(0, 0, 0)``
        before any. Computed once per observation: a
        choice asks for ``t(n)`` at a dozen sizes before every batch."""
        sizes = sorted(self._cost)
        if not sizes:
            return 0.0, 0.0, 0
        if len(sizes) == 1:
            return self._cost[sizes[0]], 0.0, sizes[0]
        cost = self._cost
        # Theil-Sen: the median of the slopes between every two sizes, then the median intercept. A batch held up
        # by the scheduler (CI measured a batch of 33 at 123 ms on a 21 ms model, under load) moves a least-squares
        # line anywhere; it moves the medians little.
        slope = statistics.median((cost[m] - cost[n]) / (m - n) for i, n in enumerate(sizes) for m in sizes[i + 1:])
        if slope <= 0:
            # Times that do not grow with the batch are noise (a warm-up slowed by start-up beside one real batch),
            # not free items: a flat line would allow any batch at all. Proportional above the largest size seen
            # until the sizes say otherwise; each larger batch seen moves that anchor up.
            return self._cost[sizes[-1]], 0.0, sizes[-1]
        return max(0.0, statistics.median(cost[n] - slope * n for n in sizes)), slope, 0

    def choose(self, queued: int, now: float) -> Choice:
        """The policy for the next batch, with ``queued`` items waiting at ``now`` (see the class doc)."""
        budget, rate, t = self.budget_ms, self.rate(now) / 1000, self.model_ms  # rate: items per ms
        reachable = 2 * t(1) <= budget
        wait = 0.0
        limit = self._largest(lambda n: 2 * t(n) <= budget)  # the largest batch the target allows
        fixed = t(1) - (t(2) - t(1))  # a batch's cost whatever its size: what waiting for one more item saves
        if queued < limit and rate * fixed >= EXPECTED_ITEMS and rate * t(self.cap) <= LIGHT_LOAD * self.cap:
            # Light load, and another item is likely within a batch's fixed cost: wait for it up to that cost (what
            # running a batch without it would cost again: the ski-rental rule), within what the budget leaves.
            # Not with a full batch queued already (a burst): it would not wait, and the limit stays as it is.
            wait = max(0.0, min(fixed, budget - 2 * t(1)))
            limit = self._largest(lambda n: wait + 2 * t(n) <= budget)
        if rate > 0 and rate * t(limit) > UTILISATION * limit:
            # Batches that small cannot keep up with the load: the queue, and the latency with it, would grow
            # without bound. The smallest batch that keeps up; when none does, the one that serves the most per ms
            # of model time (all of cap for a model with a fixed cost per batch; no larger than the limit while the
            # fit is proportional, one size seen: larger batches would gain nothing by it and only wait longer).
            keeps_up = self._smallest(lambda n: rate * t(n) <= UTILISATION * n)
            if rate * t(keeps_up) > UTILISATION * keeps_up:
                keeps_up = min(range(limit, self.cap + 1), key=lambda n: (round(t(n) / n, 9), n))
            limit = max(limit, keeps_up)
        if (wait == 0.0 and queued > limit and self._per_item_known()
                and t(self.cap) / self.cap <= BACKLOG_GAIN * t(limit) / limit):
            # A backlog (the target is lost for some items already), and full batches drain it notably faster.
            limit = self.cap
        self.choice = Choice(BatchPolicy(limit, round(wait, 2)), t(limit), reachable)
        return self.choice

    def _per_item_known(self) -> bool:
        """Whether the fit has measured a cost per item (a line with a rising slope through three sizes or more),
        which the backlog rule compares: two sizes are one noisy batch away from any slope."""
        self.model_ms(1)
        assert self._fit is not None
        return len(self._cost) >= 3 and self._fit[1] > 0

    def _largest(self, fits: Callable[[int], bool]) -> int:
        """The largest n in [1, cap] that ``fits`` (fits is true up to some n, then false), at least 1."""
        lo, hi, best = 1, self.cap, 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def _smallest(self, fits: Callable[[int], bool]) -> int:
        """The smallest n in [1, cap] that ``fits`` (false up to some n, then true); cap if none does."""
        lo, hi, best = 1, self.cap, self.cap
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        return best
