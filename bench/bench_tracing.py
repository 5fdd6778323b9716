"""What tracing costs a worker: tracing off against a baseline tree, and tracing on, side by side.

Variants, interleaved after a warm-up round, each a ``streamer worker`` serving tiny-mlp at saturation on fresh
topics (bench/bench_worker.py's Run; requests carry no traceparent, so each record starts a trace):
``base``: the worker of another tree (``--baseline DIR``, say a ``git archive`` of the commit before tracing);
``off``: this tree, tracing off (no OTEL_* configuration: OpenTelemetry is not even imported);
``on``: this tree with tracing on: a tracer provider set before the worker starts (a ``sitecustomize`` on its
path: the SDK's batch span processor, and an exporter that drops what it is given), the cost of streamer's
spans and of the SDK without an exporter's own;
``console``: this tree with ``OTEL_TRACES_EXPORTER=console`` (the spans serialised as indented JSON to the
worker's stdout, /dev/null here), a heavy exporter.
Reports throughput and CPU µs per request of the worker; ratios per round, median with min-max.
Writes bench/results/tracing.json. Usage:
    python bench/bench_tracing.py --baseline /tmp/base [--repeats 5] [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import Run, machine  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402

_SITE = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class Drop(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(Drop()))
trace.set_tracer_provider(provider)
"""


async def _one(variant: str, bootstrap: str, n: int, baseline: str) -> dict[str, Any]:
    run = Run("streamer", bootstrap)
    if variant == "base":
        run.env["PYTHONPATH"] = baseline
    elif variant == "on":
        site = Path(tempfile.mkdtemp(prefix="streamer-trace-site-"))
        (site / "sitecustomize.py").write_text(_SITE)
        run.env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    elif variant == "console":
        run.env.update({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "streamer-bench"})
    await run.start()
    try:
        return await run.drive(n, None, warmup=200)
    finally:
        await run.stop()


def _ratios(rounds: list[dict[str, Any]], a: str, b: str, field: str) -> dict[str, float]:
    values = [r[a][field] / r[b][field] for r in rounds]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a tree to run the 'base' worker from")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    variants = ("base", "off", "on", "console")
    broker = LocalKafka().start()
    try:
        for v in variants:  # warm-up round (and the broker's first topics)
            await _one(v, broker.bootstrap_servers, 1000, args.baseline)
        rounds = []
        for i in range(args.repeats):
            r = {v: await _one(v, broker.bootstrap_servers, args.requests, args.baseline) for v in variants}
            rounds.append(r)
            shown = [f"{v} {r[v]['throughput']:,.0f}/s {r[v]['cpu_s_per_request'] * 1e6:.0f} µs" for v in variants]
            print(f"round {i + 1}: " + ", ".join(shown), flush=True)
    finally:
        broker.stop()
    out = {
        "machine": machine(), "requests": args.requests, "repeats": args.repeats,
        "median": {v: {f: statistics.median(r[v][f] for r in rounds) for f in ("throughput", "cpu_s_per_request")}
                   for v in variants},
        "off/base": {f: _ratios(rounds, "off", "base", f) for f in ("throughput", "cpu_s_per_request")},
        "on/off": {f: _ratios(rounds, "on", "off", f) for f in ("throughput", "cpu_s_per_request")},
        "console/off": {f: _ratios(rounds, "console", "off", f) for f in ("throughput", "cpu_s_per_request")},
        "rounds": rounds,
    }
    path = ROOT / "bench" / "results" / "tracing.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("median", "off/base", "on/off", "console/off")}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
