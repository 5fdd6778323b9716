"""The demo's broker: the JVM's full JIT against its first compiler only (``LocalKafka(jit=...)``), side by side.

Each round starts a fresh broker of each kind (in turn, the first kind alternating between rounds), times its
start (to ready, and the CPU the JVM used meanwhile), then runs ``streamer demo --workers 2`` against it, as
``make demo`` does on its own broker (a fresh one, for about a minute), and reads the demo's own figures:
throughput at saturation, and p50/p99 at its steady rate (half that throughput). The broker's CPU over the demo
is read from ``/proc``. Writes bench/results/demo_broker.json.
Run: python bench/bench_demo_broker.py [--repeats 3] [--requests 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import _cpu_seconds, machine  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402

KINDS = ("full", "quick")


def one(jit: str, requests: int) -> dict[str, Any]:
    t0 = time.monotonic()
    broker = LocalKafka(jit=jit).start()
    try:
        ready_s = time.monotonic() - t0
        assert broker.pid is not None
        start_cpu = _cpu_seconds(broker.pid)
        done = subprocess.run(
            [sys.executable, "-m", "streamer", "demo", "--bootstrap-servers", broker.bootstrap_servers,
             "--workers", "2", "--requests", str(requests), "--no-progress"],
            capture_output=True, text=True, timeout=600, check=True, cwd=ROOT,
            env={**os.environ, "COLUMNS": "400"})
        demo_cpu = _cpu_seconds(broker.pid) - start_cpu
    finally:
        broker.stop()
    text = " ".join(done.stderr.split())
    sat = re.search(r"([\d,]+) requests/s", text)
    steady = re.search(r"steady ([\d,]+)/s .*?latency p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
    if sat is None or steady is None:
        raise RuntimeError(f"unexpected demo output:\n{done.stderr}")
    return {"jit": jit, "ready_s": ready_s, "start_cpu_s": start_cpu, "demo_broker_cpu_s": demo_cpu,
            "saturation_rps": float(sat.group(1).replace(",", "")),
            "steady_rps": float(steady.group(1).replace(",", "")),
            "p50_ms": float(steady.group(2)), "p99_ms": float(steady.group(3))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for jit in (KINDS if r % 2 == 0 else KINDS[::-1]):
            run = one(jit, args.requests)
            runs.append({"round": r, **run})
            print(json.dumps(runs[-1]), flush=True)
    summary: dict[str, Any] = {}
    for jit in KINDS:
        mine = [x for x in runs if x["jit"] == jit]
        summary[jit] = {k: statistics.median(x[k] for x in mine)
                        for k in ("ready_s", "start_cpu_s", "demo_broker_cpu_s", "saturation_rps", "steady_rps",
                                  "p50_ms", "p99_ms")}
    ratios = [q["saturation_rps"] / f["saturation_rps"]
              for f, q in zip([x for x in runs if x["jit"] == "full"], [x for x in runs if x["jit"] == "quick"],
                              strict=True)]
    summary["saturation_quick_over_full"] = {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios)}
    out = {"machine": machine(), "requests": args.requests, "runs": runs, "summary": summary}
    path = ROOT / "bench" / "results" / "demo_broker.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
