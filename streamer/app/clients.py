"""The commands that are clients of a cluster for a moment: ``topics create``, ``publish``, ``results``,
``status`` and ``top``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from ..config import ClientSettings, KafkaSettings, WorkerSettings
from ._common import add_kafka, leaf, run, settings_from

__all__ = ["add_client_parsers"]


def add_client_parsers(sub: Any) -> None:
    p = sub.add_parser("topics", help="manage topics")
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="create the request, results and dead-letter topics")
    add_kafka(c)
    c.add_argument("--partitions", type=int, default=8, help="partitions of the request and results topics")
    c.add_argument("--dead-letter-partitions", type=int, default=1)
    c.add_argument("--replication-factor", type=int, default=1)
    leaf(c, cmd_topics_create)

    p = sub.add_parser("publish", help="publish requests from JSON Lines; prints their ids")
    add_kafka(p)
    p.add_argument("file", nargs="?", default=None, help="JSON Lines file (default: stdin)")
    p.add_argument("--model", default=None, help="model for lines that name none")
    p.add_argument("--reply-topic", default=None, help="where results go (default: the results topic)")
    p.add_argument("--reply-partition", type=int, default=None, help="a fixed partition of the reply topic")
    leaf(p, cmd_publish)

    p = sub.add_parser("results", help="follow results as JSON lines")
    add_kafka(p)
    p.add_argument("--topic", default=None, help="topic to follow (default: the results topic)")
    p.add_argument("--from-beginning", action="store_true", help="start at the earliest offset")
    p.add_argument("--count", type=int, default=None, help="stop after this many results")
    p.add_argument("--timeout-s", type=float, default=None, help="give up (exit 1) after this long")
    leaf(p, cmd_results)

    p = sub.add_parser("status", help="a consumer group's members, partitions and lag")
    p.add_argument("group", help="consumer group id (workers: STREAMER_GROUP_ID, stages: <pipeline>.<stage>)")
    add_kafka(p)
    p.add_argument("--topic", action="append", default=[], help="also show this topic's lag (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    leaf(p, cmd_status)

    p = sub.add_parser("top", help="a live view of a worker group: members, partitions, lag, results/s, latency")
    p.add_argument("group", nargs="?", default=None,
                   help="consumer group id (default: STREAMER_GROUP_ID, else the workers' default group)")
    add_kafka(p)
    p.add_argument("--topic", action="append", default=[], help="also show this topic's lag (repeatable)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many refreshes")
    leaf(p, cmd_top)


def cmd_topics_create(args: argparse.Namespace) -> int:
    from ..kafka import TopicSpec, ensure_topics

    s = settings_from(args, KafkaSettings)
    specs = [
        TopicSpec(s.request_topic, args.partitions, args.replication_factor),
        TopicSpec(s.results_topic, args.partitions, args.replication_factor),
        TopicSpec(s.dead_letter_topic, args.dead_letter_partitions, args.replication_factor),
    ]
    created = run(ensure_topics(s, specs))
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}\t{spec.partitions if state == 'created' else '-'}\t{state}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from schemas import Codec, ReplyTo

    from .. import kafka

    settings = settings_from(args, ClientSettings)
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
                await kafka.send_request(producer, settings.request_topic, req, codec)
                print(req.id, flush=True)
                sent += 1
            await producer.flush()
        print(f"published {sent} requests to {settings.request_topic}", file=sys.stderr)
        return 0

    try:
        return run(publish())
    except KafkaError as exc:
        print(f"streamer: error: publishing to {settings.request_topic!r} failed: {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..status import group_status, render

    settings = settings_from(args, KafkaSettings)
    status = run(group_status(settings, args.group, args.topic or None))
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

    settings = settings_from(args, KafkaSettings)
    group = args.group or os.environ.get("STREAMER_GROUP_ID") or WorkerSettings.model_fields["group_id"].default
    with contextlib.suppress(KeyboardInterrupt):  # the way out of a live view
        run(run_top(settings, group, args.topic or [], args.interval, args.iterations))
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

    settings = settings_from(args, KafkaSettings)
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
        return run(follow())
    except KeyboardInterrupt:
        return 0
