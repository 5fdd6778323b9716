"""``streamer demo``: the whole system end to end on an embedded broker.

Starts Apache Kafka and N worker processes (``streamer worker``, exactly as a user would),
publishes M keyed requests, awaits every result, checks each against the model run
directly, and prints throughput and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import ClientSettings, WorkerSettings, load_settings, settings_env

__all__ = ["WorkerProcess", "run_demo"]


class WorkerProcess:
    """``streamer worker`` (or another ``streamer`` command) as a child process, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra_args: str, command: str = "worker") -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", command, *extra_args],
            env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .broker import LocalKafka

    console = Console(stderr=True)
    external = args.bootstrap_servers or os.environ.get("STREAMER_BOOTSTRAP_SERVERS")
    broker = None
    if not external:
        console.print("[bold]starting Apache Kafka[/] (jars from Maven Central, cached after the first run)")
        broker = LocalKafka().start()
        args.bootstrap_servers = broker.bootstrap_servers
    console.print(f"broker: {args.bootstrap_servers}")
    workdir = Path(tempfile.mkdtemp(prefix="streamer-demo-"))
    workers: list[WorkerProcess] = []
    try:
        overrides = {k: v for k, v in vars(args).items() if v is not None}
        wsettings = load_settings(WorkerSettings, **{k: v for k, v in overrides.items()
                                                    if k in WorkerSettings.model_fields})
        env = settings_env(wsettings)
        import uvloop

        return uvloop.run(_demo(args, wsettings, env, workdir, workers, console))
    finally:
        codes = [w.stop() for w in workers]
        if workers:
            console.print(f"workers stopped (exit codes {codes}); logs in {workdir}")
        if broker is not None:
            broker.stop()
            console.print("broker stopped")


async def _demo(args: argparse.Namespace, ws: WorkerSettings, env: dict[str, str], workdir: Path,
                workers: list[WorkerProcess], console: Any) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from producers import StreamerClient

    from . import kafka
    from .models import load_model

    await kafka.ensure_topics(ws, [
        kafka.TopicSpec(ws.request_topic, args.partitions),
        kafka.TopicSpec(ws.results_topic, args.partitions),
        kafka.TopicSpec(ws.dead_letter_topic, 1),
    ])
    workers.extend(WorkerProcess(env, workdir / f"worker-{i}.log") for i in range(args.workers))
    model = load_model(ws.model, "cpu")
    inputs = model.example_inputs(args.requests, seed=7)
    if args.workers:
        console.print(f"started {args.workers} workers serving {ws.model}; waiting for the group to settle")
        await kafka.wait_for_group(ws, ws.group_id, args.workers, timeout_s=180)
    else:
        console.print(f"using the running workers of group {ws.group_id}; waiting for at least one")
        await kafka.wait_for_group(ws, ws.group_id, 1, timeout_s=300, at_least=True)

    csettings = load_settings(ClientSettings, **{k: v for k, v in ws.model_dump().items()
                                                  if k in ClientSettings.model_fields}, timeout_s=300)
    latencies: list[float] = []
    results: dict[int, Any] = {}
    async with StreamerClient(csettings) as client:
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, disable=args.no_progress) as progress:
            task = progress.add_task("inference", total=args.requests)

            async def one(i: int, x: Any) -> None:
                start = time.perf_counter()
                results[i] = await client.infer(x, model=model.name, key=f"key-{i % args.keys}")
                latencies.append((time.perf_counter() - start) * 1000)
                progress.advance(task)

            await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs)))
        elapsed = time.perf_counter() - t0
        duplicates = client.duplicates_dropped

    expected = [y for start in range(0, len(inputs), 64) for y in model.run(inputs[start:start + 64])]
    bad = [i for i, y in enumerate(expected) if not np.allclose(results[i].outputs, y, rtol=1e-4, atol=1e-5)]
    per_worker: dict[str, int] = {}
    for r in results.values():
        per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
    batch_sizes = [r.timings.batch_size for r in results.values() if r.timings]
    console.print(f"\n[bold]{args.requests} requests[/] through {len(per_worker)} workers in {elapsed:.2f} s: "
                  f"[bold]{args.requests / elapsed:,.0f} requests/s[/]")
    console.print(f"latency p50 {_percentile(latencies, 50):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms; "
                  f"mean batch {np.mean(batch_sizes):.1f}; duplicates dropped {duplicates}")
    console.print("results per worker: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_worker.items())))
    if bad:
        console.print(f"[red]{len(bad)} results differ from the model's direct output[/] (first: {bad[:5]})")
        return 1
    console.print(f"[green]all {args.requests} results match the model run directly[/]")
    return 0
