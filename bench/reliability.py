"""Run the fault suite (tests/faults) with larger loads than CI uses and write RELIABILITY.md.

Every case runs real worker processes against real Apache Kafka brokers (one node, or three
for the leader-failure case) under steady keyed load, and reports: requests, lost, duplicates
(raw, and after the client's de-duplication), per-key order violations, and seconds to recover
(the longest any request published around the fault waited for its result).

Usage: python bench/reliability.py [--scale 3]   (scale multiplies each case's request count)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=3.0, help="multiplies each case's request count")
    ap.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "STREAMER_FAULT_SCALE": str(args.scale), "STREAMER_FAULT_REPORT": str(report)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider",
                               "-o", "timeout=1800"], cwd=ROOT, env=env, check=False)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    lines = [
        "# Reliability",
        "",
        f"Written by `bench/reliability.py --scale {args.scale:g}` on {datetime.date.today()}; "
        f"the suite {'passed' if proc.returncode == 0 else 'FAILED (exit ' + str(proc.returncode) + ')'}.",
        f"Machine: {machine()}; Apache Kafka 4.1.1 from Maven Central jars, broker, workers and load generator",
        "on the same cores. Each case: real `streamer worker` processes, steady keyed load, figures counted at",
        "the end. Raw duplicates are results on the reply topic (read_committed in exactly-once mode); the",
        "client drops repeats by request id. Seconds to recover: the longest any request published around",
        "the fault waited for its result.",
        "",
        "| fault | mode | requests | lost | duplicates raw | after de-dup | order violations | s to recover |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['case']} | {r['mode']} | {r['requests']} | {r['lost']} | {r['duplicates_raw']} | "
        f"{r['duplicates_after_dedup']} | {r['order_violations']} | {r['recover_s']:.1f} |"
        for r in rows if "requests" in r
    )
    other = [r["line"] for r in rows if "requests" not in r]
    if other:
        lines += ["", "Other cases:", "", *(f"- {line}" for line in other)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
