"""Workers serving tiny-mlp against a naive per-message aiokafka loop, on one broker, in one run.

For each variant (A = a streamer worker process, B = bench/naive_loop.py), on fresh topics:
- saturation: publish N ~200-byte requests as fast as possible, time until the last result;
- fixed offered load: publish at R requests/s (open loop) and record each request's latency
  from creation to its result's arrival.
At fixed load a third variant, the worker with max_wait_ms=0, shows the latency cost of
the batching wait apart from the framework's. Variants are interleaved A B A B ... after a
warm-up pair; ratios are per pair, and the median with its min-max is reported, with CPU
seconds per request of the serving process.
Also measured in the same run: L_model, the bare model at the worker's batch size.

Writes bench/results/worker_vs_naive.json and .svg. Usage:
    python bench/bench_worker.py [--repeats 5] [--requests 3000] [--rate 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producers import request_headers  # noqa: E402
from schemas import Codec, InferenceRequest, ReplyTo  # noqa: E402
from streamer import ClientSettings, WorkerSettings, kafka  # noqa: E402
from streamer.broker import LocalKafka  # noqa: E402
from streamer.config import settings_env  # noqa: E402
from streamer.models import load_model  # noqa: E402

BATCH = 32
WAIT_MS = 5.0
PARTITIONS = 4


def _cpu_seconds(pid: int, task: str = "") -> float:
    """User + system CPU seconds of a process (or of one of its threads: ``task``) so far, from ``/proc``."""
    stat = Path(f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jit_cpu_seconds(pid: int) -> float:
    """CPU seconds a JVM's JIT compiler threads have used so far."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if "CompilerThre" in (task / "comm").read_text():
                total += _cpu_seconds(pid, task.name)
        except OSError:
            continue  # the thread ended
    return total


def _machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the machine so far, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


async def drive_measured(run: Run, broker: LocalKafka, n: int, rate: float | None, warmup: int = 500) -> dict[str, Any]:
    """Start ``run``, ``run.drive`` it and stop it, noting what else ran meanwhile: how busy the whole machine was
    (``machine_busy``, a share of all its cores) and the broker's CPU (``broker_cores``). On two cores, a rate
    half the saturation of at-least-once is not half the machine."""
    pid = broker.pid
    assert pid is not None
    port = run.env.get("STREAMER_METRICS_PORT")
    await run.start()
    try:
        if warmup:
            await run.drive(warmup, None)
        run.prepare(n)
        before = await asyncio.to_thread(_scrape, port) if port else {}
        ticks, broker_s, t0 = _machine_ticks(), _cpu_seconds(pid), time.monotonic()
        out = await run.drive(n, rate)
        (total, idle), (total0, idle0) = _machine_ticks(), ticks
        out["machine_busy"] = 1 - (idle - idle0) / max(1, total - total0)
        out["broker_cores"] = (_cpu_seconds(pid) - broker_s) / (time.monotonic() - t0)
        if port:
            out["transactions"] = _transactions(before, await asyncio.to_thread(_scrape, port),
                                                time.monotonic() - t0)
        return out
    finally:
        await run.stop()


