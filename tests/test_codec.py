"""The wire codec: round trips (hypothesis), zero-copy tensors, limits and hostile bytes."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import (
    DTYPES,
    Codec,
    DecodeError,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    LimitExceeded,
    Limits,
    ReplyTo,
    RoutingHeaders,
    SchemaError,
    StageTiming,
    Timings,
)

codec = Codec()

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
arrays = st.sampled_from(list(DTYPES.values())).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)


def _same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


@settings(max_examples=200, deadline=None)
@given(inputs=json_like | arrays, key=st.none() | st.text(max_size=30))
def test_request_round_trip(inputs: Any, key: str | None) -> None:
    req = InferenceRequest(id="r1", model="m", inputs=inputs, key=key, reply_to=ReplyTo(topic="t", partition=2),
                           deadline_ms=5, metadata={"a": 1, "b": "x"})
    back = codec.decode_request(codec.encode_request(req))
    assert back.model_dump(exclude={"inputs"}) == req.model_dump(exclude={"inputs"})
    _same(inputs, back.inputs)


@settings(max_examples=100, deadline=None)
@given(outputs=st.lists(arrays, max_size=3))
def test_result_round_trip(outputs: list[Any]) -> None:
    res = InferenceResult(id="r", model="m", status="ok", outputs=outputs)
    _same(outputs, codec.decode_result(codec.encode_result(res)).outputs)


def test_tensor_is_a_zero_copy_view() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = codec.pack({"x": arr})
    out = codec.unpack(data)["x"]
    assert out.base is not None and not out.flags.owndata and not out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_tensor_layout_matches_wire_md() -> None:
    """The byte layout WIRE.md documents, written by hand."""
    arr = np.array([[1, 2, 3]], dtype=np.int32)
    ext = msgpack.unpackb(codec.pack(arr), ext_hook=lambda code, data: (code, data))
    code, data = ext
    assert code == 1
    assert data == struct.pack("<BB6xQQ", 7, 2, 1, 3) + struct.pack("<3i", 1, 2, 3)


def test_big_endian_and_non_contiguous_arrays_are_normalised() -> None:
    arr = np.arange(6, dtype=">f8").reshape(2, 3).T
    out = codec.unpack(codec.pack(arr))
    assert out.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("bad", [np.array(["a"]), np.array([1 + 2j]), np.zeros((1,) * 9, np.float32)])
def test_unsupported_tensors_are_refused_on_encode(bad: np.ndarray[Any, Any]) -> None:
    with pytest.raises(TypeError):
        codec.pack(bad)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"\x91" * 10_000 + b"\x90", LimitExceeded, "nesting"),
        (b"\xdd\x3b\x9a\xca\x00", DecodeError, "max_array_len"),
        (b"\xc6\x3b\x9a\xca\x00", DecodeError, "invalid msgpack"),
        (b"\xa2\xff\xfe", DecodeError, "UTF-8"),
        (b"\x81\x01\x02", DecodeError, "map key"),
        (b"\xc1", DecodeError, "msgpack object: a reserved or invalid type byte"),
        (b"\x01\x02", DecodeError, "single"),
        (b"", DecodeError, "msgpack"),
        (b"\xd4\x07\x00", DecodeError, "ext type 7"),
        (msgpack.packb(msgpack.ExtType(1, struct.pack("<BB6x", 99, 0))), DecodeError, "dtype code 99"),
        (msgpack.packb(msgpack.ExtType(1, struct.pack("<BB6xQ", 11, 1, 10**12))), LimitExceeded, "elements"),
        (msgpack.packb(msgpack.ExtType(1, struct.pack("<BB6xQ", 11, 1, 4) + b"\x00" * 3)), DecodeError, "needs 16"),
        (msgpack.packb(msgpack.ExtType(1, b"\x0b")), DecodeError, "truncated"),
    ],
)
def test_hostile_bytes_raise_clear_errors(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as raised:
        codec.unpack(data)
    # The reason is always said: msgpack's FormatError for a reserved byte has an empty message (issue 13).
    assert not str(raised.value).rstrip().endswith(":"), str(raised.value)


def test_message_size_limit() -> None:
    small = Codec(Limits(max_message_bytes=1024))
    with pytest.raises(LimitExceeded, match="1024-byte limit"):
        small.unpack(b"\xc4\xff" + bytes(2000))
    with pytest.raises(LimitExceeded):
        small.pack({"x": bytes(2000)})


def test_depth_limit_is_configurable() -> None:
    nested: Any = [1]
    for _ in range(9):
        nested = [nested]
    assert Codec(Limits(max_depth=10)).unpack(msgpack.packb(nested)) == nested
    with pytest.raises(LimitExceeded, match="deeper than 9"):
        Codec(Limits(max_depth=9)).unpack(msgpack.packb(nested))


def test_schema_errors_keep_what_can_route_a_reply() -> None:
    data = msgpack.packb({"id": "abc", "reply_to": {"topic": "r", "partition": 1}, "inputs": 1})
    with pytest.raises(SchemaError, match="model") as info:
        codec.decode_request(data)
    assert info.value.request_id == "abc"
    assert info.value.reply_to == ReplyTo(topic="r", partition=1)
    with pytest.raises(SchemaError, match="must be a msgpack map"):
        codec.decode_request(msgpack.packb([1, 2]))
    # Unknown fields are ignored (forward compatibility within one schema version).
    assert codec.decode_request(msgpack.packb({"id": "a", "model": "m", "inputs": 1, "surprise": 1})).id == "a"
    with pytest.raises(SchemaError, match="id: String should have at least 1 character"):
        codec.decode_request(msgpack.packb({"id": "", "model": "m", "inputs": 1}))


def test_routing_headers() -> None:
    r = RoutingHeaders.parse([("streamer-request-id", b"x"), ("streamer-reply-topic", b"t"),
                              ("streamer-reply-partition", b"3")])
    assert r.request_id == "x" and r.reply_to == ReplyTo(topic="t", partition=3)
    assert RoutingHeaders.parse([("streamer-reply-partition", b"nope"), ("streamer-reply-topic", b"t")]) == \
        RoutingHeaders(None, None)
    assert RoutingHeaders.parse(None) == RoutingHeaders(None, None)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


# -- what WIRE.md says of odd but well-formed msgpack, and of headers (issue: no record stops a worker) --
def _tensor(head: bytes, data: bytes) -> bytes:
    return msgpack.packb({"id": "t", "model": "m", "inputs": msgpack.ExtType(1, head + data)})


@pytest.mark.parametrize(("data", "match"), [
    (_tensor(bytes([11, 1, 0, 0, 0, 0, 0, 1]) + struct.pack("<Q", 1), b"\0\0\0\0"), "bytes 2-7 must be zero"),
    (msgpack.packb({b"id": "x"}, use_bin_type=True), "map key is bytes"),
    (msgpack.packb({"id": "x", "inputs": {b"k": 1}}, use_bin_type=True), "map key is bytes"),
    (msgpack.packb({"id": "x", "inputs": msgpack.Timestamp(1, 0)}, datetime=False), "ext type -1"),
    (msgpack.packb(msgpack.Timestamp(1, 0)), "ext type -1"),
    (b"\xc1", "reserved or invalid type byte"),
])
def test_forbidden_constructs_are_decode_errors(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        codec.decode_request(data)


@pytest.mark.parametrize("value", [1, "text", [1, 2], None])
def test_a_top_level_value_that_is_not_a_map_is_a_schema_error(value: Any) -> None:
    with pytest.raises(SchemaError, match="must be a msgpack map"):
        codec.decode_request(msgpack.packb(value))


def test_nil_optional_keys_mean_their_defaults() -> None:
    req = codec.decode_request(msgpack.packb({"id": "a", "model": "m", "inputs": None, "created_ms": None,
                                              "metadata": None, "reply_to": None, "deadline_ms": None}))
    assert req.metadata == {} and req.created_ms > 0 and req.reply_to is None


def test_reply_partition_must_be_an_int() -> None:
    with pytest.raises(SchemaError, match="partition"):
        codec.decode_request(msgpack.packb({"id": "a", "model": "m", "inputs": None,
                                            "reply_to": {"topic": "t", "partition": "5"}}))


def test_an_id_too_long_to_answer_is_not_offered_for_the_error_result() -> None:
    with pytest.raises(SchemaError) as info:
        codec.decode_request(msgpack.packb({"id": "x" * 129, "model": "m", "inputs": None}))
    assert info.value.request_id is None


@given(st.lists(st.tuples(st.text(max_size=30), st.one_of(st.none(), st.binary(max_size=300))), max_size=8))
def test_routing_headers_never_raise(headers: list[tuple[str, bytes | None]]) -> None:
    parsed = RoutingHeaders.parse(headers)
    assert parsed.request_id is None or 0 < len(parsed.request_id) <= 128


@pytest.mark.parametrize(("headers", "rid", "topic", "partition"), [
    ([("streamer-request-id", None), ("streamer-reply-topic", None)], None, None, None),
    ([("streamer-request-id", b"\xff\xfe"), ("streamer-reply-topic", b"\xff")], None, None, None),
    ([("streamer-request-id", b"x" * 129)], None, None, None),
    ([("streamer-request-id", b"ok"), ("streamer-reply-topic", b"bad topic!")], "ok", None, None),
    ([("streamer-reply-topic", b"t"), ("streamer-reply-partition", b"-1")], None, None, None),
    ([("streamer-reply-topic", b"t"), ("streamer-reply-partition", b"\xd9\xa3")], None, None, None),  # Arabic 3
    ([("streamer-reply-topic", b"t"), ("streamer-reply-partition", b"3")], None, "t", 3),
])
def test_unusable_routing_headers_read_as_absent(
    headers: list[tuple[str, bytes | None]], rid: str | None, topic: str | None, partition: int | None
) -> None:
    parsed = RoutingHeaders.parse(headers)
    assert parsed.request_id == rid
    assert (parsed.reply_to.topic if parsed.reply_to else None) == topic
    assert (parsed.reply_to.partition if parsed.reply_to else None) == partition


results = st.builds(
    InferenceResult,
    id=st.text(min_size=1, max_size=20), model=st.text(min_size=1, max_size=10), model_version=st.text(max_size=5),
    status=st.sampled_from(["ok", "error", "expired"]), outputs=st.one_of(json_like, arrays),
    error=st.one_of(st.none(), st.builds(ErrorInfo, code=st.sampled_from(["bad_input", "model_error"]),
                                         message=st.text(max_size=20),
                                         stage=st.one_of(st.none(), st.text(max_size=5)))),
    timings=st.one_of(st.none(), st.builds(Timings, queue_ms=st.floats(0, 1e6), batch_size=st.integers(0, 4096),
                                           inference_ms=st.floats(0, 1e6))),
    stages=st.one_of(st.none(), st.lists(st.builds(
        StageTiming, stage=st.text(max_size=5), worker=st.text(max_size=5), queue_ms=st.floats(0, 1e3),
        batch_size=st.integers(0, 64), inference_ms=st.floats(0, 1e3), done_ms=st.integers(0, 2**40)), max_size=3)),
    worker=st.text(max_size=8), created_ms=st.integers(0, 2**42),
)


@settings(max_examples=300, deadline=None)
@given(results)
def test_the_fast_result_encoder_writes_the_bytes_of_the_model_dump(result: InferenceResult) -> None:
    assert codec.encode_result(result) == codec.encode(result)
