"""Exactly-once against at-least-once, and against the exactly-once of an earlier checkout, side by side.

One broker, tiny-mlp, 4 partitions, one serving process (``bench_worker.Run``); variants interleaved in each
round (after ``--warmup-rounds`` not counted): ``alo`` (at-least-once), ``eos`` (exactly-once) and, with
``--baseline DIR`` (a checkout of an earlier commit, its serving process started from there), ``eos@base``.
``--rate R``: p50/p99 at R requests/s for ``--seconds``, after 500 to warm up (results read ``read_committed``,
as the client reads them); ``--rate 0``: saturation (``--requests``). Medians, and per-round ratios to ``alo``.
Writes bench/results/eos[-saturation].json.
Usage: python bench/bench_eos.py [--rate 3000] [--repeats 5] [--baseline DIR]
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

from bench.bench_worker import Run, machine  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402


async def one(variant: str, bootstrap: str, rate: float, seconds: float, requests: int,
              baseline: str) -> dict[str, Any]:
    run = Run("streamer" if variant == "alo" else "streamer-eos", bootstrap, "tiny-mlp")
    if variant.endswith("@base"):
        run.cwd = baseline
        run.env = {"PYTHONPATH": baseline}
    await run.start()
    try:
        return await run.drive(int(rate * seconds) if rate else requests, rate or None, warmup=500)
    finally:
        await run.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=3000.0, help="requests/s (0: saturation)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--requests", type=int, default=20000, help="at saturation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default="", help="a checkout of an earlier commit, for eos@base")
    ap.add_argument("--warmup-rounds", type=int, default=1,
                    help="rounds run first and not counted: a fresh broker's first transactions create its "
                         "transaction log, and its JIT warms up (the first round was 1.8-3x slower)")
    args = ap.parse_args()
    variants = ["alo", "eos"] + (["eos@base"] if args.baseline else [])
    broker = LocalKafka().start()
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(-args.warmup_rounds, args.repeats):
            r = {v: await one(v, broker.bootstrap_servers, args.rate, args.seconds, args.requests, args.baseline)
                 for v in variants}
            if i >= 0:
                rounds.append(r)
            label = "round" if i >= 0 else "warm-up round"
            print(f"{label} {i}: " + ", ".join(f"{v} p50 {x['p50_ms']:.1f} ms p99 {x['p99_ms']:.1f} ms "
                                            f"{x['throughput']:,.0f}/s {x['cpu_s_per_request'] * 1e6:.0f} µs"
                                            for v, x in r.items()), flush=True)
    finally:
        broker.stop()
    summary: dict[str, Any] = {}
    for v in variants:
        for field in ("p50_ms", "p99_ms", "throughput", "cpu_s_per_request"):
            summary[f"{v}.{field}"] = statistics.median(r[v][field] for r in rounds)
        if v != "alo":
            for field in ("p50_ms", "throughput"):
                ratios = sorted(r[v][field] / r["alo"][field] for r in rounds)
                summary[f"{v}.{field}_vs_alo"] = {"median": statistics.median(ratios), "min": ratios[0],
                                                 "max": ratios[-1]}
    out = {"machine": machine(), "rate": args.rate, "baseline": args.baseline, "rounds": rounds,
           "summary": summary}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = "eos.json" if args.rate else "eos-saturation.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
