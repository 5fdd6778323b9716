"""One family of errors: everything streamer raises on purpose, wire errors included, is a StreamerError, and a
fatal error (this process cannot go on) is told apart from a recoverable one (one request failed)."""

from __future__ import annotations

import inspect

import pytest

import consumers
import producers
import schemas
import streamer
import streamer.errors
from schemas import Codec, DecodeError, LimitExceeded, SchemaError, StreamerError, WireError
from streamer.errors import BadInput, ConfigError, FatalError, InferenceTimeout


def test_every_error_the_packages_export_is_one_family() -> None:
    exported = {obj for module in (schemas, streamer, streamer.errors, producers, consumers)
                for name in getattr(module, "__all__", ()) if inspect.isclass(obj := getattr(module, name))
                and issubclass(obj, BaseException)}
    assert {WireError, DecodeError, LimitExceeded, SchemaError, ConfigError, BadInput} <= exported
    assert all(issubclass(e, StreamerError) for e in exported), [e for e in exported if not
                                                                 issubclass(e, StreamerError)]
    assert streamer.StreamerError is schemas.StreamerError is streamer.errors.StreamerError


def test_recoverable_and_fatal_are_told_apart() -> None:
    # A bad record is one request's failure: recoverable, and still the ValueError that invalid data is.
    for recoverable in (WireError, DecodeError, LimitExceeded, SchemaError, BadInput, InferenceTimeout):
        assert not issubclass(recoverable, FatalError), recoverable
    assert issubclass(WireError, ValueError) and issubclass(InferenceTimeout, TimeoutError)
    assert issubclass(ConfigError, FatalError)
    with pytest.raises(StreamerError) as caught:
        Codec().decode_request(b"\xc1")  # msgpack's never-used byte
    assert isinstance(caught.value, DecodeError) and caught.value.code == "decode_error"

