"""Run the fault suite (tests/faults) with larger loads than CI uses and write RELIABILITY.md.

Every case runs real worker processes against real Apache Kafka brokers (one node, or three
for the leader-failure case) under steady keyed load, and reports: requests, lost, duplicates
(raw, and after the client's de-duplication), per-key order violations, and seconds to recover
(the longest any request published around the fault waited for its result).

The suite runs ``--runs`` times; each case's row gives the worst figures over the runs (the most
lost, the most duplicates, the longest recovery), not one run's. The "Soak" section that
bench/soak.py writes is kept.

Usage: python bench/reliability.py [--scale 3] [--runs 3]   (scale multiplies each case's request count)
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=3.0, help="multiplies each case's request count")
    ap.add_argument("--runs", type=int, default=3, help="run the suite this many times; rows give the worst")
    ap.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = ap.parse_args()
    codes: list[int] = []
    worst: dict[tuple[str, str], dict[str, Any]] = {}
    other: list[str] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "figures.jsonl"
            env = {**os.environ, "STREAMER_FAULT_SCALE": str(args.scale), "STREAMER_FAULT_REPORT": str(report)}
            proc = subprocess.run([sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider",
                                   "-o", "timeout=1800"], cwd=ROOT, env=env, check=False)
            codes.append(proc.returncode)
            rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        for r in rows:
            if "requests" not in r:
                other.append(r["line"])
                continue
            key = (r["case"], r["mode"])
            w = worst.setdefault(key, {**r, "recoveries": []})
            w["recoveries"].append(r["recover_s"])
            for k in ("lost", "duplicates_raw", "duplicates_after_dedup", "order_violations", "recover_s"):
                w[k] = max(w[k], r[k])
    failed = [c for c in codes if c != 0]
    verdict = "passed every time" if not failed else f"FAILED in {len(failed)} of {len(codes)} runs"
    lines = [
        "# Reliability",
        "",
        f"Written by `bench/reliability.py --scale {args.scale:g} --runs {args.runs}` on {datetime.date.today()}; "
        f"the suite {verdict}. Each row gives the worst figures of the {args.runs} runs.",
        f"Machine: {machine()}; Apache Kafka 4.1.1 from Maven Central jars, broker, workers and load generator",
        "on the same cores. Each case: real `streamer worker` processes, steady keyed load, figures counted at",
        "the end. Raw duplicates are results on the reply topic (read_committed in exactly-once mode); the",
        "client drops repeats by request id. Seconds to recover: the longest any request published around",
        "the fault waited for its result.",
        "",
        "| fault | mode | requests | lost | duplicates raw | after de-dup | order violations | s to recover, worst "
        "(each run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['case']} | {r['mode']} | {r['requests']} | {r['lost']} | {r['duplicates_raw']} | "
        f"{r['duplicates_after_dedup']} | {r['order_violations']} | {r['recover_s']:.1f} "
        f"({', '.join(f'{x:.1f}' for x in r['recoveries'])}) |"
        for r in worst.values()
    )
    lines += [
        "",
        "Raw duplicates in at-least-once are results sent again, never requests lost: an at-least-once worker commits",
        "the offsets of acknowledged results at most every `commit_interval_ms` (100 ms), so the next owner of a",
        "killed worker's partitions redoes up to that much of its work, and one frozen past its session timeout",
        "has its last batches redone too. The client drops the repeats by request id. In exactly-once a result",
        "and its request's offset commit together, so a `read_committed` reader sees each result once.",
    ]
    if other:
        lines += ["", "Other cases (every run):", "", *(f"- {line}" for line in other)]
    out = Path(args.out)
    kept = ""
    if out.exists() and "\n## Soak" in out.read_text():
        kept = "\n" + out.read_text()[out.read_text().index("\n## Soak"):].strip() + "\n"
    out.write_text("\n".join(lines) + "\n" + kept)
    print("\n".join(lines))
    return max(codes, default=1)


if __name__ == "__main__":
    sys.exit(main())
