"""Producer-side load balancing: which partition a record goes to when none is given.

Each partitioner is an aiokafka partitioner: ``(key: bytes | None, all_partitions, available) -> int``.

- ``murmur2`` (default): keyed records go to ``toPositive(murmur2(key)) % partitions``, exactly
  as the Java client's default partitioner (and librdkafka's ``murmur2_random``) places them, so
  clients in different languages agree on a key's partition; keyless records go round-robin.
- ``round-robin``: every record to the next partition in turn, keys ignored (no per-key order).
- ``random``: every record to a uniformly random partition, keys ignored (no per-key order).
- ``sticky``: keyed records as ``murmur2``; keyless records stick to one partition for
  ``STICKY_RECORDS`` records, then move on: fewer, fuller produce batches (Java's KIP-480 idea).

Keyless records prefer partitions that have a leader; keyed records never move, as moving one
would break its order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Literal

from aiokafka.partitioner import murmur2

__all__ = ["PARTITIONERS", "STICKY_RECORDS", "PartitionerName", "make_partitioner", "murmur2_partition"]

PartitionerName = Literal["murmur2", "round-robin", "random", "sticky"]
Partitioner = Callable[[bytes | None, Sequence[int], Sequence[int]], int]

STICKY_RECORDS = 512
"""Keyless records a sticky partitioner sends to one partition before it moves on."""


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The Java client's partition for ``key``: ``Utils.toPositive(Utils.murmur2(key)) % partitions``."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def _choices(all_partitions: Sequence[int], available: Sequence[int]) -> list[int]:
    return sorted(available or all_partitions)


class _Murmur2:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is not None:
            return sorted(all_partitions)[murmur2_partition(key, len(all_partitions))]
        return self._keyless(_choices(all_partitions, available))

    def _keyless(self, choices: list[int]) -> int:
        return choices[next(self._turn) % len(choices)]


class _RoundRobin(_Murmur2):
    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        return self._keyless(_choices(all_partitions, available))


class _Random:
    def __init__(self) -> None:
        self._rng = random.Random()

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        return self._rng.choice(_choices(all_partitions, available))


class _Sticky(_Murmur2):
    def __init__(self, records: int = STICKY_RECORDS) -> None:
        super().__init__()
        self._records = records
        self._rng = random.Random()
        self._current: int | None = None
        self._left = 0

    def _keyless(self, choices: list[int]) -> int:
        if self._current not in choices or self._left <= 0:
            others = [p for p in choices if p != self._current] or choices
            self._current = self._rng.choice(others)
            self._left = self._records
        self._left -= 1
        assert self._current is not None
        return self._current


PARTITIONERS: dict[str, Callable[[], Partitioner]] = {
    "murmur2": _Murmur2,
    "round-robin": _RoundRobin,
    "random": _Random,
    "sticky": _Sticky,
}


def make_partitioner(name: str) -> Partitioner:
    """A fresh partitioner (each producer keeps its own round-robin or sticky state)."""
    try:
        return PARTITIONERS[name]()
    except KeyError:
        raise ValueError(f"unknown partitioner {name!r}; choose from {', '.join(PARTITIONERS)}") from None
