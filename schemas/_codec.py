"""The msgpack codec: strict limits, and a zero-copy tensor encoding (ext type 1).

See WIRE.md for the byte layout. Decoded tensors are read-only ``numpy`` views
over the received bytes (``numpy.frombuffer``); nothing is copied after the
msgpack unpacker hands over the ext payload.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from ._errors import DecodeError, LimitExceeded, SchemaError
from ._headers import SCHEMA_VERSION
from ._models import InferenceRequest, InferenceResult, ReplyTo, StageMessage, valid_request_id

__all__ = [
    "DTYPES",
    "SCHEMA_VERSION",
    "TENSOR_EXT_CODE",
    "Codec",
    "Limits",
]

TENSOR_EXT_CODE: Final = 1

# dtype code <-> numpy dtype (always little-endian on the wire).
DTYPES: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype("?"),
    2: np.dtype("<u1"),
    3: np.dtype("<i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<u4"),
    7: np.dtype("<i4"),
    8: np.dtype("<u8"),
    9: np.dtype("<i8"),
    10: np.dtype("<f2"),
    11: np.dtype("<f4"),
    12: np.dtype("<f8"),
}
_CODES: Final = {dt: code for code, dt in DTYPES.items()}
_MAX_NDIM: Final = 8
_FIXED = struct.Struct("<BB6x")
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(_MAX_NDIM + 1)]
_RESERVED = bytes(6)
_ALWAYS: Final = frozenset({"inputs", "outputs", "payload"})

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits applied before and during decoding. Units are in the names."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_tensor_elements: int = 16 * 1024 * 1024
    max_depth: int = 32
    max_str_bytes: int = 1024 * 1024
    max_container_len: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_tensor_elements", "max_depth", "max_str_bytes",
                     "max_container_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")


def _encode_tensor(arr: np.ndarray[Any, Any]) -> msgpack.ExtType:
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    code = _CODES.get(dt)
    if code is None:
        raise TypeError(f"dtype {arr.dtype} cannot go on the wire; allowed: "
                        f"{sorted(str(d) for d in DTYPES.values())}")
    if arr.ndim > _MAX_NDIM:
        raise TypeError(f"tensors have at most {_MAX_NDIM} dimensions, got {arr.ndim}")
    head = _FIXED.pack(code, arr.ndim) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
    body = np.ascontiguousarray(arr, dtype=dt).tobytes()
    return msgpack.ExtType(TENSOR_EXT_CODE, head + body)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    torch_tensor = getattr(obj, "numpy", None)
    if torch_tensor is not None and type(obj).__module__.startswith("torch"):
        return _encode_tensor(obj.detach().cpu().numpy())
    raise TypeError(f"cannot encode {type(obj).__name__}")


class Codec:
    """Encodes and decodes wire messages under fixed :class:`Limits`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._packer_default = _default

    # -- raw msgpack -------------------------------------------------------------------------------
    def pack(self, obj: Any) -> bytes:
        data: bytes = msgpack.packb(obj, default=self._packer_default, use_bin_type=True)
        if len(data) > self.limits.max_message_bytes:
            raise self.limit_error(len(data))
        return data

    def unpack(self, data: bytes) -> Any:
        lim = self.limits
        if len(data) > lim.max_message_bytes:
            raise LimitExceeded(f"message of {len(data)} bytes is over the {lim.max_message_bytes}-byte limit")
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=self._ext_hook,
                max_str_len=lim.max_str_bytes,
                max_bin_len=lim.max_message_bytes,
                max_ext_len=lim.max_message_bytes,
                max_array_len=lim.max_container_len,
                max_map_len=lim.max_container_len,
            )
        except (LimitExceeded, DecodeError):
            raise
        except msgpack.StackError as exc:
            raise LimitExceeded("message nesting is too deep") from exc
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from exc
        except (msgpack.ExtraData, msgpack.FormatError) as exc:
            why = str(exc) or "a reserved or invalid type byte"
            raise DecodeError(f"not a single valid msgpack object: {why}") from exc
        except (ValueError, TypeError) as exc:
            # msgpack raises ValueError for a declared length over a max_*_len and for
            # truncated data, TypeError for unhashable or non-string map keys.
            raise DecodeError(f"invalid msgpack: {exc}") from exc
        self.check_nested(obj, lim.max_depth)
        return obj

    def check_nested(self, obj: Any, max_depth: int) -> None:
        """What msgpack lets through that the wire format forbids (see :func:`_check_depth`), and depth."""
        if type(obj) is msgpack.Timestamp:
            raise DecodeError("unknown msgpack ext type -1 (timestamp); only ext type 1 (tensor) is allowed")
        _check_depth(obj, max_depth)

    def limit_error(self, size: int) -> LimitExceeded:
        return LimitExceeded(f"message of {size} bytes is over the {self.limits.max_message_bytes}-byte limit")

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code != TENSOR_EXT_CODE:
            raise DecodeError(f"unknown msgpack ext type {code}")
        if len(data) < _FIXED.size:
            raise DecodeError("tensor header is truncated")
        dcode, ndim = _FIXED.unpack_from(data, 0)
        if data[2:8] != _RESERVED:
            raise DecodeError("tensor header bytes 2-7 must be zero")
        dtype = DTYPES.get(dcode)
        if dtype is None:
            raise DecodeError(f"tensor dtype code {dcode} is not allowed")
        if ndim > _MAX_NDIM:
            raise DecodeError(f"tensor has {ndim} dimensions, at most {_MAX_NDIM} allowed")
        offset = _FIXED.size + 8 * ndim
        if len(data) < offset:
            raise DecodeError("tensor shape is truncated")
        shape = _SHAPES[ndim].unpack_from(data, _FIXED.size)
        count = math.prod(shape)
        if count > self.limits.max_tensor_elements:
            raise LimitExceeded(f"tensor of {count} elements is over the "
                                f"{self.limits.max_tensor_elements}-element limit")
        if len(data) - offset != count * dtype.itemsize:
            raise DecodeError(f"tensor data is {len(data) - offset} bytes, shape {list(shape)} of "
                              f"{dtype} needs {count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)

    # -- typed messages ------------------------------------------------------------------------------
    def encode(self, message: BaseModel) -> bytes:
        # Optional fields that are unset are left out; ``inputs``/``outputs`` are kept even when nil.
        data = message.model_dump()
        for name in [k for k, v in data.items() if v is None and k not in _ALWAYS]:
            del data[name]
        return self.pack(data)

    def encode_request(self, request: InferenceRequest) -> bytes:
        return self.encode(request)

    def encode_result(self, result: InferenceResult) -> bytes:
        """The same bytes as :meth:`encode` (field order, nil optionals left out), built without a model dump:
        this runs once per result on the hot path."""
        data: dict[str, Any] = {"id": result.id, "model": result.model, "model_version": result.model_version,
                                "status": result.status, "outputs": result.outputs}
        if (e := result.error) is not None:
            data["error"] = {"code": e.code, "message": e.message, "stage": e.stage}
        if (t := result.timings) is not None:
            data["timings"] = {"queue_ms": t.queue_ms, "batch_size": t.batch_size, "inference_ms": t.inference_ms}
        if result.stages is not None:
            data["stages"] = [{"stage": st.stage, "worker": st.worker, "queue_ms": st.queue_ms,
                               "batch_size": st.batch_size, "inference_ms": st.inference_ms, "done_ms": st.done_ms}
                              for st in result.stages]
        data["worker"] = result.worker
        data["created_ms"] = result.created_ms
        return self.pack(data)

    def decode_request(self, data: bytes) -> InferenceRequest:
        return self._decode(data, InferenceRequest)

    def decode_result(self, data: bytes) -> InferenceResult:
        return self._decode(data, InferenceResult)

    def decode_stage(self, data: bytes) -> StageMessage:
        return self._decode(data, StageMessage)

    def _decode(self, data: bytes, model: type[_M]) -> _M:
        obj = self.unpack(data)
        if not isinstance(obj, Mapping):
            raise SchemaError(f"a {model.__name__} must be a msgpack map, got {type(obj).__name__}")
        try:
            return model.model_validate(obj)
        except ValidationError as exc:
            # What can still be read, so that the requester gets its error result.
            rid = obj.get("id") if valid_request_id(obj.get("id")) else None
            reply = None
            with contextlib.suppress(ValidationError):
                raw = obj.get("reply_to")
                reply = ReplyTo.model_validate(raw) if raw is not None else None
            raise SchemaError(_summarise(exc, model.__name__), request_id=rid, reply_to=reply) from exc


def _summarise(exc: ValidationError, name: str) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid {name}: " + "; ".join(parts)


def _check_depth(obj: Any, max_depth: int) -> None:
    """Nesting depth (the top-level value is depth 1), and what msgpack lets through that the wire
    format forbids: map keys that are not str (msgpack reads bin keys) and ext type -1 (timestamps)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            for k in item:
                if type(k) is not str:
                    raise DecodeError(f"a map key is {type(k).__name__}; map keys must be str")
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise LimitExceeded(f"message nesting is deeper than {max_depth}")
        for c in children:
            if isinstance(c, (dict, list)):
                stack.append((c, depth + 1))
            elif type(c) is msgpack.Timestamp:
                raise DecodeError("unknown msgpack ext type -1 (timestamp); only ext type 1 (tensor) is allowed")
