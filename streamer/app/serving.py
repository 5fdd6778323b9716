"""The commands that serve: ``broker`` (a local Kafka), ``worker``, ``pipeline show|create``, ``stage`` and
``demo``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from ..config import KafkaSettings, WorkerSettings
from ..errors import ConfigError
from ..kafka import preflight
from ._common import add_kafka, add_worker, leaf, run, settings_from

__all__ = ["add_serving_parsers"]


def add_serving_parsers(sub: Any) -> None:
    p = sub.add_parser("broker", help="start a local Apache Kafka (KRaft) from Maven Central jars")
    p.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    p.add_argument("--controller-port", type=int, default=None, help="controller port (default: a free one)")
    p.add_argument("--data-dir", default=None, help="keep data here across restarts (default: temporary)")
    p.add_argument("--heap-mb", type=int, default=384, help="JVM heap in MiB")
    p.add_argument("--fetch-only", action="store_true", help="only resolve the jars into the cache")
    leaf(p, cmd_broker)

    p = sub.add_parser("worker", help="run one worker of the group")
    add_kafka(p)
    add_worker(p)
    leaf(p, cmd_worker)

    p = sub.add_parser("pipeline", help="pipelines of stages chained by topics")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    c = psub.add_parser("show", help="print the stages, topics and groups of a pipeline spec")
    c.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    leaf(c, cmd_pipeline_show)
    c = psub.add_parser("create", help="create a pipeline's topics")
    c.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    add_kafka(c)
    c.add_argument("--partitions", type=int, default=8)
    c.add_argument("--replication-factor", type=int, default=1)
    leaf(c, cmd_pipeline_create)

    p = sub.add_parser("stage", help="run one worker of one stage of a pipeline")
    p.add_argument("file", help="a pipeline spec (TOML), or a built-in: minilm-2stage, minilm-split")
    p.add_argument("--stage", required=True, help="the stage to run")
    add_kafka(p)
    g = p.add_argument_group("overrides of the spec")
    g.add_argument("--device", default=None)
    g.add_argument("--max-batch-size", dest="max_batch_size", default=None)
    g.add_argument("--max-wait-ms", dest="max_wait_ms", default=None)
    g.add_argument("--latency-target-ms", dest="latency_target_ms", default=None)
    g.add_argument("--max-buffered", dest="max_buffered", default=None)
    g.add_argument("--delivery", default=None, choices=["at-least-once", "exactly-once"])
    g.add_argument("--metrics-port", dest="metrics_port", default=None,
                   help="serve Prometheus metrics on this port (0: a free one)")
    leaf(p, cmd_stage)

    p = sub.add_parser("demo", help="run the whole system end to end on an embedded broker")
    add_kafka(p)
    add_worker(p)
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes to start (0: use the running workers of the group, e.g. under compose)")
    p.add_argument("--requests", type=int, default=2000, help="requests to publish")
    p.add_argument("--keys", type=int, default=50, help="distinct request keys")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s of the steady run that measures latency (default: half the saturation throughput)")
    p.add_argument("--rate-seconds", type=float, default=3.0, help="length of the steady run (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    leaf(p, cmd_demo)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True




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


def cmd_worker(args: argparse.Namespace) -> int:
    from ..models import find_factory

    settings = settings_from(args, WorkerSettings)
    find_factory(settings.model)  # a built-in's name is checked without torch
    run(preflight(settings, settings.startup_timeout_s, settings.request_topic))  # before torch and the model

    from consumers import Worker

    async def serve() -> None:
        await Worker(settings).run()

    run(serve())
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
    s = settings_from(args, KafkaSettings)
    specs = [TopicSpec(spec.input_topic(st.name), args.partitions, args.replication_factor) for st in spec.order]
    specs += [TopicSpec(spec.dead_letter_topic(st.name), 1, args.replication_factor) for st in spec.order]
    specs.append(TopicSpec(s.results_topic, args.partitions, args.replication_factor))
    created = run(ensure_topics(s, specs))
    for t in specs:
        print(f"{t.name}\t{t.partitions if t.name in created else '-'}\t{'created' if t.name in created else 'exists'}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from ..pipeline import load_pipeline

    spec = load_pipeline(args.file)  # a built-in stage's callable is checked without torch
    settings = settings_from(args, KafkaSettings)
    overrides = {k: getattr(args, k) for k in ("device", "max_batch_size", "max_wait_ms", "latency_target_ms",
                                                "max_buffered", "delivery", "metrics_port")}
    ws = spec.worker_settings(args.stage, settings, **overrides)  # an unknown stage fails here
    run(preflight(ws, ws.startup_timeout_s, ws.request_topic, spec.input_source(args.stage)))  # before torch

    from consumers import stage_worker

    async def serve() -> None:
        await stage_worker(spec, args.stage, settings, **overrides).run()

    run(serve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
