"""``streamer replay``: the command around ``consumers.replay`` (offline, in one process or several, or
``--republish`` to the live workers)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
from typing import Any

from ..config import WorkerSettings, load_settings
from ..errors import ConfigError

__all__ = ["add_replay_parser", "run_replay"]


def add_replay_parser(sub: Any, add_kafka: Any) -> None:
    p = sub.add_parser("replay", help="run a range of a request topic through a model or pipeline (offline batch)")
    add_kafka(p)
    g = p.add_argument_group("what to replay")
    g.add_argument("--topic", default=None, help="the topic holding the requests (default: the request topic)")
    g.add_argument("--offsets", default=None, help="per partition, end exclusive: 0:100-200,1:0-,2:-50")
    g.add_argument("--from", dest="from_time", default=None, help="first record at or after this time "
                                                                     "(epoch ms or ISO 8601)")
    g.add_argument("--to", dest="to_time", default=None, help="stop before the first record at or after this time")
    g = p.add_argument_group("how")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help="a model (default: STREAMER_MODEL)")
    what.add_argument("--pipeline", default=None, help="a pipeline spec (TOML) or a built-in name")
    g.add_argument("--device", default=None, help="torch device for every stage (default: the spec's, or auto)")
    g.add_argument("--batch-size", type=int, default=256, help="records per batch (default: 256)")
    g.add_argument("--processes", type=int, default=1,
                   help="split the range by partition over this many replay processes (default: 1, in-process)")
    g.add_argument("--keep-deadlines", action="store_true", help="honour request deadlines (default: ignore them)")
    g.add_argument("--republish", action="store_true",
                   help="feed the range to the live workers' input instead, under a separate reply topic")
    g.add_argument("--rate", type=float, default=200.0, help="--republish: requests/s at most (default: 200)")
    g = p.add_argument_group("where to")
    g.add_argument("--sink", required=True, help="FILE.jsonl, FILE.parquet, or topic:NAME")
    g.add_argument("--job", default=None, help="job name: the same name resumes (default: from topic, "
                                               "model and sink)")
    g.add_argument("--restart", action="store_true", help="forget the job's progress and start over")
    g.add_argument("--checkpoint-s", type=float, default=2.0,
                   help="how often the sink is made durable and progress committed (default: 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_replay, command_prog=p.prog)


def run_replay(args: argparse.Namespace) -> int:
    import uvloop

    overrides = {k: v for k, v in vars(args).items() if k in WorkerSettings.model_fields and v is not None}
    overrides.pop("model", None)
    overrides.pop("device", None)
    settings = load_settings(WorkerSettings, **overrides)
    if args.batch_size < 1 or args.processes < 1:
        raise ConfigError("--batch-size and --processes must be at least 1")
    return uvloop.run(_main(args, settings))


async def _main(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from rich.console import Console

    from ..kafka import preflight

    await preflight(settings, 0)  # consumers.replay imports torch: seconds

    from consumers.replay import job_running, parse_offsets, parse_time_ms, resolve_range

    topic = args.topic or settings.request_topic
    target = args.pipeline or args.model or settings.model
    job = args.job or _default_job(topic, target, args.sink, args.republish)
    spans = await resolve_range(
        settings, topic,
        offsets=parse_offsets(args.offsets) if args.offsets else None,
        from_ms=parse_time_ms(args.from_time) if args.from_time else None,
        to_ms=parse_time_ms(args.to_time) if args.to_time else None,
    )
    console = Console(stderr=True)
    async with job_running(settings, topic, job):
        return await _run_job(args, settings, topic, job, target, spans, console)


async def _run_job(args: argparse.Namespace, settings: WorkerSettings, topic: str, job: str, target: str,
                   spans: Any, console: Any) -> int:
    from consumers import replay

    if args.restart:
        await replay.forget(settings, topic, job)
        if args.republish:
            await replay.forget_replies(settings, job)
    how = {"model": None if args.pipeline else target, "pipeline": args.pipeline, "device": args.device,
           "batch_size": args.batch_size, "checkpoint_s": args.checkpoint_s, "keep_deadlines": args.keep_deadlines}
    with _Progress(console, args.no_progress) as progress:
        if args.republish:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            summary = await replay.republish(settings, topic, job, target, spans, args.sink, rate=args.rate,
                                             progress=progress, stop=stop, checkpoint_s=args.checkpoint_s)
        elif args.processes > 1:
            summary = await replay.replay_in_processes(settings, topic, job, spans, args.sink, args.processes,
                                                       restart=args.restart, progress=progress, **how)
        else:
            summary = await replay.replay_offline(settings, topic, job, spans, args.sink, progress=progress, **how)
    facts = summary.as_dict()
    state = "done" if summary.complete else "stopped (run the same command again to resume)"
    console.print(f"replay {job}: {state}. range {facts['range_size']} records; processed {facts['processed']}"
                  f"{f' (+{summary.done_before} before)' if summary.done_before else ''}: ok {facts['ok']}, "
                  f"errors {facts['errors']}, expired {facts['expired']}; {facts['elapsed_s']:.1f} s, "
                  f"{facts['rate_per_s']:,.0f}/s; sink {args.sink}")
    print(json.dumps({"job": job, **facts}))
    return 0 if summary.complete else 3


class _Progress:
    """A rich progress bar (records done of total, rate, ETA) used as a ``(done, total)`` callback."""

    def __init__(self, console: Any, disabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TimeRemainingColumn
        from rich.text import Text

        class Rate(TaskProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:,.0f}/s" if task.speed else "-/s")

        self._bar = Progress("replay", BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), Rate(),
                             TimeRemainingColumn(), console=console, disable=disabled)
        self._task: Any = None

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task("replay", total=total, completed=done)
        else:
            self._bar.update(self._task, completed=done)


def _default_job(topic: str, target: str, sink: str, republish: bool) -> str:
    digest = hashlib.sha1(f"{topic}|{target}|{sink}|{republish}".encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{topic}.{digest}"
