"""minilm single-stage against minilm-2stage at equal total processes, on CPU, in one run.

A: 2 `streamer worker --model minilm` processes in one group.
B: `minilm-2stage` with 1 tokenize process and 1 encode process.
Each process gets one torch thread (the machine has two cores, shared with the broker and
the load generator). Each run publishes N keyed sentences (8-40 words) as fast as possible
and awaits every result; latency is from creation to arrival. Runs are interleaved A B A B
after a warm-up pair; ratios are per pair (median, min-max).

Writes bench/results/pipeline_cpu.json. Usage: python bench/bench_pipeline.py [--repeats 3] [--requests 600]
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402
from producers import StreamerClient  # noqa: E402
from streamer import ClientSettings, WorkerSettings, kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402
from streamer.models import load_model  # noqa: E402
from streamer.pipeline import BUILTIN_PIPELINES, load_pipeline  # noqa: E402

BATCH = 32


async def _spawn(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "streamer", "--log-level", "WARNING", *args,
                                                env={**os.environ, **env}, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)


async def one(variant: str, bootstrap: str, sentences: list[str], tmp: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    base = {"STREAMER_BOOTSTRAP_SERVERS": bootstrap, "STREAMER_TORCH_THREADS": "1",
            "STREAMER_MAX_BATCH_SIZE": str(BATCH), "STREAMER_RESULTS_TOPIC": f"r-{tag}"}
    procs: list[asyncio.subprocess.Process] = []
    if variant == "minilm":
        ws = WorkerSettings(bootstrap_servers=bootstrap, request_topic=f"m-{tag}.req", group_id=f"m-{tag}",
                            dead_letter_topic=f"m-{tag}.dlq")
        await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 4), kafka.TopicSpec(ws.dead_letter_topic, 1)])
        env = {**base, "STREAMER_REQUEST_TOPIC": ws.request_topic, "STREAMER_GROUP_ID": ws.group_id,
               "STREAMER_DEAD_LETTER_TOPIC": ws.dead_letter_topic}
        procs = [await _spawn(["worker", "--model", "minilm"], env) for _ in range(2)]
        await kafka.wait_for_group(ws, ws.group_id, 2, timeout_s=300)
        model, topic = "minilm", ws.request_topic
    else:
        name = f"p{tag}"
        text = (BUILTIN_PIPELINES / "minilm-2stage.toml").read_text().replace('name = "minilm-2stage"',
                                                                               f'name = "{name}"')
        path = tmp / f"{name}.toml"
        path.write_text(text.replace("max_batch_size = 64", f"max_batch_size = {BATCH}"))
        spec = load_pipeline(path)
        ws = WorkerSettings(bootstrap_servers=bootstrap)
        await kafka.ensure_topics(ws, [*(kafka.TopicSpec(spec.input_topic(s.name), 4) for s in spec.order),
                                       *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order)])
        procs = [await _spawn(["stage", str(path), "--stage", s.name], base) for s in spec.order]
        for s in spec.order:
            await kafka.wait_for_group(ws, spec.group_id(s.name), 1, timeout_s=300)
        model, topic = spec.name, spec.input_topic(spec.order[0].name)
    try:
        settings = ClientSettings(bootstrap_servers=bootstrap, request_topic=topic, results_topic=f"r-{tag}",
                                  timeout_s=600)
        async with StreamerClient(settings) as client:
            latencies: list[float] = []

            async def req(i: int, s: str) -> None:
                t = time.perf_counter()
                await client.infer(s, model=model, key=f"k{i % 32}")
                latencies.append((time.perf_counter() - t) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(req(i, s) for i, s in enumerate(sentences)))
            elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.terminate()
        await asyncio.gather(*(p.wait() for p in procs))
    return {"throughput": len(sentences) / elapsed, "seconds": elapsed,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


def bare_model(sentences: list[str]) -> float:
    import torch

    torch.set_num_threads(1)
    m = load_model("minilm", "cpu")
    m.run(sentences[:BATCH])
    t = time.perf_counter()
    for s in range(0, len(sentences), BATCH):
        m.run(sentences[s:s + BATCH])
    return len(sentences) / (time.perf_counter() - t)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=600)
    args = ap.parse_args()
    sentences = load_model("minilm-tokenize", "cpu").example_inputs(args.requests, seed=5)
    out: dict[str, Any] = {"machine": machine(), "batch": BATCH, "requests": args.requests,
                           "L_model_1_thread": bare_model(sentences[:256]), "pairs": []}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-pipeline-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    with LocalKafka() as broker:
        for v in ("minilm", "minilm-2stage"):
            await one(v, broker.bootstrap_servers, sentences[:64], tmp)
        for i in range(args.repeats):
            pair = {v: await one(v, broker.bootstrap_servers, sentences, tmp) for v in ("minilm", "minilm-2stage")}
            out["pairs"].append(pair)
            print(f"pair {i}: " + ", ".join(f"{v} {r['throughput']:.1f}/s p50 {r['p50_ms']:.0f} ms p99 "
                                            f"{r['p99_ms']:.0f} ms" for v, r in pair.items()), flush=True)
    pairs = out["pairs"]
    ratios = [p["minilm-2stage"]["throughput"] / p["minilm"]["throughput"] for p in pairs]
    out["summary"] = {
        "throughput_ratio_2stage_over_single": {"median": statistics.median(ratios), "min": min(ratios),
                                                "max": max(ratios)},
        **{f"{v}.{f}": statistics.median(p[v][f] for p in pairs)
           for v in ("minilm", "minilm-2stage") for f in ("throughput", "p50_ms", "p99_ms")},
    }
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "pipeline_cpu.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
