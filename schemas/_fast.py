"""The hot path's codec: requests and stage messages decoded without a pydantic model, results and
stage messages encoded from precomputed bytes (the worker's side); requests encoded the same way and
results read with msgspec's help (the client's side). The same wire format as the models in ``_models``.

Decoding: ``msgspec`` reads the message envelope (ids, names, route, times) into a Struct in C, with
the model's constraints; ``inputs``/``payload`` are kept as raw msgpack and read by :meth:`Codec.unpack`
with every limit. The fast reader accepts only messages whose shape is unambiguous (no unknown fields,
exact types, short metadata); everything else is decided by the pydantic models, which remain the
reference. So the two always agree: what the fast reader accepts, the models accept with the same
values (``tests/test_fast_codec.py`` checks it with hypothesis), and every error comes from the models.

Encoding: an ``ok`` result is the same bytes as ``Codec.encode_result`` of the equivalent
:class:`InferenceResult`, built from the parts that are the same for the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args

import msgpack
import msgspec
import numpy as np

from ._codec import _CODES, Codec, _encode_tensor
from ._errors import WireError
from ._models import (
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    ReplyTo,
    now_ms,
    valid_request_id,
)

__all__ = ["FastReader", "RequestWriter", "ResultReader", "ResultWriter", "WireRequest", "WireStage", "WireTiming"]

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Key = Annotated[str, msgspec.Meta(max_length=1024)]
_Ms = Annotated[int, msgspec.Meta(ge=0)]
_NonNeg = Annotated[float, msgspec.Meta(ge=0)]
# What the fast path takes is kept within the codec's limits whatever they are set to (see FAST_LIMITS):
# metadata of a few short entries, a short trail. Anything larger goes to the models, which apply the limits.
_MetaStr = Annotated[str, msgspec.Meta(max_length=256)]
_Metadata = Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)], _MetaStr | int | float | bool | None],
                      msgspec.Meta(max_length=16)]
FAST_LIMITS = {"max_str_bytes": 4 * 1024, "max_container_len": 16, "max_depth": 3}
"""The fast reader is used only under limits at least these (the envelope's longest string, a request's
``key``, is 1,024 characters, at most 4 KiB; its deepest part, a trail's entry, is at depth 3)."""


class WireReply(msgspec.Struct, forbid_unknown_fields=True):
    topic: _Name
    partition: _Ms | None = None


class WireRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A client request's envelope as the worker reads it; the inputs are read apart (see :class:`FastReader`)."""

    id: _Id
    model: _Name
    inputs: msgspec.Raw
    key: _Key | None = None
    reply_to: WireReply | None = None
    deadline_ms: _Ms | None = None
    created_ms: _Ms | None = None
    metadata: _Metadata | None = None


class WireTiming(msgspec.Struct, forbid_unknown_fields=True, array_like=False):
    stage: str
    worker: str
    queue_ms: _NonNeg
    batch_size: _Ms
    inference_ms: _NonNeg
    done_ms: _Ms


class WireStage(msgspec.Struct, forbid_unknown_fields=True):
    """A message between pipeline stages, its payload read apart (see :class:`FastReader`)."""

    id: _Id
    model: _Name
    stage: _Name
    payload: msgspec.Raw
    created_ms: _Ms
    key: _Key | None = None
    reply_to: WireReply | None = None
    deadline_ms: _Ms | None = None
    metadata: _Metadata | None = None
    trail: Annotated[list[WireTiming], msgspec.Meta(max_length=16)] | None = None


_NIL = msgspec.Raw(b"\xc0")


class FastReader:
    """Reads requests and stage messages to Structs: msgspec where it can, the models where it cannot."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._request = msgspec.msgpack.Decoder(WireRequest)
        self._stage = msgspec.msgpack.Decoder(WireStage)
        lim = codec.limits
        self.enabled = all(getattr(lim, name) >= least for name, least in FAST_LIMITS.items())
        self._inner = dict(raw=False, strict_map_key=True, ext_hook=codec._ext_hook, max_str_len=lim.max_str_bytes,
                           max_bin_len=lim.max_message_bytes, max_ext_len=lim.max_message_bytes,
                           max_array_len=lim.max_container_len, max_map_len=lim.max_container_len)

    def request(self, data: bytes) -> tuple[WireRequest, Any]:
        """The request in ``data`` and its inputs; raises the models' :class:`WireError` for what they refuse."""
        if self.enabled and len(data) <= self.codec.limits.max_message_bytes:
            try:
                msg = self._request.decode(data)
                inputs = self._value(msg.inputs)
                if msg.created_ms is None:
                    msg.created_ms = now_ms()
                return msg, inputs
            except (msgspec.MsgspecError, WireError, ValueError, TypeError):
                pass  # the models decide, and say why
        m = self.codec.decode_request(data)
        return WireRequest(id=m.id, model=m.model, inputs=_NIL, key=m.key, reply_to=_reply(m.reply_to),
                           deadline_ms=m.deadline_ms, created_ms=m.created_ms, metadata=dict(m.metadata)), m.inputs

    def stage(self, data: bytes) -> tuple[WireStage, Any]:
        """The stage message in ``data`` and its payload; raises the models' :class:`WireError` for what they
        refuse."""
        if self.enabled and len(data) <= self.codec.limits.max_message_bytes:
            try:
                msg = self._stage.decode(data)
                return msg, self._value(msg.payload)
            except (msgspec.MsgspecError, WireError, ValueError, TypeError):
                pass
        m = self.codec.decode_stage(data)
        trail = [WireTiming(stage=t.stage, worker=t.worker, queue_ms=t.queue_ms, batch_size=t.batch_size,
                            inference_ms=t.inference_ms, done_ms=t.done_ms) for t in m.trail]
        return WireStage(id=m.id, model=m.model, stage=m.stage, payload=_NIL, created_ms=m.created_ms, key=m.key,
                         reply_to=_reply(m.reply_to), deadline_ms=m.deadline_ms, metadata=dict(m.metadata),
                         trail=trail), m.payload

    def _value(self, raw: msgspec.Raw) -> Any:
        """The inputs or payload, read with every limit of :meth:`Codec.unpack` but one level down."""
        obj = msgpack.unpackb(raw, **self._inner)
        if isinstance(obj, (dict, list)) or type(obj) is msgpack.Timestamp:
            self.codec.check_nested(obj, self.codec.limits.max_depth - 1)
        return obj


def _reply(r: Any) -> WireReply | None:
    return None if r is None else WireReply(topic=r.topic, partition=r.partition)


def _timing_map(t: WireTiming) -> dict[str, Any]:
    return {"stage": t.stage, "worker": t.worker, "queue_ms": t.queue_ms, "batch_size": t.batch_size,
            "inference_ms": t.inference_ms, "done_ms": t.done_ms}


def _array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


class _TensorPrefix:
    """The msgpack bytes of a batch's output tensors without the msgpack default hook per item: the outputs
    of a batch share their dtype and shape, so the ext header and the tensor header (WIRE.md) are the same
    bytes for all of them, packed once. Anything else: None (msgpack packs it)."""

    __slots__ = ("_key", "_prefix")

    def __init__(self) -> None:
        self._key: tuple[Any, tuple[int, ...]] | None = None
        self._prefix = b""

    def pack(self, value: Any) -> bytes | None:
        if type(value) is not np.ndarray or not value.flags.c_contiguous or value.dtype.byteorder == ">":
            return None
        key = (value.dtype, value.shape)
        if key != self._key:
            code = _CODES.get(value.dtype)
            if code is None or value.ndim > 8:
                return None  # msgpack's hook says why
            whole = msgpack.packb(_encode_tensor(np.zeros(value.shape, value.dtype)), use_bin_type=True)
            self._key, self._prefix = key, whole[:len(whole) - value.nbytes]
        return self._prefix + value.tobytes()


class ResultWriter:
    """Encodes a batch's ``ok`` results and forwarded stage messages: the same bytes as the models'
    encoding (``Codec.encode_result``, ``Codec.encode``), with what is the same for the batch packed once."""

    def __init__(self, codec: Codec, model: str, model_version: str, worker: str) -> None:
        self.codec = codec
        self.model_version = model_version
        p = msgpack.Packer(default=codec._packer_default, use_bin_type=True)
        self._pack = p.pack
        self._model_part = p.pack("model") + p.pack(model) + p.pack("model_version") + p.pack(model_version)
        self._worker_part = p.pack("worker") + p.pack(worker)
        self._max = codec.limits.max_message_bytes
        self._maps: dict[int, tuple[WireTiming, bytes]] = {}
        self._tensor = _TensorPrefix()

    def results(self, ids: Sequence[str], outputs: Sequence[Any], timings: Sequence[tuple[float, int, float]],
                trails: Sequence[list[WireTiming]] | None = None) -> list[bytes | Exception]:
        """One ``ok`` result per item (with ``stages`` when ``trails`` is given); an item whose output cannot be
        encoded gets the exception instead. ``timings``: (queue_ms, batch_size, inference_ms) per item."""
        pack = self._pack
        head = bytes([0x80 | (9 if trails is not None else 8)]) + pack("id")
        middle = self._model_part + pack("status") + pack("ok") + pack("outputs")
        tail = self._worker_part + pack("created_ms") + pack(now_ms())
        timing_key = pack("timings")
        cache: dict[tuple[float, int, float], bytes] = {}
        out: list[bytes | Exception] = []
        tensor = _TensorPrefix()
        for i, (rid, output, t) in enumerate(zip(ids, outputs, timings, strict=True)):
            tb = cache.get(t)
            if tb is None:
                tb = cache[t] = timing_key + pack({"queue_ms": t[0], "batch_size": t[1], "inference_ms": t[2]})
            try:
                body = tensor.pack(output) or pack(output)
            except (TypeError, ValueError, OverflowError) as exc:
                out.append(exc)
                continue
            stages = b""
            if trails is not None:
                stages = pack("stages") + pack([_timing_map(x) for x in trails[i]])
            value = b"".join((head, pack(rid), middle, body, tb, stages, tail))
            out.append(value if len(value) <= self._max else self.codec.limit_error(len(value)))
        return out

    def forward(self, msg: WireRequest | WireStage, stage: str, payload: Any, trail: list[WireTiming]) -> bytes:
        """``msg`` for ``stage`` with ``payload`` and ``trail``: the bytes of ``Codec.encode(StageMessage(...))``,
        assembled from packed parts (the trail entry a stage adds, one object per run of records, once)."""
        pack = self._pack
        n = 7 + (msg.key is not None) + (msg.reply_to is not None) + (msg.deadline_ms is not None)
        parts = [bytes([0x80 | n]), pack("id"), pack(msg.id), pack("model"), pack(msg.model), pack("stage"),
                 pack(stage), pack("payload"), self._tensor.pack(payload) or pack(payload)]
        if msg.key is not None:
            parts += (pack("key"), pack(msg.key))
        if msg.reply_to is not None:
            parts += (pack("reply_to"), pack({"topic": msg.reply_to.topic, "partition": msg.reply_to.partition}))
        if msg.deadline_ms is not None:
            parts += (pack("deadline_ms"), pack(msg.deadline_ms))
        parts += (pack("created_ms"), pack(msg.created_ms), pack("metadata"), pack(msg.metadata or {}),
                  pack("trail"), _array_header(len(trail)))
        parts += (self._timing(x) for x in trail)
        value = b"".join(parts)
        if len(value) > self._max:
            raise self.codec.limit_error(len(value))
        return value

    def _timing(self, t: WireTiming) -> bytes:
        """A trail entry, packed; the entry a stage adds is one object for a run of records: packed once."""
        seen = self._maps.get(id(t))
        if seen is not None and seen[0] is t:  # the entry is held here, so its id is not reused meanwhile
            return seen[1]
        if len(self._maps) > 1024:
            self._maps.clear()
        packed: bytes = self._pack(_timing_map(t))
        self._maps[id(t)] = (t, packed)
        return packed


# -- the client's side ------------------------------------------------------------------------------------
class _WireErrorInfo(msgspec.Struct, forbid_unknown_fields=True):
    code: Literal[get_args(ErrorCode)]  # type: ignore[valid-type]
    message: str
    stage: str | None = None


class _WireTimings(msgspec.Struct, forbid_unknown_fields=True):
    queue_ms: _NonNeg
    batch_size: _Ms
    inference_ms: _NonNeg


class WireResult(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A result's envelope as the client reads it; the outputs are read apart (see :class:`ResultReader`)."""

    id: _Id
    model: str
    model_version: str = ""
    status: Literal["ok", "error", "expired"]
    outputs: msgspec.Raw = _NIL
    error: _WireErrorInfo | None = None
    timings: _WireTimings | None = None
    stages: Annotated[list[WireTiming], msgspec.Meta(max_length=16)] | None = None
    worker: str = ""
    created_ms: _Ms | msgspec.UnsetType = msgspec.UNSET


class ResultReader:
    """Reads results to :class:`InferenceResult`: the envelope checked by msgspec in C, the outputs read with
    every limit, the model built from plain values. Whatever msgspec does not take as it is goes to
    :meth:`Codec.decode_result`, which decides (and says why), so both always agree."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._decoder = msgspec.msgpack.Decoder(WireResult)
        self._values = FastReader(codec)

    def result(self, data: bytes) -> InferenceResult:
        if self._values.enabled and len(data) <= self.codec.limits.max_message_bytes:
            try:
                m = self._decoder.decode(data)
                fields: dict[str, Any] = {"id": m.id, "model": m.model, "model_version": m.model_version,
                                          "status": m.status, "outputs": self._values._value(m.outputs),
                                          "worker": m.worker}
                if m.error is not None:
                    e = m.error
                    fields["error"] = {"code": e.code, "message": e.message, "stage": e.stage}
                if m.timings is not None:
                    t = m.timings
                    fields["timings"] = {"queue_ms": t.queue_ms, "batch_size": t.batch_size,
                                         "inference_ms": t.inference_ms}
                if m.stages is not None:
                    fields["stages"] = [_timing_map(x) for x in m.stages]
                if m.created_ms is not msgspec.UNSET:
                    fields["created_ms"] = m.created_ms
                return InferenceResult.model_validate(fields)
            except Exception:  # noqa: BLE001 - anything at all: the models decide, and say why
                pass
        return self.codec.decode_result(data)


class RequestWriter:
    """Encodes a client's requests: the bytes of ``Codec.encode_request(InferenceRequest(...))``, with what a
    client's requests share (its reply route, a model name, metadata) packed once. Whatever it cannot take as
    it is (an invalid field, inputs msgpack cannot pack as they are) goes to the model, which decides."""

    def __init__(self, codec: Codec, reply_to: ReplyTo | None) -> None:
        self.codec = codec
        p = msgpack.Packer(default=codec._packer_default, use_bin_type=True)
        self._pack = p.pack
        self.reply_to = reply_to
        self._reply = b"" if reply_to is None else (
            p.pack("reply_to") + p.pack({"topic": reply_to.topic, "partition": reply_to.partition}))
        self._id_key, self._inputs_key, self._key_key = p.pack("id"), p.pack("inputs"), p.pack("key")
        self._deadline_key, self._created_key = p.pack("deadline_ms"), p.pack("created_ms")
        self._models: dict[str, bytes] = {}  # valid model names, packed with their key
        self._no_metadata: bytes = p.pack("metadata") + p.pack({})
        self._max = codec.limits.max_message_bytes
        self._tensor = _TensorPrefix()

    def metadata(self, metadata: Mapping[str, Any] | None) -> bytes | None:
        """The packed ``metadata`` part of requests that carry ``metadata``, validated by the model's own field;
        None: not valid (the model says why when a request is encoded with it)."""
        if not metadata:
            return self._no_metadata
        try:
            checked = InferenceRequest.model_validate({"id": "x", "model": "x", "inputs": None,
                                                       "metadata": metadata}).metadata
        except ValueError:
            return None
        part: bytes = self._pack("metadata") + self._pack(checked)
        return part

    def request(self, rid: str, model: str, inputs: Any, key: str | None, deadline_ms: int | None,
                created_ms: int, metadata: Mapping[str, Any] | None, metadata_part: bytes | None) -> bytes:
        """One request's bytes; ``metadata_part`` is :meth:`metadata` of ``metadata``. Raises what the model
        raises for an invalid request, and the codec's :class:`LimitExceeded` for one over the size limit."""
        model_part = self._models.get(model)
        if model_part is None and type(model) is str and 0 < len(model) <= MAX_NAME_CHARS:
            if len(self._models) > 1000:
                self._models.clear()
            model_part = self._models[model] = self._pack("model") + self._pack(model)
        if (model_part is not None and metadata_part is not None and valid_request_id(rid)
                and (key is None or (type(key) is str and len(key) <= 1024))
                and (deadline_ms is None or (type(deadline_ms) is int and deadline_ms >= 0))
                and type(created_ms) is int and created_ms >= 0):
            pack = self._pack
            try:
                body = self._tensor.pack(inputs) or pack(inputs)
            except (TypeError, ValueError, OverflowError):
                pass  # the model's encoding decides (it also knows pydantic models and dataclasses)
            else:
                n = 5 + (key is not None) + (self.reply_to is not None) + (deadline_ms is not None)
                parts = [bytes([0x80 | n]), self._id_key, pack(rid), model_part, self._inputs_key, body]
                if key is not None:
                    parts += (self._key_key, pack(key))
                parts.append(self._reply)
                if deadline_ms is not None:
                    parts += (self._deadline_key, pack(deadline_ms))
                parts += (self._created_key, pack(created_ms), metadata_part)
                value = b"".join(parts)
                if len(value) > self._max:
                    raise self.codec.limit_error(len(value))
                return value
        return self.codec.encode_request(InferenceRequest(
            id=rid, model=model, inputs=inputs, key=key, reply_to=self.reply_to, deadline_ms=deadline_ms,
            created_ms=created_ms, metadata=metadata or {}))
