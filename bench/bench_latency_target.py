"""Batching to a latency target against fixed batching settings, side by side, under a step load.

For each model, four variants of one ``streamer worker`` (max batch 32): ``adaptive`` (``--latency-target-ms``)
and the fixed settings ``wait0``, ``wait5`` and ``wait20`` (``max_wait_ms`` 0, 5, 20). Two phases, variants
interleaved, fresh topics per run:

1. saturation: N requests at once, every result awaited: throughput (``--repeats`` rounds, median);
2. a step load: ``--step-s`` seconds each at 15%, 80% and 15% of the best fixed variant's saturation
   throughput (light, near saturation, light again), open loop; each request's latency from its creation to
   its result's arrival; p99 per step (the median over ``--step-repeats`` interleaved runs), and p99 per second
   (the first run) for the plot.

Goals (issue 12): the adaptive worker keeps p99 under the target at every step where any fixed setting does,
and reaches at least 0.9x the best fixed setting's throughput at saturation.

Models: ``bench.standins:affine`` (5 ms + 0.5 ms per item, CPU free: a model with a known cost per batch) and
``minilm`` on the CPU. Writes bench/results/latency_target.json and latency_target.svg. Usage:
    python bench/bench_latency_target.py [--models affine,minilm] [--repeats 3] [--step-s 10] [--step-repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import Run, machine  # noqa: E402
from streamer import kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402

MODELS = {  # name -> (model spec, target ms, saturation requests)
    "affine": ("bench.standins:affine", 40.0, 6000),
    "minilm": ("minilm", 250.0, 600),
}
VARIANTS = ("adaptive", "wait0", "wait5", "wait20")
STEPS = (0.15, 0.8, 0.15)


def _run(variant: str, bootstrap: str, spec: str, target_ms: float) -> Run:
    run = Run("streamer", bootstrap, spec)
    update: dict[str, Any] = {"max_batch_size": 32}
    if variant == "adaptive":
        update.update(latency_target_ms=target_ms, max_wait_ms=0.0)
    else:
        update["max_wait_ms"] = float(variant.removeprefix("wait"))
    run.settings = run.settings.model_copy(update=update)
    run.env["STREAMER_TORCH_THREADS"] = "1"  # the bench's own client shares the two cores
    return run


async def _saturation(variant: str, bootstrap: str, spec: str, target_ms: float, n: int) -> float:
    run = _run(variant, bootstrap, spec, target_ms)
    await run.start()
    try:
        return float((await run.drive(n, None, warmup=min(200, n // 4)))["throughput"])
    finally:
        await run.stop()


async def _steps(variant: str, bootstrap: str, spec: str, target_ms: float, rates: list[float],
                 step_s: float) -> list[tuple[float, float]]:
    """(seconds since the start, latency ms) of each request of the step load."""
    run = _run(variant, bootstrap, spec, target_ms)
    await run.start()
    s = run.settings
    try:
        await run.drive(100, None)  # warm-up: the producers, and the adaptive worker's first measures
        producer = kafka.producer(s, linger_ms=1)
        consumer = kafka.consumer(s, s.results_topic, group_id=None, auto_offset_reset="latest")
        await producer.start()
        await consumer.start()
        await consumer.seek_to_end()
        sent: dict[str, float] = {}
        out: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        schedule = []  # the send time of each request
        at = 0.0
        for rate in rates:
            end = at + step_s
            while at < end:
                schedule.append(at)
                at += 1 / rate

        async def publish() -> None:
            for i, when in enumerate(schedule):
                delay = t0 + when - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                value, key, headers = run._request(i)
                sent[headers[2][1].decode()] = time.perf_counter()
                await producer.send(s.request_topic, value, key=key, headers=headers)
            await producer.flush()

        pub = asyncio.create_task(publish())
        try:
            async with asyncio.timeout(step_s * len(rates) + 120):
                while len(out) < len(schedule):
                    for records in (await consumer.getmany(timeout_ms=100)).values():
                        now = time.perf_counter()
                        for r in records:
                            rid = dict(r.headers).get("streamer-request-id")
                            start = sent.get(rid.decode()) if rid else None
                            if start is not None:
                                out.append((start - t0, (now - start) * 1000))
        finally:
            pub.cancel()
            await producer.stop()
            await consumer.stop()
        return out
    finally:
        await run.stop()


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def _svg(path: Path, panels: list[dict[str, Any]]) -> None:
    """p99 latency per second over the step load, one line per variant, the target dashed; one panel per model."""
    colours = {"adaptive": "#2b7bb9", "wait0": "#c0504d", "wait5": "#9bbb59", "wait20": "#8064a2"}
    w, h, pad = 640, 220, 50
    parts, y0 = [], 10
    for panel in panels:
        series: dict[str, list[tuple[float, float]]] = panel["per_second"]
        top = max([panel["target_ms"] * 2] + [v for pts in series.values() for _, v in pts if np.isfinite(v)])
        top = min(top, panel["target_ms"] * 4)
        span = max(t for pts in series.values() for t, _ in pts) + 1

        def xy(t: float, v: float, span: float = span, top: float = top, y0: int = y0) -> str:
            return f"{pad + (w - 2 * pad) * t / span:.1f},{y0 + 20 + h - h * min(v, top) / top:.1f}"

        parts.append(f'<text x="{pad}" y="{y0 + 14}" font-weight="bold">{panel["model"]}: p99 latency per second '
                     f'(ms), target {panel["target_ms"]:g} ms; load {panel["rates"]}</text>')
        parts.append(f'<line x1="{pad}" y1="{y0 + 20 + h}" x2="{w - pad}" y2="{y0 + 20 + h}" stroke="#999"/>')
        ty = y0 + 20 + h - h * panel["target_ms"] / top
        parts.append(f'<line x1="{pad}" y1="{ty:.1f}" x2="{w - pad}" y2="{ty:.1f}" stroke="#333" '
                     'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{w - pad + 4}" y="{ty + 4:.1f}">target</text>')
        parts.append(f'<text x="4" y="{y0 + 24}">{top:.0f}</text><text x="4" y="{y0 + 20 + h}">0</text>')
        for k, (variant, pts) in enumerate(series.items()):
            line = " ".join(xy(t, v) for t, v in pts if np.isfinite(v))
            parts.append(f'<polyline fill="none" stroke="{colours[variant]}" stroke-width="1.5" points="{line}"/>')
            parts.append(f'<text x="{pad + 110 * k}" y="{y0 + h + 40}" fill="{colours[variant]}">{variant}</text>')
        y0 += h + 60
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 60}" height="{y0}" font-family="sans-serif" ' \
           'font-size="12">'
    path.write_text("\n".join([head, *parts, "</svg>"]))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=10.0)
    ap.add_argument("--step-repeats", type=int, default=3, help="step loads per variant (median per step)")
    ap.add_argument("--out", default="latency_target", help="name of the JSON and SVG in bench/results")
    args = ap.parse_args()
    broker = LocalKafka().start()
    results: dict[str, Any] = {"machine": machine(), "steps": list(STEPS), "step_s": args.step_s, "models": {}}
    panels = []
    try:
        for name in args.models.split(","):
            spec, target, n = MODELS[name]
            for v in VARIANTS:  # warm-up round
                await _saturation(v, broker.bootstrap_servers, spec, target, n // 4)
            sat: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.repeats):
                for v in VARIANTS:
                    sat[v].append(await _saturation(v, broker.bootstrap_servers, spec, target, n))
                print(name, "saturation", {v: round(x[-1]) for v, x in sat.items()}, flush=True)
            best = max(statistics.median(sat[v]) for v in VARIANTS if v != "adaptive")
            rates = [round(best * f, 1) for f in STEPS]
            steps: dict[str, Any] = {v: {"runs": []} for v in VARIANTS}
            per_second: dict[str, list[tuple[float, float]]] = {}
            seconds = int(args.step_s * len(STEPS))
            for r in range(args.step_repeats):  # the light steps vary from run to run: repeats, interleaved
                for v in VARIANTS:
                    pts = await _steps(v, broker.bootstrap_servers, spec, target, rates, args.step_s)
                    by_step = [[lat for t, lat in pts if k * args.step_s <= t < (k + 1) * args.step_s]
                               for k in range(len(STEPS))]
                    second = [(t + 0.5, _p99([lat for s, lat in pts if t <= s < t + 1])) for t in range(seconds)]
                    steps[v]["runs"].append({
                        "p99_ms": [_p99(x) for x in by_step],
                        "p50_ms": [float(np.median(x)) if x else None for x in by_step],
                        "requests": [len(x) for x in by_step],
                        "p99_ms_per_second": [round(x, 1) for _, x in second]})
                    if r == 0:
                        per_second[v] = second
                    print(name, v, f"run {r + 1}: p99 per step", [round(x, 1) for x in steps[v]["runs"][-1]["p99_ms"]],
                          flush=True)
            for v in VARIANTS:  # the median over the repeats, step by step
                steps[v]["p99_ms"] = [statistics.median(run["p99_ms"][k] for run in steps[v]["runs"])
                                      for k in range(len(STEPS))]
            adaptive_sat = statistics.median(sat["adaptive"])
            met_steps: list[bool | None] = []  # per step; None: no fixed setting keeps the target there either
            for k in range(len(STEPS)):
                fixed_ok = any(steps[v]["p99_ms"][k] <= target for v in VARIANTS if v != "adaptive")
                met_steps.append(steps["adaptive"]["p99_ms"][k] <= target if fixed_ok else None)
            results["models"][name] = {
                "spec": spec, "target_ms": target, "rates": rates,
                "saturation": {v: {"median": statistics.median(x), "runs": x} for v, x in sat.items()},
                "adaptive_vs_best_fixed_throughput": adaptive_sat / best,
                "steps": steps, "p99_goal_met_per_step": met_steps,
            }
            panels.append({"model": name, "target_ms": target, "rates": rates, "per_second": per_second})
    finally:
        broker.stop()
    out = ROOT / "bench" / "results"
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    _svg(out / f"{args.out}.svg", panels)
    print(json.dumps({m: {k: r[k] for k in ("rates", "adaptive_vs_best_fixed_throughput", "p99_goal_met_per_step")}
                      | {"p99": {v: s["p99_ms"] for v, s in r["steps"].items()}}
                      for m, r in results["models"].items()}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
