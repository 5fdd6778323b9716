"""Soak: many generated hostile records through one real worker, and RELIABILITY.md's soak figures.

Runs the property test (tests/test_property_worker.py: hostile records from tests/hostile.py,
interleaved with good requests, every invariant checked after each example) with ``--examples``
examples instead of CI's few, on the project's own Apache Kafka broker, then writes what the worker
was fed and what became of it into the "Soak" section of RELIABILITY.md.

Usage: python bench/soak.py [--examples 500]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402

SECTION = "## Soak: generated hostile records"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "soak.json"
        env = {**os.environ, "STREAMER_PROPERTY_EXAMPLES": str(args.examples), "STREAMER_SOAK_REPORT": str(report)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_property_worker.py", "-q",
                               "-p", "no:cacheprovider", "-o", "timeout=7200"], cwd=ROOT, env=env, check=False)
        fig = json.loads(report.read_text()) if report.exists() else None
    verdict = "every invariant held" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})"
    lines = [
        SECTION, "",
        f"Written by `bench/soak.py --examples {args.examples}` on {datetime.date.today()}: {verdict}.",
        f"Machine: {machine()}; Apache Kafka 4.1.1, one worker (tiny-mlp, batch 16), broker and generator on the same"
        " cores.",
        "Each example: 10-40 records, a third of them good requests, the rest generated: random bytes, truncated and"
        " mutated valid requests, every compression codec, huge and empty keys, random headers (null values, keys and"
        " values that are not UTF-8), ids and names at and over every limit, reply routes that are not allowed or do"
        " not exist. Checked after each: the worker is alive, every good request and every record that is a valid"
        " request got its result, no record got two dead letters, every other record got exactly one, the group's"
        " commit passed every record, nothing was written into the request topic, RSS grew by under 150 MB.",
        "",
    ]
    if fig:
        lines += [
            "| examples | records | results (ok) | dead letters | worker RSS start -> end | seconds |",
            "|---|---|---|---|---|---|",
            f"| {args.examples} | {fig['records']} | {fig['results']} ({fig['ok']}) | {fig['dead_letters']} | "
            f"{fig['rss_start_mb']} -> {fig['rss_end_mb']} MB | {fig['seconds']} |",
            "",
        ]
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Reliability\n"
    block = "\n".join(lines)
    if SECTION in text:
        text = re.sub(re.escape(SECTION) + r".*?(?=\n## |\Z)", block.rstrip() + "\n", text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block
    out.write_text(text)
    print(block)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
