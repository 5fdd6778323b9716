"""One family of errors for the whole system, rooted at :class:`schemas.StreamerError` (wire errors are in it).

Recoverable errors (one request failed) are kept apart from fatal ones (:class:`FatalError`: this
process cannot go on). Third-party errors are translated at the boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas import ErrorCode, StreamerError

if TYPE_CHECKING:
    from schemas import InferenceResult

__all__ = [
    "AuthenticationFailed",
    "BadInput",
    "BrokerError",
    "ConfigError",
    "FatalError",
    "InferenceError",
    "InferenceTimeout",
    "ModelNotFound",
    "StreamerError",
    "TlsFailed",
]


class FatalError(StreamerError):
    """The process cannot go on (bad configuration, a missing tool, a dead reader task)."""


class ConfigError(FatalError):
    """A setting is missing or invalid. The message names the setting."""


class BrokerError(FatalError):
    """The local broker could not be prepared, started or reached."""


class AuthenticationFailed(BrokerError):
    """The cluster refused our SASL credentials."""


class TlsFailed(BrokerError):
    """The TLS handshake with the cluster failed (an untrusted certificate, say); retrying will not help."""


class ModelNotFound(FatalError):
    """``--model`` names neither a built-in nor an importable ``package.module:factory``."""


class BadInput(StreamerError):
    """One request's inputs were rejected by the model (dtype, shape, NaN ...). Recoverable."""

    code: ErrorCode = "bad_input"


class InferenceTimeout(StreamerError, TimeoutError):
    """No result arrived for a request within its timeout."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no result for request {request_id} within {timeout_s:g} s")
        self.request_id = request_id
        self.timeout_s = timeout_s


class InferenceError(StreamerError):
    """A worker answered with an ``error`` or ``expired`` result; the result is attached."""

    def __init__(self, result: InferenceResult) -> None:
        detail = f"{result.error.code}: {result.error.message}" if result.error else result.status
        super().__init__(f"request {result.id} failed ({result.status}) - {detail}")
        self.result = result
