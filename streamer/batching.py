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


class BatchQueue(Generic[T]):
    """An unbounded FIFO from which whole batches are taken under a :class:`BatchPolicy`.

    Bounding is the producer's job (the worker pauses fetching when ``len(queue)``
    is over its limit), so ``put`` never blocks.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._items: deque[T] = deque()
        self._head_since = 0.0  # loop time at which the current head item arrived
        self._arrived = asyncio.Event()
        self._shrunk = asyncio.Event()  # set whenever items leave the queue, by any way
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        if not self._items:
            self._head_since = asyncio.get_running_loop().time()
        self._items.append(item)
        self._arrived.set()

    def close(self) -> None:
        """Wake any waiter; ``next_batch`` then returns what is left, then empty lists."""
        self._closed = True
        self._arrived.set()
        self._shrunk.set()

    def drop(self, keep: Callable[[T], bool]) -> int:
        """Remove the items for which ``keep`` is false; returns how many were removed."""
        before = len(self._items)
        self._items = deque(i for i in self._items if keep(i))
        if len(self._items) < before:
            self._shrunk.set()
        return before - len(self._items)

    async def wait_for_room(self, limit: int) -> None:
        """Return once fewer than ``limit`` items are queued, or the queue is closed.

        Every way items leave (a batch taken, items dropped on a rebalance) wakes the waiter.
        """
        while len(self._items) >= limit and not self._closed:
            self._shrunk.clear()
            await self._shrunk.wait()

    async def next_batch(self) -> list[T]:
        """Wait for a first item, then until ``max_wait_ms`` after its arrival for the batch to fill."""
        while not self._items:
            if self._closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        size = self.policy.max_batch_size
        if len(self._items) < size and self.policy.max_wait_ms > 0 and not self._closed:
            loop = asyncio.get_running_loop()
            deadline = self._head_since + self.policy.max_wait_ms / 1000
            while len(self._items) < size and not self._closed:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
        n = min(size, len(self._items))
        batch = [self._items.popleft() for _ in range(n)]
        if n:
            self._shrunk.set()
        if self._items:
            # The new head has waited since at least now; it was already here.
            self._head_since = asyncio.get_running_loop().time()
        return batch
