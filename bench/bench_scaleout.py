"""Scale-out, simulated on one machine: 1, 2, 4 and 8 worker processes of one group at saturation.

Requests cycle through 4,096 keys, so every partition gets an equal share. The model is a stand-in that
sleeps 50 ms per batch of 32 (``bench.standins:sleep50``: a GPU call that
leaves the CPU free), so n workers could serve n times one worker's rate if the framework, the broker
and the group's assignment got out of the way. 16 partitions, one client publishing as fast as it can,
fresh topics per run (``--generator client``, the default: the client library's ``stream``; ``raw``: a
``producer.send`` per request built with the models, as before). Reports throughput and efficiency
(rate / (n x one worker's rate)); then, with
seven workers at saturation, an eighth joins: the longest pause in results around the join.
Writes bench/results/scaleout.json and scaleout.svg.
Run: python bench/bench_scaleout.py [--seconds 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import BATCH, Run, machine  # noqa: E402
from streamer import kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402
from streamer.config import settings_env  # noqa: E402

PARTITIONS = 16
MODEL = "bench.standins:sleep50"
PER_WORKER = BATCH / 0.050  # items/s of one worker if nothing but the model cost time


class Group(Run):
    """``n`` streamer workers in one group on a 16-partition topic."""

    def __init__(self, bootstrap: str, n: int) -> None:
        super().__init__("streamer-1t", bootstrap, MODEL)
        self.n = n
        # Enough keys that 16 partitions get equal shares (64 keys hash to 2-7 per partition: the busiest
        # worker's share, not the framework, would then set the pace).
        self.keys = 4096

    def _commands(self) -> list[tuple[list[str], str]]:
        return super()._commands() * self.n

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, [kafka.TopicSpec(s.request_topic, PARTITIONS),
                                      kafka.TopicSpec(s.results_topic, PARTITIONS),
                                      kafka.TopicSpec(s.dead_letter_topic, 1)])
        await self.add(self.n)

    async def add(self, n: int) -> None:
        """Start ``n`` more workers and wait until the group has them all."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **settings_env(self.settings), "STREAMER_TORCH_THREADS": "1"}
        cmd = super()._commands()[0][0]
        for _ in range(n):
            self.procs.append(await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                                   stderr=asyncio.subprocess.DEVNULL))
        await kafka.wait_for_group(self.settings, self.settings.group_id, len(self.procs), timeout_s=180)


async def saturate(bootstrap: str, n: int, seconds: float, generator: str) -> dict[str, Any]:
    group = Group(bootstrap, n)
    await group.start()
    try:
        if generator == "client":
            return await group.drive_client(int(PER_WORKER * n * seconds))
        return await group.drive(int(PER_WORKER * n * seconds), None)
    finally:
        await group.stop()


async def join(bootstrap: str, seconds: float, generator: str) -> dict[str, Any]:
    """Seven workers at saturation; an eighth joins a third of the way in. The longest gap between results
    from the join to the end, and the gaps seen before the join for comparison."""
    group = Group(bootstrap, 7)
    await group.start()
    arrivals: list[float] = []
    joined: list[float] = []

    async def eighth() -> None:
        await asyncio.sleep(seconds / 3)
        joined.append(arrivals[-1] if arrivals else 0.0)
        await group.add(1)
        joined.append(arrivals[-1] if arrivals else 0.0)

    try:
        n = int(PER_WORKER * 7.5 * seconds)
        result = (await group.drive_client(n, during=eighth, arrivals=arrivals) if generator == "client"
                  else await group.drive(n, None, during=eighth, arrivals=arrivals))
    finally:
        await group.stop()
    gaps = [(b - a, a) for a, b in itertools.pairwise(arrivals)]
    before = max((g for g, at in gaps if at < joined[0]), default=0.0)
    after = max((g for g, at in gaps if at >= joined[0]), default=0.0)
    return {**result, "join_started_s": joined[0], "group_had_8_s": joined[1], "longest_pause_before_s": before,
            "longest_pause_from_join_s": after}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="of saturated load per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--generator", choices=["client", "raw"], default="client",
                    help="client: StreamerClient.stream publishes and reads; raw: a producer.send per request")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    broker = LocalKafka().start()
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    try:
        for rep in range(args.repeats):
            for n in sizes:
                r = await saturate(broker.bootstrap_servers, n, args.seconds, args.generator)
                runs[n].append(r)
                print(f"round {rep}: {n} worker(s): {r['throughput']:,.0f}/s", flush=True)
        joined = await join(broker.bootstrap_servers, args.seconds, args.generator)
        print(f"an eighth joins: longest pause {joined['longest_pause_from_join_s']:.2f} s "
              f"(before the join {joined['longest_pause_before_s']:.2f} s)", flush=True)
    finally:
        broker.stop()
    one = statistics.median(r["throughput"] for r in runs[sizes[0]]) / sizes[0]
    summary = {n: {"throughput": statistics.median(r["throughput"] for r in rs),
                   "efficiency": statistics.median(r["throughput"] for r in rs) / (n * one)} for n, rs in runs.items()}
    out = {"machine": machine(), "generator": args.generator, "model": MODEL, "partitions": PARTITIONS,
           "per_worker_model_limit": PER_WORKER,
           "runs": runs, "summary": summary, "join": joined}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "scaleout.json").write_text(json.dumps(out, indent=2))
    _svg(ROOT / "bench" / "results" / "scaleout.svg", summary, one)
    print(json.dumps({"summary": summary, "join": {k: v for k, v in joined.items() if "s" in k}}, indent=2))


def _svg(path: Path, summary: dict[int, dict[str, float]], one: float) -> None:
    """Throughput against workers, with the ideal n x one worker's rate; no plotting dependency."""
    w, h, pad = 480, 300, 50
    top = max(max(v["throughput"] for v in summary.values()), max(summary) * one) * 1.1
    most = max(summary)

    def xy(n: float, rate: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * n / most, h - pad - (h - 2 * pad) * rate / top

    measured = " ".join(f"{x:.0f},{y:.0f}" for x, y in (xy(n, v["throughput"]) for n, v in sorted(summary.items())))
    ideal = " ".join(f"{x:.0f},{y:.0f}" for x, y in (xy(n, n * one) for n in sorted(summary)))
    labels = "".join(f'<text x="{xy(n, 0)[0]:.0f}" y="{h - pad + 16}">{n}</text>' for n in sorted(summary))
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">'
        f'<polyline points="{ideal}" fill="none" stroke="#bbb" stroke-dasharray="4"/>'
        f'<polyline points="{measured}" fill="none" stroke="#2b7bb9" stroke-width="2"/>{labels}'
        f'<text x="{pad}" y="20">results/s against workers (dashed: n x one worker)</text>'
        f'<text x="{w / 2:.0f}" y="{h - 10}">worker processes</text></svg>')


if __name__ == "__main__":
    asyncio.run(main())
