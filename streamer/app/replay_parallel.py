"""``streamer replay --processes N``: the range split by partition over N child replay jobs.

Child ``i`` replays the partitions at positions ``i, i + N, ...`` of the range, as its own job
``<job>.<i>of<N>`` (so each resumes on its own), into its own part file
``<sink>.<i>of<N>.jsonl`` (or straight into the topic of a ``topic:`` sink). When every child
has finished, the parts are joined into the sink (child by child), then removed. Run again
with the same N, a stopped job resumes child by child.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import WorkerSettings, settings_env
from ..ranges import Span
from ..replay_jobs import ReplaySummary, read_plan
from ..sinks import _jsonl_to_parquet

__all__ = ["replay_in_processes"]


def _part(sink: str, i: int, n: int) -> str:
    return sink if sink.startswith("topic:") else f"{sink}.{i}of{n}.jsonl"


async def replay_in_processes(args: Any, settings: WorkerSettings, topic: str, job: str, spans: list[Span],
                              progress: Any) -> ReplaySummary:
    n = min(args.processes, max(1, len(spans)))
    shares = [spans[i::n] for i in range(n)]
    env = {**os.environ, **settings_env(settings)}
    if not settings.torch_threads:
        env["STREAMER_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    children = []
    for i, share in enumerate(shares):
        argv = [sys.executable, "-m", "streamer", "--log-level", "WARNING", "replay", "--no-progress",
                "--topic", topic, "--offsets", ",".join(f"{s.partition}:{s.start}-{s.end}" for s in share),
                "--batch-size", str(args.batch_size), "--checkpoint-s", str(args.checkpoint_s),
                "--sink", _part(args.sink, i, n), "--job", f"{job}.{i}of{n}"]
        argv += ["--pipeline", args.pipeline] if args.pipeline else ["--model", args.model or settings.model]
        argv += ["--device", args.device] if args.device else []
        argv += ["--keep-deadlines"] if args.keep_deadlines else []
        argv += ["--restart"] if args.restart else []
        children.append(await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for c in children:
            if c.returncode is None:
                c.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    total = sum(s.size for s in spans)
    watcher = asyncio.create_task(_watch(settings, topic, [f"{job}.{i}of{n}" for i in range(n)], total, progress))
    try:
        outs = await asyncio.gather(*(c.communicate() for c in children))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    facts = []
    for i, (c, (out, _)) in enumerate(zip(children, outs, strict=True)):
        lines = out.decode().strip().splitlines()
        if c.returncode not in (0, 3) or not lines:
            raise RuntimeError(f"replay child {i} exited {c.returncode}")
        facts.append(json.loads(lines[-1]))
    summary = ReplaySummary(range_size=sum(f["range_size"] for f in facts),
                            done_before=sum(f["done_before"] for f in facts),
                            processed=sum(f["processed"] for f in facts),
                            statuses=Counter({"ok": sum(f["ok"] for f in facts),
                                              "error": sum(f["errors"] for f in facts),
                                              "expired": sum(f["expired"] for f in facts)}),
                            elapsed_s=max(f["elapsed_s"] for f in facts),
                            complete=all(f["complete"] for f in facts))
    if progress:
        progress(summary.done_before + summary.processed, summary.range_size)
    parts = [Path(_part(args.sink, i, n)) for i in range(n)]
    if summary.complete and not args.sink.startswith("topic:") and any(p.exists() for p in parts):
        await asyncio.to_thread(_join, parts, Path(args.sink))
    return summary


def _join(parts: list[Path], sink: Path) -> None:
    joined = sink.with_name(sink.name + ".joined.jsonl")
    with joined.open("wb") as out:
        for part in parts:
            if not part.exists():
                continue  # that child's share had finished in an earlier run that was joined already
            with part.open("rb") as src:
                shutil.copyfileobj(src, out)
    if sink.suffix == ".parquet":
        _jsonl_to_parquet(joined, sink)
        joined.unlink()
    else:
        joined.replace(sink)
    for part in parts:
        part.unlink(missing_ok=True)


async def _watch(settings: WorkerSettings, topic: str, jobs: list[str], total: int, progress: Any) -> None:
    """Progress from the children's committed plans, every second."""
    while progress:
        done = 0
        for j in jobs:
            try:
                whole, left, _ = await read_plan(settings, topic, j, [])
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            done += sum(s.size for s in whole) - sum(s.size for s in left)
        progress(done, total)
        await asyncio.sleep(1.0)
