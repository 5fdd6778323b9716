"""Dead-letter records: the original bytes, with the error and the origin in headers."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from ._items import DeadLetter, Item

__all__ = ["dead_letter_headers", "send_dead_letter"]


def dead_letter_headers(item: Item, dl: DeadLetter, worker: str) -> list[tuple[str, bytes]]:
    own = {
        "streamer-error-code": dl.code.encode(),
        "streamer-error-message": dl.message.encode("utf-8", "replace")[:4096],
        "streamer-source-topic": item.tp.topic.encode(),
        "streamer-source-partition": str(item.tp.partition).encode(),
        "streamer-source-offset": str(item.offset).encode(),
        "streamer-worker": worker.encode(),
    }
    kept = [(k, v) for k, v in item.headers if k not in own]
    return kept + list(own.items())


async def send_dead_letter(
    producer: AIOKafkaProducer, topic: str, item: Item, dl: DeadLetter, worker: str
) -> object:
    """Enqueue the dead letter; returns the delivery future."""
    return await producer.send(topic, item.value, key=item.key, headers=dead_letter_headers(item, dl, worker))
