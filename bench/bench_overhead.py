"""Framework overhead: a streamer worker against the floor (bench/floor_loop.py), side by side.

At saturation on one broker with fresh topics per run (~230-byte requests, 4 partitions, batch 32),
variants interleaved after a warm-up round: ``floor`` (a minimal aiokafka batch loop with one torch
thread), ``streamer`` (a worker with default settings), ``streamer-1t`` (the worker with one torch
thread), ``streamer-eos`` (exactly-once) and ``faststream`` (a FastStream batch subscriber,
bench/faststream_loop.py; skipped unless FastStream is installed). ``--model`` picks tiny-mlp or a
stand-in (``bench.standins:embed384``: 384-d float32 outputs; ``bench.standins:ids384``: token ids in,
384-d out, the encode stage of ``minilm-2stage`` without its encoder). Reports throughput and CPU
microseconds per request of the serving process (from /proc), the median of per-round ratios to the
floor with min-max; then p50/p99 latency at a fixed rate of half the slowest variant's saturation, after 500
requests to warm up, results read ``read_committed`` as the client reads them.
Writes bench/results/overhead[-MODEL].json.
Usage: python bench/bench_overhead.py [--repeats 5] [--requests 4000] [--model SPEC] [--variants a,b]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine, one  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402

VARIANTS = ("floor", "streamer", "streamer-1t", "streamer-eos", "faststream")


def _ratio(rounds: list[dict[str, Any]], variant: str, field: str, base: str) -> dict[str, float]:
    ratios = [r[variant][field] / r[base][field] for r in rounds]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--model", default="tiny-mlp")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--fixed-seconds", type=float, default=4.0, help="length of each fixed-rate run (0: none)")
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--out", default=None, help="the result file's name in bench/results (default: from the model)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",")
                if not v.startswith("faststream") or importlib.util.find_spec("faststream")]
    base = variants[0]  # the floor comes first: every ratio is to it
    broker = None if args.bootstrap else LocalKafka().start()
    bootstrap = args.bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
    rounds: list[dict[str, Any]] = []
    fixed: dict[str, Any] = {}
    try:
        for v in variants:  # warm-up round
            await one(v, bootstrap, 500, None, args.model)
        for i in range(args.repeats):
            r = {v: await one(v, bootstrap, args.requests, None, args.model) for v in variants}
            rounds.append(r)
            print(f"round {i}: " + ", ".join(f"{v} {x['throughput']:,.0f}/s {x['cpu_s_per_request'] * 1e6:.0f} µs"
                                            for v, x in r.items()), flush=True)
        if args.fixed_seconds:
            rate = 0.5 * min(statistics.median(r[v]["throughput"] for r in rounds) for v in variants)
            fixed = {"rate": rate, "results": {}}
            for v in variants:
                x = await one(v, bootstrap, int(rate * args.fixed_seconds), rate, args.model, warmup=500)
                fixed["results"][v] = x
                print(f"at {rate:,.0f}/s: {v} p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms", flush=True)
    finally:
        if broker is not None:
            broker.stop()
    summary: dict[str, Any] = {}
    for v in variants:
        summary[f"{v}.throughput"] = statistics.median(r[v]["throughput"] for r in rounds)
        summary[f"{v}.cpu_us_per_request"] = statistics.median(r[v]["cpu_s_per_request"] for r in rounds) * 1e6
        if v != base:
            summary[f"{v}.throughput_vs_floor"] = _ratio(rounds, v, "throughput", base)
            summary[f"{v}.cpu_vs_floor"] = _ratio(rounds, v, "cpu_s_per_request", base)
    out = {"machine": machine(), "model": args.model, "variants": variants, "requests": args.requests,
           "rounds": rounds, "fixed_rate": fixed, "summary": summary}
    name = "overhead" if args.model == "tiny-mlp" else f"overhead-{args.model.rpartition(':')[2]}"
    if base.endswith("-hop"):
        name += "-hop"
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / (args.out or f"{name}.json")).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
