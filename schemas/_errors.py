"""The root of streamer's errors, and the errors raised while reading or writing wire messages.

The root lives here, in the bottom layer, so that every error streamer raises on purpose, wire errors included,
is one family (``streamer.errors`` builds the rest on it).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DecodeError", "ErrorCode", "LimitExceeded", "SchemaError", "StreamerError", "WireError"]

# The wire's error codes (WIRE.md, "Error codes"), defined once: every place that sets one is typed with it.
ErrorCode = Literal[
    "decode_error",  # the bytes are not a valid message (msgpack, UTF-8, limits)
    "schema_error",  # valid msgpack, but not a valid request
    "unknown_model",  # no worker model by that name on this topic
    "bad_input",  # the model rejected this item's inputs (dtype, shape, NaN, ...)
    "model_error",  # the model raised while running
    "deadline_exceeded",  # the deadline passed before inference (status "expired")
    "bad_route",  # the reply route is not allowed, not a legal topic, or does not exist (dead letter only)
    "undeliverable",  # the cluster refused the record (too large, topic gone); the dead letter says why
    "internal_error",
]


class StreamerError(Exception):
    """Base of every error streamer raises on purpose. ``streamer.errors.FatalError`` and its subclasses: this
    process cannot go on; every other one: one request or one call failed, and the process goes on."""


class WireError(StreamerError, ValueError):
    """A message could not be decoded or validated (one record: recoverable). ``code`` is the wire error code.
    Also a ``ValueError``, as invalid data is."""

    code: ErrorCode = "decode_error"

    def __init__(self, message: str, *, request_id: str | None = None, reply_to: object = None) -> None:
        super().__init__(message)
        # What could still be read from a bad message, so the requester can get an error result.
        self.request_id = request_id
        self.reply_to = reply_to


class DecodeError(WireError):
    """The bytes are not valid msgpack, valid UTF-8, or use a forbidden construct."""


class LimitExceeded(DecodeError):
    """A message, tensor or nesting depth is over the configured limit."""


class SchemaError(WireError):
    """Valid msgpack that does not match the request or result schema."""

    code: ErrorCode = "schema_error"
