"""Exactly-once against at-least-once, and against the exactly-once of an earlier checkout, side by side.

One broker, warmed up first (``bench_worker.warm_broker``), tiny-mlp, 4 partitions, one serving process
(``bench_worker.Run``); variants interleaved in each round, each round starting with the next variant (after
``--warmup-rounds`` not counted): ``alo`` (at-least-once), ``eos`` (exactly-once) and, with
``--baseline DIR`` (a checkout of an earlier commit, its serving process started from there), ``eos@base``.
``--rate R``: p50/p99 at R requests/s for ``--seconds``, after 500 to warm up (results read ``read_committed``,
as the client reads them); ``--rate 0``: saturation (``--requests``); ``--half``: at half of the saturation
``alo`` reaches on this machine, measured first (the issue's goal is set there, and a rate fixed on one machine
is near saturation on a slower one). ``--transaction-ms 25,50`` adds exactly-once variants with those
``transaction_ms`` (``eos-25ms``, ...). Each run also records how busy the machine was (``machine_busy``, share of
all its cores, from /proc/stat) and the broker's CPU (``broker_cores``). Medians, and per-round ratios to ``alo``.
Writes bench/results/eos[-half|-saturation].json (or ``--out NAME``).
Usage: python bench/bench_eos.py [--rate 3000 | --half] [--repeats 5] [--baseline DIR] [--transaction-ms 25]
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
from streamer.broker import LocalKafka, free_port  # noqa: E402


async def one(variant: str, broker: LocalKafka, rate: float, seconds: float, requests: int,
              baseline: str) -> dict[str, Any]:
    run = Run("streamer" if variant == "alo" else "streamer-eos", broker.bootstrap_servers, "tiny-mlp")
    if variant.endswith("@base"):
        run.cwd = baseline
        run.env = {"PYTHONPATH": baseline}
    if variant.endswith("ms") and "-" in variant:  # eos-<ms>ms: another transaction_ms
        run.env["STREAMER_TRANSACTION_MS"] = variant.split("-", 1)[1].removesuffix("ms")
    if variant != "alo":  # the worker's transactions, as its metrics count them (drive_measured)
        run.env["STREAMER_METRICS_PORT"] = str(free_port())
    return await drive_measured(run, broker, int(rate * seconds) if rate else requests, rate or None)


def _txn_line(t: dict[str, float] | None) -> str:
    if not t:
        return ""
    return (f"; {t['per_s']:.0f} txn/s of {t['items']:.0f} items, open {t['open_ms']:.1f} ms, "
            f"deliver {t['deliver_ms']:.1f} ms, end {t['end_ms']:.1f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=3000.0, help="requests/s (0: saturation)")
    ap.add_argument("--half", action="store_true",
                    help="at half the saturation of at-least-once, measured first (overrides --rate)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--requests", type=int, default=20000, help="at saturation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default="", help="a checkout of an earlier commit, for eos@base")
    ap.add_argument("--out", default="", help="the results file's name in bench/results (default: by the mode)")
    ap.add_argument("--transaction-ms", default="",
                    help="comma-separated transaction_ms values to run as more variants (eos-<ms>ms)")
    ap.add_argument("--warmup-rounds", type=int, default=1,
                    help="rounds run first and not counted, after the broker's warm-up (bench_worker.warm_broker: "
                         "a fresh broker's first transactions create its transaction log, and its JIT compiles)")
    args = ap.parse_args()
    variants = (["alo", "eos"] + (["eos@base"] if args.baseline else [])
                + [f"eos-{ms.strip()}ms" for ms in args.transaction_ms.split(",") if ms.strip()])
    broker = LocalKafka().start()
    rounds: list[dict[str, Any]] = []
    saturation = None
    try:
        await warm_broker(broker, ("streamer", "streamer-eos"))
        if args.half:
            saturation = statistics.median([(await one("alo", broker, 0, 0, args.requests, ""))
                                            ["throughput"] for _ in range(3)])
            args.rate = round(saturation / 2, -2)
            print(f"at-least-once saturation {saturation:,.0f}/s: measuring at {args.rate:,.0f}/s", flush=True)
        for i in range(-args.warmup_rounds, args.repeats):
            turn = i % len(variants)  # each variant first in turn: none always runs after the same one
            r = {v: await one(v, broker, args.rate, args.seconds, args.requests, args.baseline)
                 for v in variants[turn:] + variants[:turn]}
            if i >= 0:
                rounds.append(r)
            label = "round" if i >= 0 else "warm-up round"
            print(f"{label} {i}: " + ", ".join(f"{v} p50 {x['p50_ms']:.1f} ms p99 {x['p99_ms']:.1f} ms "
                                            f"{x['throughput']:,.0f}/s {x['cpu_s_per_request'] * 1e6:.0f} µs, "
                                            f"machine {x['machine_busy']:.0%} busy, broker {x['broker_cores']:.2f}"
                                            + _txn_line(x.get("transactions"))
                                            for v, x in r.items()), flush=True)
    finally:
        broker.stop()
    summary: dict[str, Any] = {}
    for v in variants:
        for field in ("p50_ms", "p99_ms", "throughput", "cpu_s_per_request", "machine_busy", "broker_cores"):
            summary[f"{v}.{field}"] = statistics.median(r[v][field] for r in rounds)
        txns = [r[v]["transactions"] for r in rounds if r[v].get("transactions")]
        for field in txns[0] if txns else ():
            summary[f"{v}.transactions.{field}"] = statistics.median(t[field] for t in txns)
        if v != "alo":
            for field in ("p50_ms", "throughput"):
                ratios = sorted(r[v][field] / r["alo"][field] for r in rounds)
                summary[f"{v}.{field}_vs_alo"] = {"median": statistics.median(ratios), "min": ratios[0],
                                                 "max": ratios[-1]}
    out = {"machine": machine(), "rate": args.rate, "alo_saturation": saturation, "baseline": args.baseline,
           "rounds": rounds, "summary": summary}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = args.out or ("eos-half.json" if args.half else "eos.json" if args.rate else "eos-saturation.json")
    (ROOT / "bench" / "results" / name).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
