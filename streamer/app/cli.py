"""The ``streamer`` command line. Every flag also reads ``STREAMER_<NAME>`` from the environment."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from ..config import ClientSettings, KafkaSettings, WorkerSettings, load_settings
from ..errors import ConfigError, StreamerError
from ..logs import setup_logging
from .replay import add_replay_parser

# Commands that are clients of the cluster for a moment (not long-running members of it), and the demo: they
# say in one line what failed (see kafka.translated_errors), which aiokafka's error log of each failed
# connection attempt would only repeat. Workers and stages quiet it until they first reach the cluster.
_QUIET_COMMANDS = frozenset({"topics", "publish", "results", "status", "top", "replay", "pipeline", "demo"})

__all__ = ["main"]

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


class _Parser(argparse.ArgumentParser):
    """argparse that answers a usage error in one line naming the command, where its flags are listed, and
    exit status 2 (argparse's own answer starts with a usage block of several lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists its arguments\n")


def _leaf(p: argparse.ArgumentParser, func: Any) -> None:
    """Make ``p`` a command that runs ``func``; its name is kept for the usage errors found after parsing."""
    p.set_defaults(func=func, command_prog=p.prog)


def _add_kafka(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kafka (or STREAMER_<NAME>)")
    for name, help_ in _KAFKA_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help_)


def _add_worker(p: argparse.ArgumentParser) -> None:
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


def _settings(args: argparse.Namespace, cls: type[T]) -> T:
    return load_settings(cls, **_overrides(args, cls))  # type: ignore[type-var,arg-type]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- commands ---------------------------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from ..broker import LocalKafka, kafka_jars

    if args.fetch_only:
        print(kafka_jars())
        return 0
    for flag, port in (("--port", args.port), ("--controller-port", args.controller_port)):
        if port is not None and not _port_free(port):
            raise ConfigError(f"port {port} on 127.0.0.1 is in use ({flag}): choose another, or leave {flag} out "
                              "for a free one")
    broker = LocalKafka(port=args.port, controller_port=args.controller_port, data_dir=args.data_dir,
                        heap_mb=args.heap_mb)
    stop = {"now": False}

    def _stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    broker.start()
    print(f"Apache Kafka {broker.version} is ready. bootstrap servers: {broker.bootstrap_servers}", flush=True)
    print(f"data: {broker.data_dir}  log: {broker.log_file}  (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        while not stop["now"] and broker.running:
            time.sleep(0.2)
    finally:
        crashed = not broker.running
        broker.stop()
    print("broker stopped", file=sys.stderr)
    return 1 if crashed and not stop["now"] else 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from ..kafka import TopicSpec, ensure_topics

    s = _settings(args, KafkaSettings)
    specs = [
        TopicSpec(s.request_topic, args.partitions, args.replication_factor),
        TopicSpec(s.results_topic, args.partitions, args.replication_factor),
        TopicSpec(s.dead_letter_topic, args.dead_letter_partitions, args.replication_factor),
    ]
    created = _run(ensure_topics(s, specs))
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}\t{spec.partitions if state == 'created' else '-'}\t{state}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from consumers import Worker

    settings = _settings(args, WorkerSettings)

    async def serve() -> None:
        await Worker(settings).run()

    _run(serve())
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from producers import request_headers
    from schemas import Codec, ReplyTo

    from .. import kafka

    settings = _settings(args, ClientSettings)
    stream = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")  # noqa: SIM115
    reply = ReplyTo(topic=args.reply_topic or settings.results_topic, partition=args.reply_partition)
    codec = Codec()

    async def publish() -> int:
        producer = kafka.producer(settings)
        sent = 0
        async with kafka.started(settings, producer):
            await kafka.require_topic(settings, producer.client, settings.request_topic, kafka.REQUEST_TOPIC)
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    req = _request_from_json(line, args.model, reply)
                except (ValueError, TypeError) as exc:
                    print(f"line {lineno}: {exc}", file=sys.stderr)
                    return 2
                await producer.send(settings.request_topic, codec.encode_request(req),
                                    key=req.key.encode() if req.key else None, headers=request_headers(req))
                print(req.id, flush=True)
                sent += 1
            await producer.flush()
        print(f"published {sent} requests to {settings.request_topic}", file=sys.stderr)
        return 0

    try:
        return _run(publish())
    except KafkaError as exc:
        print(f"streamer: error: publishing to {settings.request_topic!r} failed: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..status import group_status, render

    settings = _settings(args, KafkaSettings)
    status = _run(group_status(settings, args.group, args.topic or None))
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    elif status.state == "Dead" and not status.partitions:
        print(f"group {args.group} has no members and no committed offsets", file=sys.stderr)
        return 1
    else:
        Console(width=max(160, Console().width)).print(render(status))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run_top

    settings = _settings(args, KafkaSettings)
    group = args.group or os.environ.get("STREAMER_GROUP_ID") or WorkerSettings.model_fields["group_id"].default
    with contextlib.suppress(KeyboardInterrupt):  # the way out of a live view
        _run(run_top(settings, group, args.topic or [], args.interval, args.iterations))
    return 0


def _request_from_json(line: str, default_model: str | None, reply: Any) -> Any:
    from schemas import InferenceRequest, new_request_id

    obj = json.loads(line)
    if not isinstance(obj, dict) or "inputs" not in obj:
        obj = {"inputs": obj}
    model = obj.get("model") or default_model
    if not model:
        raise ValueError("no model: give --model or a 'model' field")
    return InferenceRequest(
        id=obj.get("id") or new_request_id(), model=model, inputs=obj["inputs"],
        key=obj.get("key"), reply_to=reply, deadline_ms=obj.get("deadline_ms"),
        metadata=obj.get("metadata") or {},
    )


def cmd_results(args: argparse.Namespace) -> int:
    from schemas import Codec, WireError

    from .. import kafka
    from ..jsonl import result_to_json

    settings = _settings(args, KafkaSettings)
    topic = args.topic or settings.results_topic
    codec = Codec()

    async def follow() -> int:
        consumer = kafka.consumer(settings, group_id=None,
                                  auto_offset_reset="earliest" if args.from_beginning else "latest")
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout_s if args.timeout_s else None
        async with kafka.started(settings, consumer):
            await kafka.require_topic(settings, consumer._client, topic, kafka.TopicSource(
                "--topic" if args.topic else "--results-topic or STREAMER_RESULTS_TOPIC"))
            consumer.subscribe([topic])
            while args.count is None or seen < args.count:
                if deadline is not None and loop.time() > deadline:
                    return 1
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for r in records:
                        try:
                            print(result_to_json(codec.decode_result(r.value or b"")), flush=True)
                        except WireError as exc:
                            print(f"offset {r.offset}: undecodable result: {exc}", file=sys.stderr)
                        seen += 1
        return 0

    try:
        return _run(follow())
    except KeyboardInterrupt:
        return 0


def cmd_pipeline_show(args: argparse.Namespace) -> int:
    from ..pipeline import load_pipeline

    spec = load_pipeline(args.file)
    print(f"pipeline {spec.name}: clients send model={spec.name!r} to {spec.input_topic(spec.order[0].name)!r}")
    rows = [("#", "stage", "callable", "device", "batch", "wait ms", "procs", "reads", "group", "writes",
             "dead letters")]
    for i, st in enumerate(spec.order, 1):
        rows.append((str(i), st.name, st.callable + (f" {st.options}" if st.options else ""), st.device or "auto",
                     str(st.max_batch_size), f"{st.max_wait_ms:g}", str(st.parallelism), spec.input_topic(st.name),
                     spec.group_id(st.name), spec.next_topic(st.name) or "results -> reply route",
                     spec.dead_letter_topic(st.name)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_pipeline_create(args: argparse.Namespace) -> int:
    from ..kafka import TopicSpec, ensure_topics
    from ..pipeline import load_pipeline

    spec = load_pipeline(args.file)
    s = _settings(args, KafkaSettings)
    specs = [TopicSpec(spec.input_topic(st.name), args.partitions, args.replication_factor) for st in spec.order]
    specs += [TopicSpec(spec.dead_letter_topic(st.name), 1, args.replication_factor) for st in spec.order]
    specs.append(TopicSpec(s.results_topic, args.partitions, args.replication_factor))
    created = _run(ensure_topics(s, specs))
    for t in specs:
        print(f"{t.name}\t{t.partitions if t.name in created else '-'}\t{'created' if t.name in created else 'exists'}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from consumers import stage_worker

    from ..pipeline import load_pipeline

    spec = load_pipeline(args.file)
    settings = _settings(args, KafkaSettings)
    overrides = {k: getattr(args, k) for k in ("device", "max_batch_size", "max_wait_ms", "latency_target_ms",
                                                "max_buffered", "delivery", "metrics_port")}
    spec.stage(args.stage)  # fail on an unknown stage before loading anything

    async def serve() -> None:
        await stage_worker(spec, args.stage, settings, **overrides).run()

    _run(serve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- parser -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamer", description="Batched PyTorch inference on Apache Kafka.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", default=None, choices=["text", "json"],
                        help="text (default) or json: one JSON object per line (or STREAMER_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="start a local Apache Kafka (KRaft) from Maven Central jars")
    p.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    p.add_argument("--controller-port", type=int, default=None, help="controller port (default: a free one)")
    p.add_argument("--data-dir", default=None, help="keep data here across restarts (default: temporary)")
    p.add_argument("--heap-mb", type=int, default=384, help="JVM heap in MiB")
    p.add_argument("--fetch-only", action="store_true", help="only resolve the jars into the cache")
    _leaf(p, cmd_broker)

    p = sub.add_parser("topics", help="manage topics")
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="create the request, results and dead-letter topics")
    _add_kafka(c)
    c.add_argument("--partitions", type=int, default=8, help="partitions of the request and results topics")
    c.add_argument("--dead-letter-partitions", type=int, default=1)
    c.add_argument("--replication-factor", type=int, default=1)
    _leaf(c, cmd_topics_create)

    p = sub.add_parser("worker", help="run one worker of the group")
    _add_kafka(p)
    _add_worker(p)
    _leaf(p, cmd_worker)

    p = sub.add_parser("publish", help="publish requests from JSON Lines; prints their ids")
    _add_kafka(p)
    p.add_argument("file", nargs="?", default=None, help="JSON Lines file (default: stdin)")
    p.add_argument("--model", default=None, help="model for lines that name none")
    p.add_argument("--reply-topic", default=None, help="where results go (default: the results topic)")
    p.add_argument("--reply-partition", type=int, default=None, help="a fixed partition of the reply topic")
    _leaf(p, cmd_publish)

    p = sub.add_parser("results", help="follow results as JSON lines")
    _add_kafka(p)
    p.add_argument("--topic", default=None, help="topic to follow (default: the results topic)")
    p.add_argument("--from-beginning", action="store_true", help="start at the earliest offset")
    p.add_argument("--count", type=int, default=None, help="stop after this many results")
    p.add_argument("--timeout-s", type=float, default=None, help="give up (exit 1) after this long")
    _leaf(p, cmd_results)

    p = sub.add_parser("status", help="a consumer group's members, partitions and lag")
    p.add_argument("group", help="consumer group id (workers: STREAMER_GROUP_ID, stages: <pipeline>.<stage>)")
    _add_kafka(p)
    p.add_argument("--topic", action="append", default=[], help="also show this topic's lag (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _leaf(p, cmd_status)

    p = sub.add_parser("top", help="a live view of a worker group: members, partitions, lag, results/s, latency")
    p.add_argument("group", nargs="?", default=None,
                   help="consumer group id (default: STREAMER_GROUP_ID, else the workers' default group)")
    _add_kafka(p)
    p.add_argument("--topic", action="append", default=[], help="also show this topic's lag (repeatable)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many refreshes")
    _leaf(p, cmd_top)

    add_replay_parser(sub, _add_kafka)

    p = sub.add_parser("pipeline", help="pipelines of stages chained by topics")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    c = psub.add_parser("show", help="print the stages, topics and groups of a pipeline spec")
    c.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    _leaf(c, cmd_pipeline_show)
    c = psub.add_parser("create", help="create a pipeline's topics")
    c.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    _add_kafka(c)
    c.add_argument("--partitions", type=int, default=8)
    c.add_argument("--replication-factor", type=int, default=1)
    _leaf(c, cmd_pipeline_create)

    p = sub.add_parser("stage", help="run one worker of one stage of a pipeline")
    p.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    p.add_argument("--stage", required=True, help="the stage to run")
    _add_kafka(p)
    g = p.add_argument_group("overrides of the spec")
    g.add_argument("--device", default=None)
    g.add_argument("--max-batch-size", dest="max_batch_size", default=None)
    g.add_argument("--max-wait-ms", dest="max_wait_ms", default=None)
    g.add_argument("--latency-target-ms", dest="latency_target_ms", default=None)
    g.add_argument("--max-buffered", dest="max_buffered", default=None)
    g.add_argument("--delivery", default=None, choices=["at-least-once", "exactly-once"])
    g.add_argument("--metrics-port", dest="metrics_port", default=None,
                   help="serve Prometheus metrics on this port (0: a free one)")
    _leaf(p, cmd_stage)

    p = sub.add_parser("demo", help="run the whole system end to end on an embedded broker")
    _add_kafka(p)
    _add_worker(p)
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes to start (0: use the running workers of the group, e.g. under compose)")
    p.add_argument("--requests", type=int, default=2000, help="requests to publish")
    p.add_argument("--keys", type=int, default=50, help="distinct request keys")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s of the steady run that measures latency (default: half the saturation throughput)")
    p.add_argument("--rate-seconds", type=float, default=3.0, help="length of the steady run (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _leaf(p, cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # found by the top-level parser, but the flags belong to the command (`streamer worker --x`)
        prog = args.command_prog
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}; `{prog} --help` lists its arguments",
              file=sys.stderr)
        return 2
    try:
        setup_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"streamer: error: {exc} (--log-level: DEBUG, INFO, WARNING or ERROR; --log-format or "
              "STREAMER_LOG_FORMAT: text or json)", file=sys.stderr)
        return 2
    if args.command in _QUIET_COMMANDS and args.log_level.upper() != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output has gone (`streamer publish ... | head`): stop quietly, as Unix tools do
        # when SIGPIPE ends them, with their exit status (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout would raise again
        return 141
