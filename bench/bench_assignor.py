"""Capacity-aware assignment against round-robin, with one worker at a third of the others' speed.

Three workers of one group serve a 12-partition topic. Two run at 1000/ITEM_MS items/s, one at a
third of that (bench/throttled.py sleeps per item, so the speeds hold on a small machine). A fixed
job of N requests, spread evenly over the partitions (the round-robin partitioner), is published
once the group is stable; the job's time runs from the first request sent to the last result read.

- round-robin: every worker gets 4 partitions, so the slow one finishes last, at 3x the others.
- capacity: each worker measures its speed at start-up and advertises it; the leader hands out
  partitions in proportion (5, 5, 2 here).

Runs alternate A B A B; ratios are per pair, median (min-max). Writes bench/results/assignor.json.
Usage: python bench/bench_assignor.py [--repeats 3] [--requests 3000] [--item-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402
from producers import request_headers  # noqa: E402
from schemas import Codec, InferenceRequest, ReplyTo  # noqa: E402
from streamer import WorkerSettings, kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402
from streamer.config import settings_env  # noqa: E402
from streamer.models import load_model  # noqa: E402
from streamer.status import group_status  # noqa: E402

PARTITIONS = 12


async def run(assignor: str, bootstrap: str, n: int, item_ms: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    ws = WorkerSettings(bootstrap_servers=bootstrap, request_topic=f"a-{tag}.req", results_topic=f"a-{tag}.res",
                        dead_letter_topic=f"a-{tag}.dlq", group_id=f"a-{tag}", model="bench.throttled:throttled",
                        assignor=assignor, max_batch_size=32, max_wait_ms=2)  # type: ignore[arg-type]
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, PARTITIONS),
                                   kafka.TopicSpec(ws.results_topic, PARTITIONS),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1)])
    procs = []
    for speed in (1, 1, 3):
        env = {**os.environ, **settings_env(ws), "PYTHONPATH": str(ROOT), "THROTTLE_ITEM_MS": str(item_ms * speed)}
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "--log-level", "WARNING", "worker", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
    try:
        await kafka.wait_for_group(ws, ws.group_id, 3, timeout_s=180)
        status = await group_status(ws, ws.group_id)
        shares = sorted(len(m.partitions) for m in status.members)
        inputs = load_model("tiny-mlp", "cpu").example_inputs(256, seed=1)
        codec = Codec()
        producer = kafka.producer(ws.model_copy(update={"partitioner": "round-robin"}), linger_ms=2)
        consumer = kafka.consumer(ws, ws.results_topic, group_id=None, auto_offset_reset="earliest")
        await producer.start()
        await consumer.start()
        t0 = time.perf_counter()
        try:
            for i in range(n):
                req = InferenceRequest(id=f"{i:07d}", model="throttled-tiny", inputs=inputs[i % 256],
                                       reply_to=ReplyTo(topic=ws.results_topic))
                await producer.send(ws.request_topic, codec.encode_request(req), headers=request_headers(req))
            await producer.flush()
            seen: set[str] = set()
            async with asyncio.timeout(600):
                while len(seen) < n:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        seen.update(codec.decode_result(r.value).id for r in records)
            elapsed = time.perf_counter() - t0
        finally:
            await producer.stop()
            await consumer.stop()
        return {"assignor": status.assignor, "partitions_per_worker": shares, "job_s": elapsed,
                "capacities": sorted(round(m.capacity or 0) for m in status.members)}
    finally:
        for p in procs:
            p.terminate()
        await asyncio.gather(*(p.wait() for p in procs))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--item-ms", type=float, default=2.0, help="a fast worker's time per item")
    args = ap.parse_args()
    broker = LocalKafka().start()
    pairs = []
    try:
        for i in range(args.repeats):
            a = await run("round-robin", broker.bootstrap_servers, args.requests, args.item_ms)
            b = await run("capacity", broker.bootstrap_servers, args.requests, args.item_ms)
            pairs.append({"round_robin": a, "capacity": b, "speedup": a["job_s"] / b["job_s"]})
            print(f"pair {i}: round-robin {a['job_s']:.2f} s {a['partitions_per_worker']}, capacity "
                  f"{b['job_s']:.2f} s {b['partitions_per_worker']} {b['capacities']}: "
                  f"{a['job_s'] / b['job_s']:.2f}x", flush=True)
    finally:
        broker.stop()
    speedups = [p["speedup"] for p in pairs]
    out = {"machine": machine(), "requests": args.requests, "item_ms": args.item_ms, "partitions": PARTITIONS,
           "pairs": pairs, "summary": {"speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
                                       "speedup_max": max(speedups)}}
    (ROOT / "bench" / "results" / "assignor.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
