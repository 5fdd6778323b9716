"""Dead-letter records: the original bytes, with the error and the origin in headers.

A dead letter always fits in ``max_bytes`` (the largest record the worker writes): when the
original record does not, its value (and, if it must, its key and headers) is cut, and headers
say so, with the original sizes. Such a record is still written, never refused.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from ._items import DeadLetter, Item

__all__ = ["dead_letter_record", "send_dead_letter"]

_OVERHEAD = 512  # the record's own framing and the headers added below, generously


def _size(headers: list[tuple[str, bytes | None]]) -> int:
    return sum(len(k.encode()) + len(v or b"") + 8 for k, v in headers)


def dead_letter_record(
    item: Item, dl: DeadLetter, worker: str, max_bytes: int
) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
    """Key, value and headers of the dead letter for ``item``, at most ``max_bytes`` in all."""
    own: dict[str, bytes] = {
        "streamer-error-code": dl.code.encode(),
        "streamer-error-message": dl.message.encode("utf-8", "replace")[:4096],
        "streamer-source-topic": item.tp.topic.encode(),
        "streamer-source-partition": str(item.tp.partition).encode(),
        "streamer-source-offset": str(item.offset).encode(),
        "streamer-worker": worker.encode(),
    }
    kept: list[tuple[str, bytes | None]] = [(k, v) for k, v in item.headers if k not in own]
    key, value = item.key, item.value
    quarter = max_bytes // 4
    if _size(kept) > quarter:
        own["streamer-headers-dropped"] = str(len(kept)).encode()
        kept = []
    if key is not None and len(key) > quarter:
        own["streamer-key-truncated-from"] = str(len(key)).encode()
        key = key[:quarter]
    room = max_bytes - _OVERHEAD - len(key or b"") - _size(kept) - _size(list(own.items()))
    if len(value) > room:
        own["streamer-truncated-from"] = str(len(value)).encode()
        value = value[:max(0, room)]
    return key, value, kept + list(own.items())


async def send_dead_letter(
    producer: AIOKafkaProducer, topic: str, item: Item, dl: DeadLetter, worker: str, max_bytes: int
) -> object:
    """Enqueue the dead letter; returns the delivery future."""
    key, value, headers = dead_letter_record(item, dl, worker, max_bytes)
    return await producer.send(topic, value, key=key, headers=headers)
