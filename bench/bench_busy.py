"""How busy a worker keeps a model of known cost: the model thread's busy fraction at saturation.

A stand-in that takes a fixed 20 ms per batch (``bench.standins:sleep20``, batch 32) behind one streamer
worker, requests published as fast as they go; the worker's own metrics give the model time
(``streamer_inference_seconds_sum``) over the run's wall time. 1.0 would be a model that never waits
for the framework. Writes bench/results/busy.json.
Run: python bench/bench_busy.py [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import BATCH, Run, machine  # noqa: E402
from streamer.broker import LocalKafka, free_port  # noqa: E402

MODEL_MS = 20.0


def _model_seconds(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("streamer_inference_seconds_sum"))


async def once(bootstrap: str, seconds: float) -> dict[str, Any]:
    run = Run("streamer", bootstrap, "bench.standins:sleep20")
    port = free_port()
    run.env = {"STREAMER_METRICS_PORT": str(port)}
    await run.start()
    try:
        m0, t0 = await asyncio.to_thread(_model_seconds, port), time.perf_counter()
        result = await run.drive(int(BATCH / (MODEL_MS / 1000) * seconds), None)
        m1, t1 = await asyncio.to_thread(_model_seconds, port), time.perf_counter()
    finally:
        await run.stop()
    return {**result, "model_s": m1 - m0, "wall_s": t1 - t0, "busy": (m1 - m0) / (t1 - t0)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    broker = LocalKafka().start()
    try:
        runs = []
        for i in range(args.repeats):
            runs.append(await once(broker.bootstrap_servers, args.seconds))
            print(f"round {i}: {runs[-1]['throughput']:,.0f}/s, model thread busy {runs[-1]['busy']:.1%}", flush=True)
    finally:
        broker.stop()
    out = {"machine": machine(), "model_ms_per_batch": MODEL_MS, "batch": BATCH, "runs": runs,
           "busy_median": statistics.median(r["busy"] for r in runs),
           "model_limit_per_s": BATCH / (MODEL_MS / 1000)}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "busy.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
