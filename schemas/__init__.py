"""The wire contract of streamer: message models and the msgpack codec. See ``WIRE.md``."""

from ._codec import DTYPES, SCHEMA_VERSION, TENSOR_EXT_CODE, Codec, Limits, RoutingHeaders
from ._errors import DecodeError, LimitExceeded, SchemaError, WireError
from ._models import (
    ErrorCode,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    ReplyTo,
    StageMessage,
    StageTiming,
    Status,
    Timings,
    new_request_id,
    now_ms,
)

__all__ = [
    "DTYPES",
    "SCHEMA_VERSION",
    "TENSOR_EXT_CODE",
    "Codec",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResult",
    "LimitExceeded",
    "Limits",
    "ReplyTo",
    "RoutingHeaders",
    "SchemaError",
    "StageMessage",
    "StageTiming",
    "Status",
    "Timings",
    "WireError",
    "new_request_id",
    "now_ms",
]