def _scrape(port: str) -> dict[tuple[str, str], float]:
    """A worker's ``streamer_transaction*`` samples, by (name, phase or outcome)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("phase") or s.labels.get("outcome") or ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("streamer_transaction") and "le" not in s.labels}


def _transactions(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float],
                  seconds: float) -> dict[str, float]:
    """What the worker's own metrics say of the exactly-once transactions of a measured drive: how many a
    second, their items, and the mean ms of each phase (open, deliver, end). Empty if it exports none (an
    earlier checkout's worker)."""
    def delta(name: str, label: str = "") -> float:
        return after.get((name, label), 0.0) - before.get((name, label), 0.0)

    n = delta("streamer_transactions_total", "committed")
    if not n:
        return {}
    out = {"per_s": n / seconds, "failed": delta("streamer_transactions_total", "failed"),
           "items": delta("streamer_transaction_items_sum") / n}
    for phase in ("open", "deliver", "end"):
        out[f"{phase}_ms"] = 1000 * delta("streamer_transaction_seconds_sum", phase) / n
    return out


async def warm_broker(broker: LocalKafka, variants: tuple[str, ...] = ("streamer",), requests: int = 20000,
                      quiet: float = 0.05, max_s: float = 300.0) -> None:
    """Load a fresh broker at saturation, with each of ``variants`` in turn, until its JIT compiler threads use
    less than ``quiet`` of a core over a round (or for ``max_s``). A fresh broker compiles its hot paths in its
    first minute of load: on a 2-core AMD EPYC machine its compiler threads took half a core for 20 s, then
    0.1-0.3 for 25 s, while a worker's p50 at 2,000/s fell from 55 to 20 ms; a figure taken meanwhile is partly
    that."""
    pid = broker.pid
    assert pid is not None, "the broker is not running"
    t0 = time.perf_counter()
    while True:
        jit0, t = jit_cpu_seconds(pid), time.perf_counter()
        for variant in variants:
            run = Run(variant, broker.bootstrap_servers)
            await run.start()
            try:
                await run.drive(requests, None)
            finally:
                await run.stop()
        share = (jit_cpu_seconds(pid) - jit0) / (time.perf_counter() - t)
        print(f"warming the broker up: its JIT compiler used {share:.2f} of a core", flush=True)
        if share < quiet or time.perf_counter() - t0 > max_s:
            return


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, Linux {platform.release()}"


class Run:
    """One variant on fresh topics: the serving process (two for a ``-hop`` variant: a two-stage pipeline,
    stand-in ``hop16`` then the model), a publisher and a result reader."""

    def __init__(self, variant: str, bootstrap: str, model: str = "tiny-mlp") -> None:
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.hop = variant.endswith("-hop")
        self.variant = variant.removesuffix("-hop")
        self.model_spec = model
        self.settings = WorkerSettings(bootstrap_servers=bootstrap, request_topic=f"b-{tag}.req",
                                       results_topic=f"b-{tag}.res", dead_letter_topic=f"b-{tag}.dlq",
                                       group_id=f"bg-{tag}", max_batch_size=BATCH, model=model,
                                       delivery="exactly-once" if variant.startswith("streamer-eos")
                                       else "at-least-once",
                                       max_wait_ms=0.0 if variant == "streamer-nowait" else WAIT_MS)
        self.procs: list[asyncio.subprocess.Process] = []
        self.env: dict[str, str] = {}  # more environment for the serving processes
        self.cwd: str | None = None  # where the serving processes start (a checkout of other code: --baseline)
        self.keys = 64  # distinct request keys, cycled
        self.codec = Codec()
        m = load_model(model, "cpu")  # tiny-mlp's inputs serve the stand-ins too
        self.model_name = f"hop{tag}" if self.hop else m.name
        self.inputs = m.example_inputs(256, seed=1)
        self._prepared: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.procs[0] if self.procs else None

    def _commands(self) -> list[tuple[list[str], str]]:
        """(command, consumer group) of each serving process."""
        s, py, bench = self.settings, sys.executable, ROOT / "bench"
        if self.variant in ("floor", "faststream"):
            script = str(bench / ("floor_loop.py" if self.variant == "floor" else "faststream_loop.py"))
            if not self.hop:
                return [([py, script, s.bootstrap_servers, s.request_topic, s.group_id, str(BATCH), self.model_spec],
                         s.group_id)]
            mid = f"b-{self.tag}.mid"
            return [([py, script, s.bootstrap_servers, s.request_topic, s.group_id, str(BATCH),
                      "bench.standins:hop16", mid], s.group_id),
                    ([py, script, s.bootstrap_servers, mid, f"{s.group_id}.2", str(BATCH), self.model_spec],
                     f"{s.group_id}.2")]
        if self.variant.startswith("streamer"):
            if not self.hop:
                return [([py, "-m", "streamer", "--log-level", "WARNING", "worker"], s.group_id)]
            spec = Path(tempfile.gettempdir()) / f"streamer-bench-{self.tag}.toml"
            spec.write_text(f"""name = "{self.model_name}"
request_topic = "{s.request_topic}"

[[stages]]
name = "first"
callable = "bench.standins:hop16"
group_id = "{s.group_id}"
dead_letter_topic = "{s.dead_letter_topic}"
max_batch_size = {BATCH}
max_wait_ms = {WAIT_MS}

[[stages]]
name = "second"
callable = "{self.model_spec}"
input_topic = "b-{self.tag}.mid"
group_id = "{s.group_id}.2"
dead_letter_topic = "{s.dead_letter_topic}.2"
max_batch_size = {BATCH}
max_wait_ms = {WAIT_MS}
""")
            return [([py, "-m", "streamer", "--log-level", "WARNING", "stage", str(spec), "--stage", stage], group)
                    for stage, group in (("first", s.group_id), ("second", f"{s.group_id}.2"))]
        return [([py, str(bench / "naive_loop.py"), s.bootstrap_servers, s.request_topic, s.group_id], s.group_id)]

    async def start(self) -> None:
        s = self.settings
        topics = [kafka.TopicSpec(s.request_topic, PARTITIONS), kafka.TopicSpec(s.results_topic, PARTITIONS),
                  kafka.TopicSpec(s.dead_letter_topic, 1)]
        if self.hop:
            topics += [kafka.TopicSpec(f"b-{self.tag}.mid", PARTITIONS), kafka.TopicSpec(f"{s.dead_letter_topic}.2", 1)]
        await kafka.ensure_topics(s, topics)
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        if self.variant.startswith("streamer"):
            env.update(settings_env(s))
            env.update(self.env)
            if self.variant.endswith("-1t") or self.hop:
                env["STREAMER_TORCH_THREADS"] = "1"  # two processes share the cores
            if self.hop:
                for name in ("REQUEST_TOPIC", "DEAD_LETTER_TOPIC", "GROUP_ID", "MODEL"):
                    env.pop(f"STREAMER_{name}", None)  # the spec names these
        for cmd, group in self._commands():
            self.procs.append(await asyncio.create_subprocess_exec(*cmd, env=env, cwd=self.cwd,
                                                                   stdout=asyncio.subprocess.DEVNULL,
                                                                   stderr=asyncio.subprocess.DEVNULL))
            await kafka.wait_for_group(s, group, 1, timeout_s=120)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(p.pid) for p in self.procs)

    def prepare(self, n: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
        """The next ``drive``'s ``n`` requests, encoded before its clock starts: encoding each one as it went cost
        the load generator a quarter of its CPU at 3,700/s (0.52 of a core, 0.38 without), on the two cores the
        measured system runs on."""
        self._prepared = [self._request(i) for i in range(n)]
        return self._prepared

    def _request(self, i: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        req = InferenceRequest(id=f"{i:08d}-{uuid.uuid4().hex[:16]}", model=self.model_name,
                               inputs=self.inputs[i % 256], key=f"key-{i % self.keys}",
                               reply_to=ReplyTo(topic=self.settings.results_topic),
                               metadata={"pad": "x" * 8})
        return self.codec.encode_request(req), req.key.encode(), request_headers(req)  # type: ignore[union-attr]

    async def drive(self, n: int, rate: float | None, during: Callable[[], Awaitable[Any]] | None = None,
                    arrivals: list[float] | None = None, warmup: int = 0) -> dict[str, Any]:
        """Publish n requests (at ``rate``/s, or as fast as possible); collect every result. ``during`` runs
        beside (a worker joining, say); ``arrivals`` gets each result's arrival, seconds from the start.
        ``warmup`` requests go first, untimed (a serving process's first batches start its producers).
        Results are read ``read_committed``, as the client reads them (exactly-once results count once
        committed)."""
        requests = self._prepared if len(self._prepared) == n else self.prepare(n)
        self._prepared = []  # taken before the warm-up's drive, which would encode its own over them
        if warmup:
            await self.drive(warmup, None)
        s = self.settings
        producer = kafka.producer(s, linger_ms=1)
        consumer = kafka.consumer(s, s.results_topic, group_id=None, auto_offset_reset="earliest",
                                  isolation_level="read_committed")
        await producer.start()
        await consumer.start()
        sent: dict[str, float] = {}
        latencies: list[float] = []
        cpu0 = self.cpu_seconds()
        t0 = time.perf_counter()

        async def publish() -> None:
            for i, (value, key, headers) in enumerate(requests):
                rid = headers[2][1].decode()
                if rate:
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                sent[rid] = time.perf_counter()
                await producer.send(s.request_topic, value, key=key, headers=headers)
            await producer.flush()

        pub = asyncio.create_task(publish())
        side = asyncio.ensure_future(during()) if during is not None else None
        try:
            async with asyncio.timeout(600):
                while len(latencies) < n:
                    for records in (await consumer.getmany(timeout_ms=100)).values():
                        now = time.perf_counter()
                        for r in records:
                            rid = dict(r.headers).get("streamer-request-id")
                            rid = rid.decode() if rid else self.codec.decode_result(r.value).id
                            if rid in sent:
                                latencies.append((now - sent.pop(rid)) * 1000)
                                if arrivals is not None:
                                    arrivals.append(now - t0)
            await pub
            if side is not None:
                await side
        finally:
            elapsed = time.perf_counter() - t0
            cpu = self.cpu_seconds() - cpu0
            await producer.stop()
            await consumer.stop()
        return {"requests": n, "seconds": elapsed, "throughput": n / elapsed, "cpu_s_per_request": cpu / n,
                "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


    async def drive_client(self, n: int, during: Callable[[], Awaitable[Any]] | None = None,
                           arrivals: list[float] | None = None) -> dict[str, Any]:
        """As :meth:`drive` at saturation, with the client library's fast path as the load generator: one
        ``StreamerClient.stream`` publishing the n requests and reading their results (a few µs of CPU per
        request, so that the serving processes, not the generator, have the cores)."""
        from producers import StreamerClient

        s = self.settings
        xs = [self.inputs[i % 256][:] for i in range(n)]  # one object per request, for its key
        keys = {id(x): f"key-{i % self.keys}" for i, x in enumerate(xs)}
        client = StreamerClient(ClientSettings(bootstrap_servers=s.bootstrap_servers, request_topic=s.request_topic,
                                               results_topic=s.results_topic, timeout_s=600))
        await client.start()
        cpu0 = self.cpu_seconds()
        t0 = time.perf_counter()
        side = asyncio.ensure_future(during()) if during is not None else None
        count = 0
        try:
            async for r in client.stream(xs, model=self.model_name, key=lambda x: keys[id(x)]):
                if r.status != "ok":
                    raise RuntimeError(f"a request failed: {r.error}")
                count += 1
                if arrivals is not None:
                    arrivals.append(time.perf_counter() - t0)
            if side is not None:
                await side
        finally:
            elapsed = time.perf_counter() - t0
            cpu = self.cpu_seconds() - cpu0
            await client.close()
        return {"requests": count, "seconds": elapsed, "throughput": count / elapsed, "cpu_s_per_request": cpu / n}


async def one(variant: str, bootstrap: str, n: int, rate: float | None, model: str = "tiny-mlp",
              warmup: int = 0) -> dict[str, Any]:
    run = Run(variant, bootstrap, model)
    await run.start()
    try:
        return await run.drive(n, rate, warmup=warmup)
    finally:
        await run.stop()


def bare_model() -> float:
    m = load_model("tiny-mlp", "cpu")
    xs = m.example_inputs(BATCH)
    for _ in range(50):
        m.run(xs)
    t = time.perf_counter()
    reps = 500
    for _ in range(reps):
        m.run(xs)
    return reps * BATCH / (time.perf_counter() - t)


def _summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    ratios = [a / b for a, b in pairs]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _svg(path: Path, panels: list[tuple[str, list[tuple[str, float]]]]) -> None:
    """Bar charts, one panel per (title, [(label, value)]); no plotting dependency."""
    width, bar_h = 640, 20
    colours = {"streamer": "#2b7bb9", "streamer-nowait": "#7fb3d5", "naive": "#c0504d"}
    parts: list[str] = []
    y = 10
    for title, bars in panels:
        top = max(v for _, v in bars) or 1
        parts.append(f'<text x="10" y="{y + 14}" font-weight="bold">{title}</text>')
        y += 22
        for label, v in bars:
            w = (width - 300) * v / top
            colour = colours.get(label.split(" ")[0], "#888")
            parts += [f'<text x="10" y="{y + 14}">{label}</text>',
                      f'<rect x="220" y="{y}" width="{w:.0f}" height="{bar_h - 4}" fill="{colour}"/>',
                      f'<text x="{225 + w:.0f}" y="{y + 14}">{v:,.1f}</text>']
            y += bar_h
        y += 12
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
            'font-family="sans-serif" font-size="12">')
    path.write_text("\n".join([head, *parts, "</svg>"]))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3000, help="requests per saturation run")
    ap.add_argument("--rate", type=float, default=200.0, help="offered load, requests/s")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each fixed-load run")
    ap.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    args = ap.parse_args()

    broker = None if args.bootstrap else LocalKafka().start()
    bootstrap = args.bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
    out: dict[str, Any] = {"machine": machine(), "batch": BATCH, "max_wait_ms": WAIT_MS, "partitions": PARTITIONS,
                           "L_model_items_per_s": bare_model(), "saturation": [], "fixed_load": []}
    try:
        msg = len(Run("streamer", bootstrap)._request(0)[0])
        out["request_bytes"] = msg
        print(f"request size {msg} bytes; L_model {out['L_model_items_per_s']:,.0f} items/s", flush=True)
        for variant in ("streamer", "naive"):  # warm-up pair
            await one(variant, bootstrap, 300, None)
        for i in range(args.repeats):
            pair = {v: await one(v, bootstrap, args.requests, None) for v in ("streamer", "naive")}
            out["saturation"].append(pair)
            print(f"saturation {i}: " + ", ".join(f"{v} {r['throughput']:,.0f}/s" for v, r in pair.items()),
                  flush=True)
        n_fixed = int(args.rate * args.seconds)
        for i in range(args.repeats):
            pair = {v: await one(v, bootstrap, n_fixed, args.rate) for v in ("streamer", "streamer-nowait", "naive")}
            out["fixed_load"].append(pair)
            print(f"fixed {args.rate:g}/s {i}: " + ", ".join(
                f"{v} p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms" for v, r in pair.items()), flush=True)
    finally:
        if broker is not None:
            broker.stop()

    sat = out["saturation"]
    fixed = out["fixed_load"]
    out["summary"] = {
        "throughput_ratio": _summary([(p["streamer"]["throughput"], p["naive"]["throughput"]) for p in sat]),
        "cpu_per_request_ratio": _summary([(p["streamer"]["cpu_s_per_request"], p["naive"]["cpu_s_per_request"])
                                           for p in sat]),
        "fixed_p50_ratio": _summary([(p["streamer"]["p50_ms"], p["naive"]["p50_ms"]) for p in fixed]),
        "fixed_p99_ratio": _summary([(p["streamer"]["p99_ms"], p["naive"]["p99_ms"]) for p in fixed]),
        "fixed_nowait_p50_ratio": _summary([(p["streamer-nowait"]["p50_ms"], p["naive"]["p50_ms"]) for p in fixed]),
        "efficiency_vs_L_model": statistics.median(p["streamer"]["throughput"] for p in sat)
        / out["L_model_items_per_s"],
    }
    for variant in ("streamer", "streamer-nowait", "naive"):
        for mode, runs in (("saturation", sat), ("fixed_load", fixed)):
            if variant not in runs[0]:
                continue
            for field in ("throughput", "p50_ms", "p99_ms", "cpu_s_per_request"):
                out["summary"][f"{mode}.{variant}.{field}"] = statistics.median(p[variant][field] for p in runs)
    write(out, args.rate)
    print(json.dumps(out["summary"], indent=2))


def write(out: dict[str, Any], rate: float) -> None:
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "worker_vs_naive.json").write_text(json.dumps(out, indent=2))
    s = out["summary"]
    _svg(results / "worker_vs_naive.svg", [
        ("saturation: requests/s (median)", [(v, s[f"saturation.{v}.throughput"]) for v in ("streamer", "naive")]),
        (f"offered {rate:g}/s: latency ms (median of runs)",
         [(f"{v} {q}", s[f"fixed_load.{v}.{q}_ms"]) for v in ("streamer", "streamer-nowait", "naive")
          for q in ("p50", "p99")]),
    ])


if __name__ == "__main__":
    asyncio.run(main())
