"""The dynamic batching policy, the one loop that applies it, and batching to a latency target.

A batch closes when it holds ``max_batch_size`` items, or when ``max_wait_ms``
has passed since its first item arrived, whichever comes first. With a latency target
(:class:`LatencyTarget`) the worker chooses both while it runs.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchPolicy", "BatchQueue", "Choice", "LatencyTarget"]

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

    def put(self, key: K, items: list[T]) -> None:
        if not items:
            return
        if not self._runs:
            self._head_since = asyncio.get_running_loop().time()
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
    (:meth:`arrived`). The model's time per batch is fitted as ``a + b * n`` (least squares over the sizes
    seen, each an average of its recent batches; one size seen: proportional to the size above it, which
    overestimates what batching gains, so the choice errs on the small side until larger batches are seen).

    With a budget of ``headroom * target_ms`` (0.8: room for the tail), an item may wait for the batch
    ahead of it on the model, then for its own: the batch limit is the largest ``n`` (up to ``cap``) with
    ``2 * t(n)`` within the budget. While the model is lightly loaded (less than half busy at that batch size)
    a batch does not wait to fill: batches form by themselves while the model runs. Under more load, a batch
    waits for the time it takes to fill, at most what the budget leaves. When more is queued than the limit
    (a backlog: the target is lost for those items already), the batch limit is ``cap``: the largest batches
    drain a backlog soonest.
    """

    def __init__(self, target_ms: float, cap: int, headroom: float = 0.8, alpha: float = 0.2) -> None:
        self.target_ms = target_ms
        self.cap = cap
        self.budget_ms = headroom * target_ms
        self._alpha = alpha
        self._cost: dict[int, float] = {}  # batch size -> moving mean of its model ms
        self._rate = 0.0  # items/s arriving (moving mean)
        self._counted = 0
        self._since: float | None = None
        self.choice = Choice(BatchPolicy(1, 0.0), 0.0, True)

    def observed(self, n: int, model_ms: float) -> None:
        """A batch of ``n`` items took ``model_ms`` on the model."""
        if n <= 0 or not math.isfinite(model_ms) or model_ms < 0:
            return
        old = self._cost.get(n)
        self._cost[n] = model_ms if old is None else old + self._alpha * (model_ms - old)
        if len(self._cost) > 64:  # keep the sizes seen last
            self._cost.pop(next(iter(self._cost)))

    def arrived(self, items: int, now: float) -> None:
        """``items`` more arrived (at ``now``, seconds): the arrival rate, averaged over windows of 0.5 s."""
        if self._since is None:
            self._since = now
        self._counted += items
        span = now - self._since
        if span >= 0.5:
            rate = self._counted / span
            self._rate = rate if self._rate == 0 else self._rate + 0.5 * (rate - self._rate)
            self._counted, self._since = 0, now

    @property
    def rate(self) -> float:
        return self._rate

    def model_ms(self, n: int) -> float:
        """The fitted model time of a batch of ``n`` (0 before any batch was seen)."""
        sizes = sorted(self._cost)
        if not sizes:
            return 0.0
        if len(sizes) == 1:
            n0 = sizes[0]
            return self._cost[n0] * max(1.0, n / n0)
        mean_n = sum(sizes) / len(sizes)
        mean_t = sum(self._cost[s] for s in sizes) / len(sizes)
        var = sum((s - mean_n) ** 2 for s in sizes)
        slope = max(0.0, sum((s - mean_n) * (self._cost[s] - mean_t) for s in sizes) / var)
        intercept = max(0.0, mean_t - slope * mean_n)
        return intercept + slope * n

    def choose(self, queued: int) -> Choice:
        """The policy for the next batch, with ``queued`` items waiting now."""
        limit, reachable = 1, 2 * self.model_ms(1) <= self.budget_ms
        lo, hi = 1, self.cap  # the largest n with 2 t(n) within the budget (t grows with n)
        while lo <= hi:
            mid = (lo + hi) // 2
            if 2 * self.model_ms(mid) <= self.budget_ms:
                limit, lo = mid, mid + 1
            else:
                hi = mid - 1
        t = self.model_ms(limit)
        wait = 0.0
        busy = self._rate * t / limit / 1000 if limit else 0.0  # the model's share of time at this batch size
        if busy >= 0.5 and self._rate > 0:
            wait = max(0.0, min(self.budget_ms - 2 * t, 1000 * (limit - 1) / self._rate))
        if queued > limit:
            limit = self.cap
        self.choice = Choice(BatchPolicy(limit, round(wait, 2)), self.model_ms(limit), reachable)
        return self.choice
