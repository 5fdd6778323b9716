"""The hot path's codec (schemas._fast) against the pydantic models, the reference: on every message,
valid or not, they agree (same values, or the same error and code), and the fast encoders write the
same bytes as the models' encoding."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    Codec,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    Limits,
    ReplyTo,
    StageMessage,
    StageTiming,
    Timings,
    WireError,
)
from schemas._fast import (
    FastReader,
    RequestWriter,
    ResultReader,
    ResultWriter,
    WireRequest,
    WireStage,
    WireTiming,
    _array_header,
)

INTS = st.integers(-(2**63), 2**64 - 1)
SMALL = Limits(max_depth=5, max_str_bytes=4096, max_container_len=16, max_message_bytes=30_000)
"""Limits as low as the fast reader is used under (schemas._fast.FAST_LIMITS), so that examples reach them."""

_scalars = st.one_of(st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=8), st.binary(max_size=8),
                     st.text(min_size=1000, max_size=1100))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.lists(st.none(), min_size=15, max_size=17),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=12)
_odd = st.one_of(_scalars, st.just([]), st.text(min_size=120, max_size=300),
                 st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)),
                 st.builds(lambda c, n: msgpack.ExtType(c, bytes(n)), st.integers(0, 3), st.integers(0, 40)))


def _maybe(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(s, _odd)


_reply = st.one_of(st.none(), st.fixed_dictionaries(
    {"topic": _maybe(st.text(min_size=1, max_size=12))},
    optional={"partition": _maybe(st.integers(-2, 2**31)), "extra": _scalars}))
_trail_entry = st.fixed_dictionaries({"stage": _maybe(st.text(max_size=5)), "worker": _maybe(st.text(max_size=5)),
                                 "queue_ms": _maybe(st.one_of(st.floats(min_value=0), st.integers(0, 9))),
                                 "batch_size": _maybe(st.integers(0, 64)),
                                 "inference_ms": _maybe(st.floats(min_value=0, max_value=1e6)),
                                 "done_ms": _maybe(st.integers(0, 2**41))})
_trails = st.one_of(st.lists(_trail_entry, max_size=2), st.lists(_trail_entry, min_size=15, max_size=17))
_common = {"key": _maybe(st.one_of(st.text(max_size=20), st.text(min_size=1000, max_size=1030))),
           "reply_to": _maybe(_reply),
           "deadline_ms": _maybe(st.integers(-1, 2**62)),
           "metadata": _maybe(st.dictionaries(st.text(max_size=70), _maybe(st.text(max_size=300)), max_size=3)),
           "unknown": _scalars}
_requests = st.fixed_dictionaries(
    {"id": _maybe(st.text(min_size=1, max_size=130)), "model": _maybe(st.text(min_size=1, max_size=8)),
     "inputs": _values},
    optional={**_common, "created_ms": _maybe(st.integers(0, 2**41))})
_stages = st.fixed_dictionaries(
    {"id": _maybe(st.text(min_size=1, max_size=130)), "model": _maybe(st.text(min_size=1, max_size=8)),
     "stage": _maybe(st.text(min_size=1, max_size=8)), "payload": _values,
     "created_ms": _maybe(st.integers(0, 2**41))},
    optional={**_common,
              "trail": _maybe(_trails)})


def _drop_some(d: dict[str, Any], drop: list[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in drop}


def _bytes(messages: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    fields = st.lists(st.sampled_from(["id", "model", "inputs", "payload", "stage", "created_ms"]), max_size=2)
    packed = st.builds(lambda m, drop: msgpack.packb(_drop_some(m, drop), use_bin_type=True, datetime=False),
                       messages, fields)
    return st.one_of(packed, packed.map(lambda b: b[: len(b) // 2]), st.binary(max_size=40))


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(x, float) and isinstance(y, float) and x != x:
        return y != y  # NaN
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return type(x) is type(y) and x == y


def _agree(fast_read: tuple[Any, Any], slow: Any, payload: str) -> None:
    fast, value = fast_read
    assert _same(value, getattr(slow, payload))
    for name in type(fast).__struct_fields__:
        if name == payload:
            continue
        a, b = getattr(fast, name), getattr(slow, name)
        if name == "created_ms" and payload == "inputs":
            continue  # absent: each reads the clock
        if name == "metadata":
            a, b = a or {}, b or {}
        elif name == "trail":
            a, b = [_timing(x) for x in a or []], [_timing(x) for x in b or []]
        elif name == "reply_to":
            a, b = (a and (a.topic, a.partition)), (b and (b.topic, b.partition))
        assert _same(a, b) or (isinstance(a, float) and a == b), (name, a, b)


def _timing(t: WireTiming) -> tuple[Any, ...]:
    return (t.stage, t.worker, float(t.queue_ms), t.batch_size, float(t.inference_ms), t.done_ms)


def _outcome(read: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", read(data)
    except WireError as exc:
        return "error", (type(exc), exc.code, str(exc), exc.request_id, exc.reply_to)


def _read_alike(kind: str, data: bytes) -> None:
    """The fast reader and the models read ``data`` alike: the same values, or the same error (class, code,
    message, request id and reply route, so the same error result and dead letter)."""
    codec = Codec(SMALL)
    assert FastReader(codec).enabled
    fast = _outcome(getattr(FastReader(codec), kind), data)
    slow = _outcome(codec.decode_request if kind == "request" else codec.decode_stage, data)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "error":
        assert fast[1] == slow[1]
    else:
        _agree(fast[1], slow[1], "inputs" if kind == "request" else "payload")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_bytes(_requests))
def test_requests_read_the_same_by_the_fast_reader_and_the_models(data: bytes) -> None:
    _read_alike("request", data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_bytes(_stages))
def test_stage_messages_read_the_same_by_the_fast_reader_and_the_models(data: bytes) -> None:
    _read_alike("stage", data)


def test_well_formed_messages_take_the_fast_path() -> None:
    """The models are the fallback, not the rule: a usual request and stage message are read by msgspec."""
    codec = Codec()
    reader = FastReader(codec)
    calls: list[str] = []
    codec.decode_request = lambda data: calls.append("request")  # type: ignore[method-assign,assignment,func-returns-value]
    codec.decode_stage = lambda data: calls.append("stage")  # type: ignore[method-assign,assignment,func-returns-value]
    tensor = np.arange(16, dtype=np.float32)
    req, inputs = reader.request(codec.pack({"id": "a", "model": "m", "inputs": tensor, "reply_to": {"topic": "r"},
                                     "key": "k", "metadata": {"x": 1}}))
    assert isinstance(req, WireRequest) and _same(inputs, tensor) and req.reply_to is not None
    st_msg, payload = reader.stage(codec.pack({"id": "a", "model": "m", "stage": "s", "payload": "text",
                                               "created_ms": 5,
                                      "trail": [{"stage": "t", "worker": "w", "queue_ms": 1.0, "batch_size": 2,
                                                 "inference_ms": 3.0, "done_ms": 4}]}))
    assert isinstance(st_msg, WireStage) and payload == "text" and len(st_msg.trail or []) == 1
    assert calls == []


_out = st.one_of(st.none(), INTS, st.floats(), st.text(max_size=20), st.lists(st.floats(), max_size=5),
                 st.builds(lambda n, seed: np.random.default_rng(seed).standard_normal(n).astype(np.float32),
                           st.integers(0, 8), st.integers(0, 9)),
                 st.dictionaries(st.text(max_size=4), INTS, max_size=3))
_trail = st.lists(st.builds(WireTiming, st.text(max_size=4), st.text(max_size=4), st.floats(0, 1e6),
                            st.integers(0, 64), st.floats(0, 1e6), st.integers(0, 2**41)), max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=128), _out,
                          st.tuples(st.floats(0, 1e6), st.integers(0, 64), st.floats(0, 1e6))), max_size=6),
       st.one_of(st.none(), st.just(True)), _trail)
def test_results_written_by_the_batch_are_the_bytes_of_the_model(items: list[Any], staged: Any,
                                                                 trail: list[WireTiming]) -> None:
    codec = Codec()
    writer = ResultWriter(codec, "m", "1+abc", "w-1")
    ids, outputs, timings = [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
    trails = [trail] * len(items) if staged else None
    got = writer.results(ids, outputs, timings, trails)
    for k, (rid, output, (q, n, inf)) in enumerate(items):
        value = got[k]
        assert isinstance(value, bytes)
        created = msgpack.unpackb(value, ext_hook=codec._ext_hook)["created_ms"]
        stages = [StageTiming(**{f: getattr(t, f) for f in t.__struct_fields__}) for t in trail] if staged else None
        want = codec.encode_result(InferenceResult(
            id=rid, model="m", model_version="1+abc", status="ok", outputs=output,
            timings=Timings(queue_ms=q, batch_size=n, inference_ms=inf), stages=stages, worker="w-1",
            created_ms=created))
        assert value == want


@settings(max_examples=200, deadline=None)
@given(_stages.filter(lambda m: True), _out, _trail)
def test_forwarded_stage_messages_are_the_bytes_of_the_model(raw: dict[str, Any], payload: Any,
                                                             trail: list[WireTiming]) -> None:
    codec = Codec()
    try:
        msg, _ = FastReader(codec).stage(msgpack.packb(raw, use_bin_type=True, datetime=False))
    except WireError:
        return
    got = ResultWriter(codec, "m", "1", "w").forward(msg, "next", payload, trail)
    slow = codec.decode_stage(msgpack.packb(raw, use_bin_type=True, datetime=False))
    want = codec.encode(slow.model_copy(update={
        "stage": "next", "payload": payload,
        "trail": [StageTiming(**{f: getattr(t, f) for f in t.__struct_fields__}) for t in trail]}))
    assert got == want
    assert isinstance(StageMessage.model_validate(msgpack.unpackb(got, ext_hook=codec._ext_hook)), StageMessage)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65_535, 65_536])
def test_array_headers_are_msgpacks(n: int) -> None:
    whole = msgpack.packb([None] * n)
    assert _array_header(n) == whole[: len(whole) - n]


# -- the client's side: results read, requests written ------------------------------------------------------
_error = st.fixed_dictionaries({"code": _maybe(st.sampled_from(["bad_input", "model_error", "nope"])),
                                "message": _maybe(st.text(max_size=10))},
                               optional={"stage": _maybe(st.text(max_size=4)), "extra": _scalars})
_timings = st.fixed_dictionaries({"queue_ms": _maybe(st.one_of(st.floats(), st.integers(-1, 9))),
                                  "batch_size": _maybe(st.integers(-1, 64)),
                                  "inference_ms": _maybe(st.floats(min_value=0, max_value=1e6))})
_results = st.fixed_dictionaries(
    {"id": _maybe(st.text(min_size=1, max_size=130)), "model": _maybe(st.text(max_size=8)),
     "status": _maybe(st.sampled_from(["ok", "error", "expired", "maybe"]))},
    optional={"model_version": _maybe(st.text(max_size=4)), "outputs": _values, "error": _maybe(_error),
              "timings": _maybe(_timings),
              "stages": _maybe(_trails),
              "worker": _maybe(st.text(max_size=4)), "created_ms": _maybe(st.integers(-1, 2**41)),
              "unknown": _scalars})


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_bytes(_results))
def test_results_read_the_same_by_the_client_reader_and_the_models(data: bytes) -> None:
    codec = Codec(SMALL)
    fast = _outcome(ResultReader(codec).result, data)
    slow = _outcome(codec.decode_result, data)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "error":
        assert fast[1] == slow[1]
        return
    a, b = fast[1].model_dump(), slow[1].model_dump()
    if "created_ms" not in msgpack.unpackb(data, strict_map_key=False, ext_hook=lambda c, d: None):
        a.pop("created_ms"), b.pop("created_ms")  # absent: each reads the clock
    assert _same(a, b), (a, b)


def test_usual_results_take_the_fast_path() -> None:
    codec = Codec()
    calls: list[bytes] = []
    codec.decode_result = lambda data: calls.append(data)  # type: ignore[method-assign,assignment,func-returns-value]
    reader = ResultReader(codec)
    ok = InferenceResult(id="r1", model="m", model_version="1", status="ok", outputs=np.arange(3, dtype=np.float32),
                         timings=Timings(queue_ms=1.0, batch_size=2, inference_ms=0.5), worker="w", created_ms=7)
    got = reader.result(Codec().encode_result(ok))
    assert got.id == "r1" and got.timings == ok.timings and _same(got.outputs, ok.outputs)
    bad = InferenceResult(id="r2", model="m", status="error", error=ErrorInfo(code="bad_input", message="no"),
                          created_ms=7)
    assert reader.result(Codec().encode_result(bad)) == bad
    staged = InferenceResult(id="r3", model="p", status="ok", outputs=[1, 2], created_ms=9, stages=[
        StageTiming(stage="a", worker="w", queue_ms=0, batch_size=1, inference_ms=2.5, done_ms=8)])
    got = reader.result(Codec().encode_result(staged))
    assert got == staged and type(got.stages[0].queue_ms) is float  # type: ignore[index]
    assert calls == []


_meta = st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.booleans(), INTS,
                                                                               st.floats(), st.text(max_size=6)),
                                              max_size=3),
                  st.just({"x": [1]}), st.just({1: "x"}))
_inputs = st.one_of(_values, _out, st.builds(lambda n: np.arange(n, dtype=">i4"), st.integers(0, 4)),
                    st.builds(lambda n: np.arange(2 * n, dtype=np.int64)[::2], st.integers(0, 4)),
                    st.just({1, 2}), st.just(StageTiming(stage="s", worker="w", queue_ms=1, batch_size=1,
                                                         inference_ms=1, done_ms=1)))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(rid=st.one_of(st.text(min_size=1, max_size=130), st.just(""), st.integers(0, 3)),
       model=st.one_of(st.text(max_size=8), st.text(min_size=250, max_size=260), st.none()), inputs=_inputs,
       key=st.one_of(st.none(), st.text(max_size=8), st.text(min_size=1020, max_size=1030), st.integers(0, 2)),
       reply=st.one_of(st.none(), st.builds(ReplyTo, topic=st.just("t.r"), partition=st.one_of(st.none(), st.just(3)))),
       deadline=st.one_of(st.none(), st.integers(-1, 2**62), st.just(True)), created=st.integers(0, 2**41),
       metadata=_meta)
def test_requests_written_by_the_client_are_the_bytes_of_the_model(rid: Any, model: Any, inputs: Any, key: Any,
                                                                   reply: Any, deadline: Any, created: int,
                                                                   metadata: Any) -> None:
    """The client's writer and the model write the same bytes, or raise the same error."""
    codec = Codec(Limits(max_message_bytes=2000))
    writer = RequestWriter(codec, reply)

    def fast() -> bytes:
        return writer.request(rid, model, inputs, key, deadline, created, metadata, writer.metadata(metadata))

    def slow() -> bytes:
        return codec.encode_request(InferenceRequest(id=rid, model=model, inputs=inputs, key=key, reply_to=reply,
                                                     deadline_ms=deadline, created_ms=created,
                                                     metadata=metadata or {}))

    outcomes = []
    for write in (fast, slow):
        try:
            outcomes.append(("ok", write()))
        except Exception as exc:  # noqa: BLE001 - the same exception, whatever it is
            outcomes.append(("error", type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def test_usual_requests_take_the_fast_path() -> None:
    codec = Codec()
    calls: list[Any] = []
    codec.encode_request = lambda request: calls.append(request)  # type: ignore[method-assign,assignment,func-returns-value]
    writer = RequestWriter(codec, ReplyTo(topic="r"))
    meta = writer.metadata({"tenant": "a", "n": 1})
    for inputs in (np.arange(16, dtype=np.float32), "some text", [1, 2, 3], {"ids": np.arange(4, dtype=np.int32)}):
        value = writer.request("id-1", "m", inputs, "k", 5, 6, {"tenant": "a", "n": 1}, meta)
        assert value == Codec().encode_request(InferenceRequest(id="id-1", model="m", inputs=inputs, key="k",
                                                                reply_to=ReplyTo(topic="r"), deadline_ms=5,
                                                                created_ms=6, metadata={"tenant": "a", "n": 1}))
    assert calls == []
