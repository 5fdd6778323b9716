"""Framework overhead: a streamer worker against the floor (bench/floor_loop.py), side by side.

At saturation on one broker with fresh topics per run (tiny-mlp, ~230-byte requests, 4 partitions,
batch 32), variants interleaved after a warm-up round: ``floor`` (a minimal aiokafka batch loop
with one torch thread), ``streamer`` (a worker with default settings) and ``streamer-1t`` (the
worker with one torch thread). Reports throughput and CPU microseconds per request of the serving
process (from /proc), the median of per-round ratios to the floor with min-max, and writes
bench/results/overhead.json. Usage: python bench/bench_overhead.py [--repeats 5] [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine, one  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402

VARIANTS = ("floor", "streamer", "streamer-1t")


def _ratio(rounds: list[dict[str, Any]], variant: str, field: str) -> dict[str, float]:
    ratios = [r[variant][field] / r["floor"][field] for r in rounds]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    broker = None if args.bootstrap else LocalKafka().start()
    bootstrap = args.bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
    rounds: list[dict[str, Any]] = []
    try:
        for v in VARIANTS:  # warm-up round
            await one(v, bootstrap, 500, None)
        for i in range(args.repeats):
            r = {v: await one(v, bootstrap, args.requests, None) for v in VARIANTS}
            rounds.append(r)
            print(f"round {i}: " + ", ".join(f"{v} {x['throughput']:,.0f}/s {x['cpu_s_per_request'] * 1e6:.0f} µs"
                                            for v, x in r.items()), flush=True)
    finally:
        if broker is not None:
            broker.stop()
    summary: dict[str, Any] = {}
    for v in VARIANTS:
        summary[f"{v}.throughput"] = statistics.median(r[v]["throughput"] for r in rounds)
        summary[f"{v}.cpu_us_per_request"] = statistics.median(r[v]["cpu_s_per_request"] for r in rounds) * 1e6
        if v != "floor":
            summary[f"{v}.throughput_vs_floor"] = _ratio(rounds, v, "throughput")
            summary[f"{v}.cpu_vs_floor"] = _ratio(rounds, v, "cpu_s_per_request")
    out = {"machine": machine(), "requests": args.requests, "rounds": rounds, "summary": summary}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "overhead.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
