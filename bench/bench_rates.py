"""The worker against the worker of an earlier checkout, side by side at several fixed rates and at saturation.

One broker, warmed up first (``bench_worker.warm_broker``), tiny-mlp, 4 partitions, one serving process
(``bench_worker.Run``, at-least-once); in each round ``new`` (this tree) and ``base`` (``--baseline DIR``, its
serving process started from there), the first of them alternating. Each run records p50/p99, throughput, the
serving process's CPU per request, how busy the whole machine was (/proc/stat) and the broker's CPU.
Writes bench/results/rates.json (or ``--out NAME``).
Usage: python bench/bench_rates.py --baseline DIR [--rates 200,1500,0] [--repeats 3]
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

from bench.bench_worker import Run, drive_measured, machine, warm_broker  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402


async def one(variant: str, broker: LocalKafka, rate: float, seconds: float, requests: int,
              baseline: str) -> dict[str, Any]:
    run = Run("streamer", broker.bootstrap_servers, "tiny-mlp")
    if variant == "base":
        run.cwd = baseline
        run.env = {"PYTHONPATH": baseline}
    return await drive_measured(run, broker, int(rate * seconds) if rate else requests, rate or None)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of an earlier commit")
    ap.add_argument("--rates", default="200,1500,0", help="requests/s, comma-separated (0: saturation)")
    ap.add_argument("--seconds", type=float, default=5.0, help="at a fixed rate")
    ap.add_argument("--requests", type=int, default=20000, help="at saturation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="rates.json")
    args = ap.parse_args()
    broker = LocalKafka().start()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        await warm_broker(broker, ("streamer",))
        for rate in (float(r) for r in args.rates.split(",")):
            rounds = runs[f"{rate:g}"] = []
            for i in range(args.repeats):
                order = ["new", "base"] if i % 2 == 0 else ["base", "new"]
                r = {v: await one(v, broker, rate, args.seconds, args.requests, args.baseline) for v in order}
                rounds.append(r)
                print(f"{rate:g}/s round {i}: " + ", ".join(
                    f"{v} p50 {x['p50_ms']:.1f} ms {x['throughput']:,.0f}/s {x['cpu_s_per_request'] * 1e6:.0f} µs, "
                    f"machine {x['machine_busy']:.0%}, broker {x['broker_cores']:.2f}" for v, x in r.items()),
                    flush=True)
    finally:
        broker.stop()
    summary: dict[str, Any] = {}
    for name, rounds in runs.items():
        for field in ("p50_ms", "throughput", "cpu_s_per_request"):
            ratios = sorted(r["new"][field] / r["base"][field] for r in rounds)
            summary[f"{name}.{field}_new_vs_base"] = {"median": statistics.median(ratios), "min": ratios[0],
                                                       "max": ratios[-1]}
    out = {"machine": machine(), "baseline": args.baseline, "runs": runs, "summary": summary}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
