"""A py-spy flame graph of one serving process at saturation (tiny-mlp, as bench_overhead runs it).

Starts a broker, the variant's process (``streamer`` worker or ``floor``), attaches py-spy (``pip install
py-spy``) for ``--seconds`` while ``--requests`` are published as fast as they go, and writes
bench/results/flame-LABEL.svg. Run it from a checkout to profile that checkout's code (the worker
runs with the checkout on PYTHONPATH).
Run: python bench/flame.py --variant streamer --label after [--requests 60000] [--seconds 8] [--model SPEC]
[--format raw]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import Run  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="streamer")
    ap.add_argument("--label", required=True)
    ap.add_argument("--requests", type=int, default=60_000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--model", default="tiny-mlp", help="tiny-mlp or a stand-in (bench.standins:ids384)")
    ap.add_argument("--format", default="flamegraph", help="py-spy's: flamegraph (an SVG), raw (collapsed stacks)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    broker = LocalKafka().start()
    try:
        run = Run(args.variant, broker.bootstrap_servers, args.model)
        await run.start()
        assert run.proc is not None
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"flame-{args.label}.{'svg' if args.format == 'flamegraph' else 'txt'}"
        rec = await asyncio.create_subprocess_exec(
            spy, "record", "-p", str(run.proc.pid), "-d", str(round(args.seconds)), "-r", "250", "-f", args.format,
            "-o", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        result = await run.drive(args.requests, None)
        await rec.wait()
        await run.stop()
        print(f"{args.variant}: {result['throughput']:,.0f} requests/s, "
              f"{result['cpu_s_per_request'] * 1e6:.0f} µs CPU per request; {path}")
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
