"""What every ``streamer`` command shares: the one-line usage errors, the Kafka and worker flags, settings from
flags and the environment, and running a coroutine."""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

from ..config import KafkaSettings, load_settings

__all__ = ["Parser", "add_kafka", "add_worker", "leaf", "run", "settings_from"]

T = TypeVar("T")

_KAFKA_FLAGS = {
    "bootstrap_servers": "host:port[,host:port] of the cluster",
    "client_id": "client id prefix",
    "security_protocol": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    "sasl_mechanism": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
    "sasl_username": "SASL user",
    "sasl_password": "SASL password (prefer STREAMER_SASL_PASSWORD)",
    "ssl_cafile": "CA bundle for TLS",
    "ssl_certfile": "client certificate for TLS",
    "ssl_keyfile": "client key for TLS",
    "request_topic": "topic of inference requests",
    "results_topic": "shared results topic",
    "dead_letter_topic": "topic of dead letters",
}


class Parser(argparse.ArgumentParser):
    """argparse that answers a usage error in one line naming the command, where its flags are listed, and
    exit status 2 (argparse's own answer starts with a usage block of several lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists its arguments\n")


def leaf(p: argparse.ArgumentParser, func: Any) -> None:
    """Make ``p`` a command that runs ``func``; its name is kept for the usage errors found after parsing."""
    p.set_defaults(func=func, command_prog=p.prog)


def add_kafka(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kafka (or STREAMER_<NAME>)")
    for name, help_ in _KAFKA_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help_)


def add_worker(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker (or STREAMER_<NAME>)")
    g.add_argument("--model", default=None, help="built-in (tiny-mlp, minilm) or package.module:factory")
    g.add_argument("--model-version", dest="model_version", default=None,
                   help="the version this worker serves, in results and its group card (default: the model's own)")
    g.add_argument("--weights", default=None,
                   help="safetensors weights for the model; reloaded between batches on SIGHUP or a change of the file")
    g.add_argument("--reload-poll-s", dest="reload_poll_s", default=None,
                   help="how often the weights file is checked for a change (0: on SIGHUP only; default 1)")
    g.add_argument("--traffic-share", dest="traffic_share", default=None,
                   help="canary: this member's part of the partitions, e.g. 0.1 (needs --assignor capacity)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    g.add_argument("--group-id", dest="group_id", default=None, help="consumer group of the workers")
    g.add_argument("--max-batch-size", dest="max_batch_size", default=None, help="largest batch")
    g.add_argument("--max-wait-ms", dest="max_wait_ms", default=None, help="longest wait to fill a batch")
    g.add_argument("--latency-target-ms", dest="latency_target_ms", default=None,
                   help="choose batch size and wait while running so that queue wait + model time stays under this")
    g.add_argument("--max-buffered", dest="max_buffered", default=None,
                   help="records held before fetching pauses (0: 4 x batch)")
    g.add_argument("--delivery", default=None, choices=["at-least-once", "exactly-once"],
                   help="exactly-once writes results and offsets in one Kafka transaction")
    g.add_argument("--assignor", default=None, choices=["range", "round-robin", "capacity"],
                   help="how the group shares out partitions (capacity: in proportion to measured throughput)")
    g.add_argument("--capacity", default=None, help="items/s to advertise to the capacity assignor (default: measured)")
    g.add_argument("--group-instance-id", dest="group_instance_id", default=None,
                   help="static membership: a restart within the session timeout triggers no rebalance")
    g.add_argument("--metrics-port", dest="metrics_port", default=None,
                   help="serve Prometheus metrics on this port (0: a free one)")


def _overrides(args: argparse.Namespace, cls: type[KafkaSettings]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}


def settings_from(args: argparse.Namespace, cls: type[T]) -> T:
    return load_settings(cls, **_overrides(args, cls))  # type: ignore[type-var,arg-type]


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)
