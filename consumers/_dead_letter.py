"""Dead-letter records: the original bytes, with the error and the origin in headers.

A dead letter always fits in ``max_bytes`` (the largest record the worker writes): when the
original record does not, its value (and, if it must, its key and headers) is cut, and headers
say so, with the original sizes. Such a record is still written, never refused.
"""

from __future__ import annotations

from typing import Any

from schemas import DeadLetterHeaders

from ._batch import DeadLetter

__all__ = ["dead_letter_record"]

_OVERHEAD = 512  # the record's own framing and the headers added below, generously


def _size(headers: list[tuple[str, bytes | None]]) -> int:
    return sum(len(k.encode()) + len(v or b"") + 8 for k, v in headers)


def dead_letter_record(
    record: Any, dl: DeadLetter, worker: str, max_bytes: int
) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
    """Key, value and headers of the dead letter for ``record`` (as consumed), at most ``max_bytes`` in all."""
    h = DeadLetterHeaders
    own: dict[str, bytes] = {
        h.ERROR_CODE: dl.code.encode(),
        h.ERROR_MESSAGE: dl.message.encode("utf-8", "replace")[:4096],
        h.SOURCE_TOPIC: record.topic.encode(),
        h.SOURCE_PARTITION: str(record.partition).encode(),
        h.SOURCE_OFFSET: str(record.offset).encode(),
        h.WORKER: worker.encode(),
    }
    kept: list[tuple[str, bytes | None]] = [(k, v) for k, v in record.headers or () if k not in own]
    key, value = record.key, record.value or b""
    quarter = max_bytes // 4
    if _size(kept) > quarter:
        own[h.HEADERS_DROPPED] = str(len(kept)).encode()
        kept = []
    if key is not None and len(key) > quarter:
        own[h.KEY_TRUNCATED_FROM] = str(len(key)).encode()
        key = key[:quarter]
    room = max_bytes - _OVERHEAD - len(key or b"") - _size(kept) - _size(list(own.items()))
    if len(value) > room:
        own[h.TRUNCATED_FROM] = str(len(value)).encode()
        value = value[:max(0, room)]
    return key, value, kept + list(own.items())
