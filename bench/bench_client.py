"""What one client process costs per request, against a minimal aiokafka client doing the same I/O.

One broker, one streamer worker serving tiny-mlp (4 partitions); each variant of bench/client_loop.py
(``stream``, ``submit``, ``raw``) runs as its own process and sends N keyed requests, awaiting every
result. Variants are interleaved, ``--repeats`` rounds; reported: the client process's CPU µs per request
and requests/s end to end, medians with min-max, and the ratio to ``raw`` per round.

``--baseline DIR`` (a checkout of an earlier commit) adds ``stream@base`` and ``submit@base`` variants: the same
client loop with that commit's code. Writes bench/results/client.json.
Usage: python bench/bench_client.py [--repeats 5] [--requests 20000] [--baseline DIR --variants raw,stream,stream@base]
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

VARIANTS = ("raw", "stream", "submit")


async def _client(bootstrap: str, topics: tuple[str, str], model: str, variant: str, n: int,
                  baseline: str) -> dict[str, Any]:
    """``VARIANT@base``: the variant with the code of ``--baseline`` (a checkout of an earlier commit)."""
    name, _, base = variant.partition("@")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "client_loop.py"), bootstrap, *topics, model, name, str(n),
        env={**os.environ, "PYTHONPATH": baseline if base else str(ROOT)}, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"client_loop {variant} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["throughput"] = result["requests"] / result["seconds"]
    result["variant"] = variant
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baseline", default="", help="a checkout of an earlier commit, for the VARIANT@base variants")
    args = ap.parse_args()
    variants = args.variants.split(",")
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalKafka(data_dir=Path(tmp) / "kafka")
        await asyncio.to_thread(broker.start)
        try:
            run = Run("streamer", broker.bootstrap_servers)
            await run.start()
            try:
                for r in range(args.repeats):
                    order = variants if r % 2 == 0 else variants[::-1]
                    topics = (run.settings.request_topic, run.settings.results_topic)
                    rounds.append({v: await _client(broker.bootstrap_servers, topics,
                                                    run.model_name, v, args.requests, args.baseline)
                                   for v in order})
                    print(json.dumps(rounds[-1]), flush=True)
            finally:
                await run.stop()
        finally:
            await asyncio.to_thread(broker.stop)
    summary: dict[str, Any] = {}
    for v in variants:
        summary[v] = {"cpu_us_per_request": _spread([x[v]["cpu_us_per_request"] for x in rounds]),
                      "throughput": _spread([x[v]["throughput"] for x in rounds])}
        if v != "raw" and "raw" in variants:
            summary[v]["cpu_vs_raw"] = _spread([x[v]["cpu_us_per_request"] / x["raw"]["cpu_us_per_request"]
                                                for x in rounds])
            summary[v]["throughput_vs_raw"] = _spread([x[v]["throughput"] / x["raw"]["throughput"] for x in rounds])
    out = {"machine": machine(), "requests": args.requests, "baseline": args.baseline, "repeats": args.repeats,
           "summary": summary, "rounds": rounds}
    path = ROOT / "bench" / "results" / "client.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
