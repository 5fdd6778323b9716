"""streamer: batched PyTorch inference on Apache Kafka. The core shared by clients and workers."""

from .batching import BatchPolicy
from .config import ClientSettings, KafkaSettings, WorkerSettings, load_settings
from .errors import (
    AuthenticationFailed,
    BadInput,
    BrokerError,
    ConfigError,
    FatalError,
    InferenceError,
    InferenceTimeout,
    ModelNotFound,
    StreamerError,
    TlsFailed,
)

__all__ = [
    "AuthenticationFailed",
    "BadInput",
    "BatchPolicy",
    "BrokerError",
    "ClientSettings",
    "ConfigError",
    "FatalError",
    "InferenceError",
    "InferenceTimeout",
    "KafkaSettings",
    "ModelNotFound",
    "StreamerError",
    "TlsFailed",
    "WorkerSettings",
    "load_settings",
]
__version__ = "0.1.0"
