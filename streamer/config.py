"""Typed settings, validated at start-up. Every field can come from ``STREAMER_<NAME>``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .assignors import AssignorName
from .errors import ConfigError
from .partitioners import PartitionerName

__all__ = ["ClientSettings", "KafkaSettings", "WorkerSettings", "load_settings", "settings_env"]

_S = TypeVar("_S", bound="KafkaSettings")


class KafkaSettings(BaseSettings):
    """How to reach the cluster. Shared by workers, clients and the CLI."""

    model_config = SettingsConfigDict(env_prefix="STREAMER_", extra="forbid", validate_default=True)

    bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1)
    client_id: str = Field(default="streamer", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    idempotence: bool = Field(default=True, description="idempotent producers; off only for brokers without them")
    partitioner: PartitionerName = Field(
        default="murmur2", description="where producers put records without a partition (see streamer.partitioners)"
    )
    request_topic: str = Field(default="streamer.requests", min_length=1, max_length=249)
    results_topic: str = Field(default="streamer.results", min_length=1, max_length=249)
    dead_letter_topic: str = Field(default="streamer.dead-letters", min_length=1, max_length=249)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password"
            )
        return self


class WorkerSettings(KafkaSettings):
    """One worker: which model, how it batches, which group it joins."""

    group_id: str = Field(default="streamer-workers", min_length=1)
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        default="at-least-once", description="exactly-once: results and offsets in one Kafka transaction"
    )
    transaction_ms: float = Field(
        default=100.0, ge=0, le=60_000,
        description="exactly-once: how long the worker's transaction may span batches while more "
                    "are ready (like Kafka Streams' commit.interval.ms); an idle worker commits at once",
    )
    commit_interval_ms: float = Field(
        default=100.0, ge=0, le=60_000,
        description="at-least-once: the shortest time between two offset commits (results acknowledged meanwhile "
                    "share the next one; a worker killed redelivers about this much); rebalances and shutdown "
                    "commit at once",
    )
    model: str = Field(default="tiny-mlp", min_length=1)
    model_version: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="the version this worker serves, in every result and its group card; default: the model's own",
    )
    weights: str | None = Field(
        default=None, min_length=1,
        description="a safetensors file for the model (its factory's `weights` option), reloaded between batches "
                    "on SIGHUP or when the file changes; a load that fails keeps the weights served",
    )
    reload_poll_s: float = Field(
        default=1.0, ge=0, description="how often the weights file is checked for a change (0: on SIGHUP only)"
    )
    traffic_share: float | None = Field(
        default=None, gt=0, lt=1,
        description="canary: the part of the group's partitions this member takes (with the capacity assignor, to "
                    "one partition's worth); members with a share split it, the others take the rest",
    )
    device: str | None = Field(default=None, description="torch device; default: cuda when present, else cpu")
    max_batch_size: int = Field(default=32, ge=1, le=65536)
    max_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    latency_target_ms: float | None = Field(
        default=None, gt=0, le=600_000,
        description="batch to a latency target: the worker chooses its batch size (up to max_batch_size) and wait "
                    "so that queue wait plus model time stays under this (max_wait_ms is then unused); off if unset",
    )
    max_buffered: int = Field(default=0, ge=0, description="records held before pausing fetch; 0 = 4 x batch")
    assignor: AssignorName = Field(
        default="round-robin", description="how the group shares out partitions: range, round-robin, capacity"
    )
    capacity: float | None = Field(
        default=None, gt=0, description="items/s this worker advertises to the capacity assignor; default: measured"
    )
    group_instance_id: str | None = Field(
        default=None, min_length=1, description="static membership: a restart within the session timeout keeps "
                                                "the partitions, with no rebalance",
    )
    session_timeout_ms: int = Field(
        default=6_000, ge=1000, description="a member silent this long is out: its partitions move on (the "
                                            "broker's group.min.session.timeout.ms, 6 s by default, is the floor)",
    )
    heartbeat_interval_ms: int = Field(default=1_000, ge=100, description="at most a third of session_timeout_ms")
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default: torch's")
    stats_interval_s: float = Field(default=10.0, gt=0, description="how often the worker logs its figures")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="serve Prometheus metrics on this port (0: a free one); off if unset"
    )
    scale_drain_s: float = Field(
        default=60.0, gt=0, description="the scaling signal asks for enough workers to drain the lag within this"
    )
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="larger requests are rejected")
    max_tensor_elements: int = Field(default=16 * 1024 * 1024, ge=1)
    startup_timeout_s: float = Field(
        default=60.0, ge=0,
        description="a worker started before its cluster answers, or before its request topic exists, waits this long",
    )
    produce_timeout_ms: int = Field(
        default=30_000, ge=1000, le=300_000,
        description="a produce request's timeout (retried after it), and how long a record waits for a partition "
                    "with no leader; then a result whose reply topic the cluster says is gone becomes a dead letter",
    )
    reply_topics: list[str] = Field(
        default_factory=list,
        description="where results may go besides the results topic and '<results_topic>.*' (a trailing * "
                    "makes a prefix); any other reply_to gets a bad_route dead letter and no write",
    )
    max_record_bytes: int = Field(
        default=1_000_000, ge=4096, le=100 * 1024 * 1024,
        description="largest record a worker writes (keep it under the broker's max.message.bytes): a larger "
                    "result becomes an error result, a larger dead letter is truncated",
    )
    producer_batch_bytes: int = Field(
        default=256 * 1024, ge=1024, le=1_000_000,
        description="bytes per partition per produce request; aiokafka keeps one request in flight per "
                    "partition, so large outputs (embeddings) need room for many per batch",
    )


    @model_validator(mode="after")
    def _share_needs_capacity(self) -> WorkerSettings:
        if self.traffic_share is not None and self.assignor != "capacity":
            raise ValueError("traffic_share needs assignor capacity (on every member of the group: the share is "
                             "carried in the capacity assignor's protocol)")
        return self


class ClientSettings(KafkaSettings):
    """The client library: where requests go, where replies come back, how long to wait."""

    reply_topic: str | None = Field(default=None, description="default: a private topic per client")
    timeout_s: float = Field(default=30.0, gt=0)
    max_in_flight: int = Field(default=10_000, ge=1)


def load_settings(cls: type[_S], **overrides: Any) -> _S:
    """Build settings from the environment and explicit overrides (overrides win).

    Raises :class:`ConfigError` naming each bad setting and its environment variable.
    """
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            where = f" (--{name.replace('_', '-')} or STREAMER_{name.upper()})" if name else ""
            lines.append(f"invalid setting {name or '<settings>'}{where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def settings_env(settings: KafkaSettings, fields: Iterable[str] | None = None) -> dict[str, str]:
    """The ``STREAMER_*`` environment that gives a child process these settings (secrets included).

    ``fields`` limits it to those names (say, ``WorkerSettings.model_fields`` for a worker).
    """
    wanted = set(fields) if fields is not None else None
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if wanted is not None and name not in wanted:
            continue
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        env[f"STREAMER_{name.upper()}"] = text
    return env
