"""Records that aiokafka's fast reader refuses, read all the same.

aiokafka's record reader decodes header keys as strict UTF-8; one record whose header key is
not UTF-8 (any client in any language can write one) makes ``getmany`` raise on every poll,
and the records fetched before it in the same response are skipped. :func:`install` wraps the
fetcher's ``MemoryRecords`` so that a batch whose fast reading fails that way is read again
from its bytes by aiokafka's own pure-Python reader, with bad bytes in header keys replaced by
U+FFFD. The record, its key, value and header values are delivered unchanged, so the worker can
answer it and dead-letter its original bytes. Batches that read cleanly take the fast path.

The wrapper is tied to aiokafka 0.14 (pinned in pyproject.toml); ``tests/test_wire_robustness.py``
produces such records on a real broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords, _MemoryRecordsPy

__all__ = ["install"]


class _Text(bytearray):
    """A slice of a record buffer whose ``decode`` replaces bad bytes instead of raising."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return super().decode(encoding, "replace")


class _LenientBuffer(bytearray):
    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        return _Text(value) if isinstance(key, slice) else value


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]
    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        buffer: bytearray = self._buffer  # type: ignore[has-type]
        if not isinstance(buffer, _LenientBuffer):
            self._buffer = _LenientBuffer(buffer)


class _Batch:
    """One batch: the fast reader's, falling back to the lenient one from the record it failed on."""

    __slots__ = ("_fast", "_index", "_owner")

    def __init__(self, fast: Any, owner: _Records, index: int) -> None:
        self._fast = fast
        self._owner = owner
        self._index = index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fast, name)

    def __iter__(self) -> Iterator[Any]:
        # The whole batch in C first (no Python step per record); only a batch the fast reader refuses is
        # read again, whole, by the lenient one.
        try:
            records = list(self._fast)
        except UnicodeDecodeError:
            records = list(self._owner.lenient_batch(self._index))
        return iter(records)

    def __next__(self) -> Any:  # control batches are read with next(batch)
        return next(self._fast)


class _Records:
    """``MemoryRecords`` over one fetch response, keeping its bytes for a lenient second reading."""

    __slots__ = ("_data", "_fast", "_next")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._fast = MemoryRecords(data)
        self._next = 0

    def size_in_bytes(self) -> int:
        return int(self._fast.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._fast.has_next())

    def next_batch(self) -> Any:
        batch = self._fast.next_batch()
        if batch is None or batch.magic < 2:
            return batch
        self._next += 1
        return _Batch(batch, self, self._next - 1)

    def lenient_batch(self, index: int) -> _LenientBatch:
        records = _MemoryRecordsPy(self._data)
        for _ in range(index):
            records.next_batch()
        raw = records._next_slice
        assert raw is not None
        return _LenientBatch(raw)


def install() -> None:
    """Make every consumer in this process read such records (idempotent)."""
    fetcher.MemoryRecords = _Records
