"""``streamer demo``: the whole system end to end on an embedded broker.

Starts Apache Kafka and N worker processes (``streamer worker``, exactly as a user would), then
measures two honest figures: throughput at saturation (M keyed requests at once, every result
awaited), and latency at a steady rate below it (``--rate``, default half that throughput, for
``--rate-seconds``), with the batch sizes that resulted; every result is checked against the model
run directly.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ClientSettings, WorkerSettings, load_settings, settings_env
from ..testing import WorkerProcess

__all__ = ["run_demo"]


def _took(latencies: list[float], start: float, _fut: Any) -> None:
    latencies.append((time.perf_counter() - start) * 1000)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..broker import LocalKafka

    console = Console(stderr=True)
    external = args.bootstrap_servers or os.environ.get("STREAMER_BOOTSTRAP_SERVERS")
    broker = None
    if not external:
        console.print("[bold]starting Apache Kafka[/] (jars from Maven Central, cached after the first run)")
        broker = LocalKafka(jit="quick").start()  # a broker of a minute: no compiling phase (BENCHMARKS.md)
        args.bootstrap_servers = broker.bootstrap_servers
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

    from .. import kafka

    await kafka.ensure_topics(ws, [
        kafka.TopicSpec(ws.request_topic, args.partitions),
        kafka.TopicSpec(ws.results_topic, args.partitions),
        kafka.TopicSpec(ws.dead_letter_topic, 1),
    ])
    from ..models import load_model  # torch: seconds, once the cluster answered

    console.print(f"broker: {ws.bootstrap_servers}")
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
    async with StreamerClient(csettings) as client:
        # 1. Saturation: every request at once (at most max_in_flight outstanding). Throughput is the figure; the
        # latency of a request queued behind thousands of others says nothing about the system, so none is shown.
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, disable=args.no_progress) as progress:
            task = progress.add_task("saturation", total=args.requests)
            pending = []
            for i, x in enumerate(inputs):
                fut = await client.submit(x, model=model.name, key=f"key-{i % args.keys}")
                fut.add_done_callback(lambda _f: progress.advance(task))
                pending.append(fut)
            results = list(await asyncio.gather(*pending))
            elapsed = time.perf_counter() - t0
        saturated = args.requests / elapsed
        batch_sat = [r.timings.batch_size for r in results if r.timings]

        # 2. A steady rate below it (--rate, default half the measured throughput): the latency a request sees.
        rate = args.rate or saturated / 2
        steady_n = max(1, min(int(rate * args.rate_seconds), 50_000))
        steady_inputs = model.example_inputs(steady_n, seed=8)
        latencies: list[float] = []
        futures = []
        t1 = time.perf_counter()
        for i, x in enumerate(steady_inputs):
            delay = t1 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.perf_counter()
            fut = await client.submit(x, model=model.name, key=f"key-{i % args.keys}")
            fut.add_done_callback(functools.partial(_took, latencies, start))
            futures.append(fut)
        steady = list(await asyncio.gather(*futures))
        duplicates = client.duplicates_dropped

    expected = [y for start in range(0, len(inputs), 64) for y in model.run(inputs[start:start + 64])]
    bad = [i for i, (r, y) in enumerate(zip(results, expected, strict=True))
           if not np.allclose(r.outputs, y, rtol=1e-4, atol=1e-5)]
    expected_steady = [y for start in range(0, steady_n, 64) for y in model.run(steady_inputs[start:start + 64])]
    bad_steady = [i for i, (r, y) in enumerate(zip(steady, expected_steady, strict=True))
                  if not np.allclose(r.outputs, y, rtol=1e-4, atol=1e-5)]
    per_worker: dict[str, int] = {}
    for r in results:
        per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
    batch_steady = [r.timings.batch_size for r in steady if r.timings]
    console.print(f"\n[bold]saturation[/]: {args.requests} requests at once through {len(per_worker)} workers in "
                  f"{elapsed:.2f} s: [bold]{saturated:,.0f} requests/s[/], mean batch {np.mean(batch_sat):.1f}"
                  " (the most they served with work queued up)")
    console.print(f"[bold]steady {rate:,.0f}/s[/] for {args.rate_seconds:g} s ({steady_n} requests; --rate to choose): "
                  f"latency p50 [bold]{_percentile(latencies, 50):.1f} ms[/], p99 {_percentile(latencies, 99):.1f} ms, "
                  f"mean batch {np.mean(batch_steady):.1f} (from publish to result, what a request waits at that "
                  f"load); duplicates dropped {duplicates}")
    console.print("results per worker: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_worker.items())))
    if bad or bad_steady:
        console.print(f"[red]{len(bad) + len(bad_steady)} results differ from the model's direct output[/] "
                      f"(first: {(bad or bad_steady)[:5]})")
        return 1
    console.print(f"[green]all {args.requests} results match the model run directly[/], "
                  f"and all {steady_n} of the steady run")
    return 0
