"""Offline replay throughput against the bare model at the same batch size, on CPU, in one run.

A (bare): `minilm` in a fresh child process, `model.run` over the sentences in batches of B, the
          sentences validated in memory beforehand (no broker, no codec, no sink).
B (replay): `streamer replay --model minilm --batch-size B --sink FILE.jsonl` as a child process,
          over a topic holding the same sentences as requests; its rate is the job's own
          (from its first fetch to its last result written and committed; the process start and
          the model load are left out, as they are for A).
Both are fresh processes, warmed up the same way (the model's warm-up batch), with torch's default
threads (all cores), so neither starts with caches the other lacks. Runs alternate A B A B after
a warm-up pair; ratios are per pair, median (min-max).

Writes bench/results/replay_cpu.json. Usage: python bench/bench_replay.py [--repeats 5] [--requests 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402
from producers import request_headers  # noqa: E402
from schemas import Codec, InferenceRequest, ReplyTo  # noqa: E402
from streamer import WorkerSettings, kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402
from streamer.models import load_model  # noqa: E402


async def publish(settings: WorkerSettings, topic: str, sentences: list[str]) -> None:
    await kafka.ensure_topics(settings, [kafka.TopicSpec(topic, 4)])
    codec = Codec()
    producer = kafka.producer(settings, linger_ms=5)
    await producer.start()
    try:
        for i, s in enumerate(sentences):
            req = InferenceRequest(id=f"{i:06d}", model="minilm", inputs=s, key=f"k{i % 64}",
                                   reply_to=ReplyTo(topic="unused"))
            await producer.send(topic, codec.encode_request(req), key=req.key.encode(),  # type: ignore[union-attr]
                                headers=request_headers(req))
        await producer.flush()
    finally:
        await producer.stop()


def bare_child(requests: int, batch: int) -> None:
    """In the child: the bare model's rate, printed as the last line."""
    model = load_model("minilm", "cpu")
    inputs = [model.validate(s) for s in model.example_inputs(requests, seed=17)]
    model.run([model.validate(x) for x in model.example_inputs(2)])  # the worker's and the replay's warm-up
    t = time.perf_counter()
    for i in range(0, len(inputs), batch):
        model.run(inputs[i:i + batch])
    print(len(inputs) / (time.perf_counter() - t))


async def bare(requests: int, batch: int) -> float:
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--bare-child", "--requests", str(requests),
                                                "--batch", str(batch), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return float(out.decode().strip().splitlines()[-1])


async def replay(bootstrap: str, topic: str, batch: int, tmp: Path) -> float:
    sink = tmp / f"{uuid.uuid4().hex[:8]}.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "--log-level", "WARNING", "replay", "--no-progress", "--model", "minilm",
        "--topic", topic, "--batch-size", str(batch), "--sink", str(sink), "--job", uuid.uuid4().hex[:8],
        env={**os.environ, "STREAMER_BOOTSTRAP_SERVERS": bootstrap}, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"replay exited {proc.returncode}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["complete"] and summary["ok"] == summary["range_size"], summary
    return float(summary["processed"]) / float(summary["elapsed_s"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        bare_child(args.requests, args.batch)
        return

    sentences = load_model("minilm-tokenize", "cpu").example_inputs(args.requests, seed=17)
    broker = LocalKafka().start()
    try:
        settings = WorkerSettings(bootstrap_servers=broker.bootstrap_servers)
        topic = f"replay-{uuid.uuid4().hex[:8]}"
        await publish(settings, topic, sentences)
        with tempfile.TemporaryDirectory() as tmp:
            pairs = []
            for i in range(args.repeats + 1):  # the first pair warms up
                a = await bare(args.requests, args.batch)
                b = await replay(broker.bootstrap_servers, topic, args.batch, Path(tmp))
                print(f"pair {i}: bare {a:,.1f}/s, replay {b:,.1f}/s, ratio {b / a:.3f}", flush=True)
                if i:
                    pairs.append({"bare": a, "replay": b, "ratio": b / a})
    finally:
        broker.stop()
    ratios = [p["ratio"] for p in pairs]
    out = {
        "machine": machine(), "model": "minilm", "batch": args.batch, "requests": args.requests,
        "torch_threads": "default (all cores)", "pairs": pairs,
        "summary": {
            "bare_per_s_median": statistics.median(p["bare"] for p in pairs),
            "replay_per_s_median": statistics.median(p["replay"] for p in pairs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        },
    }
    path = ROOT / "bench" / "results" / "replay_cpu.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
