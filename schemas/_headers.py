"""Kafka record headers of the wire contract (WIRE.md, section 2): their names, and reading them safely.

Headers come from any client in any language: a value may be null (Kafka allows it) or not
UTF-8, a key may not be UTF-8 (the consumer reads it with U+FFFD in place of bad bytes), and
anything may be over a limit. Nothing here raises on what a record carries: a header that
cannot be used is treated as absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ._models import ReplyTo, valid_request_id, valid_topic_name

__all__ = [
    "CONTENT_TYPE_HEADER",
    "REPLY_PARTITION_HEADER",
    "REPLY_TOPIC_HEADER",
    "REQUEST_ID_HEADER",
    "SCHEMA_HEADER",
    "SCHEMA_VERSION",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "DeadLetterHeaders",
    "RoutingHeaders",
    "header_text",
]

SCHEMA_VERSION: Final = 1
SCHEMA_HEADER: Final = "streamer-schema"
CONTENT_TYPE_HEADER: Final = "content-type"
REQUEST_ID_HEADER: Final = "streamer-request-id"
REPLY_TOPIC_HEADER: Final = "streamer-reply-topic"
REPLY_PARTITION_HEADER: Final = "streamer-reply-partition"
TRACEPARENT_HEADER: Final = "traceparent"  # W3C Trace Context (streamer.tracing)
TRACESTATE_HEADER: Final = "tracestate"


class DeadLetterHeaders:
    """Headers a worker adds to a dead letter (WIRE.md, section 4), beside the original record's own."""

    ERROR_CODE: Final = "streamer-error-code"
    ERROR_MESSAGE: Final = "streamer-error-message"
    SOURCE_TOPIC: Final = "streamer-source-topic"
    SOURCE_PARTITION: Final = "streamer-source-partition"
    SOURCE_OFFSET: Final = "streamer-source-offset"
    WORKER: Final = "streamer-worker"
    TRUNCATED_FROM: Final = "streamer-truncated-from"
    KEY_TRUNCATED_FROM: Final = "streamer-key-truncated-from"
    HEADERS_DROPPED: Final = "streamer-headers-dropped"

Headers = Sequence[tuple[str, bytes | None]]
_BASE_HEADERS = ((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()), (CONTENT_TYPE_HEADER, b"application/msgpack"))


class Route(Protocol):
    """A reply route: a ``ReplyTo`` of the models, or the ``WireReply`` of the hot path's reader."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int | None: ...


def header_text(headers: Headers | None, name: str) -> str | None:
    """The first ``name`` header as UTF-8 text; None when absent, null or not UTF-8."""
    for key, value in headers or ():
        if key == name:
            if value is None:
                return None
            try:
                return bytes(value).decode()
            except UnicodeDecodeError:
                return None
    return None


@dataclass(frozen=True, slots=True)
class RoutingHeaders:
    """Routing facts a client copies into Kafka record headers, readable even from undecodable bytes."""

    request_id: str | None
    reply_to: Route | None

    def build(self) -> list[tuple[str, bytes]]:
        """Kafka headers for a request or stage message: the schema version and the routing facts."""
        headers = [*_BASE_HEADERS]
        if self.request_id is not None:
            headers.append((REQUEST_ID_HEADER, self.request_id.encode()))
        if self.reply_to is not None:
            headers.append((REPLY_TOPIC_HEADER, self.reply_to.topic.encode()))
            if self.reply_to.partition is not None:
                headers.append((REPLY_PARTITION_HEADER, str(self.reply_to.partition).encode()))
        return headers

    @staticmethod
    def for_route(reply_to: Route | None) -> Callable[[str], list[tuple[str, bytes]]]:
        """``lambda rid: RoutingHeaders(rid, reply_to).build()``, with what does not change packed once: the
        headers of a client's requests, which all carry its reply route."""
        fixed = RoutingHeaders(None, reply_to).build()
        head, tail = fixed[:len(_BASE_HEADERS)], fixed[len(_BASE_HEADERS):]
        return lambda rid: [*head, (REQUEST_ID_HEADER, rid.encode()), *tail]

    @classmethod
    def parse(cls, headers: Headers | None) -> RoutingHeaders:
        """What the headers say; a request id or route that is unusable (too long, not UTF-8, not a legal
        topic, a partition that is not a decimal number) is read as absent. Never raises."""
        rid = header_text(headers, REQUEST_ID_HEADER)
        topic = header_text(headers, REPLY_TOPIC_HEADER)
        part = header_text(headers, REPLY_PARTITION_HEADER)
        reply = None
        if valid_topic_name(topic):
            assert topic is not None
            if part is None or (part.isascii() and part.isdigit() and len(part) <= 9):
                reply = ReplyTo(topic=topic, partition=int(part) if part is not None else None)
        return cls(rid if valid_request_id(rid) else None, reply)
