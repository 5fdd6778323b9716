"""The dynamic batching policy, and the one loop that applies it.

A batch closes when it holds ``max_batch_size`` items, or when ``max_wait_ms``
has passed since its first item arrived, whichever comes first.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchPolicy", "BatchQueue"]

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
