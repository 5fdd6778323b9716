"""``streamer replay``: exact ranges by offsets and by time, stop and resume, pipelines, sinks, republish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition

from consumers.replay import parse_offsets, parse_time_ms
from producers import request_headers
from schemas import Codec, InferenceRequest, ReplyTo
from streamer import WorkerSettings, kafka
from streamer.models import load_model
from streamer.pipeline import BUILTIN_PIPELINES, load_pipeline
from streamer.testing import WorkerProcess

from .helpers import Processes, read_topic, settings_env

pytestmark = [pytest.mark.kafka]


def test_parse_offsets_and_times() -> None:
    assert parse_offsets("0:100-200, 1:50-,2:-10") == {0: (100, 200), 1: (50, None), 2: (None, 10)}
    with pytest.raises(Exception, match="expected PARTITION:START-END"):
        parse_offsets("0:abc")
    with pytest.raises(Exception, match="end before start"):
        parse_offsets("0:10-5")
    assert parse_time_ms("1700000000000") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20") == 1_700_000_000_000  # UTC unless it says otherwise
    with pytest.raises(Exception, match="ISO 8601"):
        parse_time_ms("yesterday")


async def _publish(ws: WorkerSettings, topic: str, inputs: list[Any], model: str, prefix: str,
                   keys: int = 16, deadline_ms: int | None = None) -> None:
    codec = Codec()
    producer = kafka.producer(ws)
    await producer.start()
    try:
        for i, x in enumerate(inputs):
            req = InferenceRequest(id=f"{prefix}{i:05d}", model=model, inputs=x, key=f"k{i % keys}",
                                   reply_to=ReplyTo(topic=ws.results_topic), deadline_ms=deadline_ms)
            await producer.send(topic, codec.encode_request(req), key=req.key.encode(),  # type: ignore[union-attr]
                                headers=request_headers(req))
        await producer.flush()
    finally:
        await producer.stop()


def _replay(ws: WorkerSettings, *args: str, check: bool = True, **env: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run([sys.executable, "-m", "streamer", "replay", "--no-progress", *args],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **settings_env(ws), **env})
    if check and out.returncode != 0:
        raise AssertionError(f"replay exited {out.returncode}:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    return out.returncode, summary, out.stderr


def _listing(path: Path) -> list[Path]:
    return list(path.iterdir())


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_exact_ranges_by_offsets_and_by_time(created_topics: WorkerSettings, tmp_path: Path) -> None:
    ws = created_topics
    model = load_model("tiny-mlp", "cpu")
    before, after = model.example_inputs(120, seed=1), model.example_inputs(80, seed=2)
    await _publish(ws, ws.request_topic, before, "tiny-mlp", "a", deadline_ms=1)  # long expired
    # A record that is not a request at all: it gets an error result named by its offset.
    producer = kafka.producer(ws)
    await producer.start()
    bad = await producer.send_and_wait(ws.request_topic, b"\xc1garbage", key=b"k0")
    await producer.stop()
    await asyncio.sleep(1.0)
    boundary = int(time.time() * 1000)
    await asyncio.sleep(0.5)
    await _publish(ws, ws.request_topic, after, "tiny-mlp", "b")
    records = await read_topic(ws, ws.request_topic, 201)
    at = {(r.partition, r.offset): r for r in records}

    # By offsets: exact spans, one result per record, outputs equal to the model's own.
    _, summary, _ = _replay(ws, "--model", "tiny-mlp", "--offsets", "0:3-20,1:0-,3:5-6",
                             "--sink", str(tmp_path / "by-offsets.jsonl"), "--job", "o1")
    wanted = {k for k in at if (k[0] == 0 and 3 <= k[1] < 20) or k[0] == 1 or (k[0] == 3 and k[1] == 5)}
    got = _lines(tmp_path / "by-offsets.jsonl")
    assert summary["range_size"] == summary["processed"] == len(got) == len(wanted)
    codec = Codec()
    ids = set()
    for (p, o) in wanted:
        r = at[(p, o)]
        ids.add(codec.decode_request(r.value).id if r.offset != bad.offset or p != bad.partition
                else f"{ws.request_topic}:{p}:{o}")
    assert {line["id"] for line in got} == ids
    inputs = {f"a{i:05d}": x for i, x in enumerate(before)} | {f"b{i:05d}": x for i, x in enumerate(after)}
    for line in got:
        if line["status"] == "ok":
            np.testing.assert_allclose(line["outputs"], model.run([model.validate(inputs[line["id"]])])[0],
                                       rtol=1e-5, atol=1e-6)
        else:
            assert line["id"] == f"{ws.request_topic}:{bad.partition}:{bad.offset}"
            assert line["error"]["code"] == "decode_error"
    assert summary["errors"] == (1 if (bad.partition, bad.offset) in wanted else 0)
    assert summary["expired"] == 0  # deadlines are ignored by default
    assert summary["ok"] + summary["errors"] == summary["processed"]

    # The same range again under another job: identical outputs for every request id.
    _replay(ws, "--model", "tiny-mlp", "--offsets", "0:3-20,1:0-,3:5-6", "--sink", str(tmp_path / "again.jsonl"),
            "--job", "o2")
    def outputs(lines: list[dict[str, Any]]) -> dict[str, Any]:
        return {r["id"]: (r["status"], r.get("outputs"), r.get("error")) for r in lines}

    assert outputs(_lines(tmp_path / "again.jsonl")) == outputs(got)  # exactly equal, not just close

    # By time: --from the boundary is exactly the second batch; --to it, exactly the first (and the bad one).
    _, late, _ = _replay(ws, "--model", "tiny-mlp", "--from", str(boundary), "--sink", str(tmp_path / "late.jsonl"))
    assert sorted(r["id"] for r in _lines(tmp_path / "late.jsonl")) == [f"b{i:05d}" for i in range(80)]
    assert late["processed"] == 80
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(boundary / 1000)) + f".{boundary % 1000:03d}Z"
    _, early, _ = _replay(ws, "--model", "tiny-mlp", "--to", iso, "--keep-deadlines",
                          "--sink", str(tmp_path / "early.jsonl"))
    early_ids = sorted(r["id"] for r in _lines(tmp_path / "early.jsonl"))
    assert early_ids == sorted([f"a{i:05d}" for i in range(120)] + [f"{ws.request_topic}:{bad.partition}:{bad.offset}"])
    assert early["expired"] == 120 and early["errors"] == 1  # --keep-deadlines: the old deadlines count


@pytest.mark.slow
async def test_stop_and_resume_while_live_traffic_arrives(
    created_topics: WorkerSettings, tmp_path: Path, processes: Processes
) -> None:
    ws = created_topics
    n = 1500
    inputs = load_model("tiny-mlp", "cpu").example_inputs(n, seed=4)
    await _publish(ws, ws.request_topic, inputs, "slow-tiny", "r")
    sink = tmp_path / "resume.jsonl"
    args = ["--model", "tests.fault_models:slow_tiny", "--batch-size", "32", "--sink", str(sink), "--job", "resume",
            "--checkpoint-s", "0.1"]
    first = WorkerProcess({**settings_env(ws), "FAULT_DELAY_MS": "60"}, tmp_path / "first.log", "--no-progress",
                          *args, command="replay")
    processes.started.append(first)

    async def lines_at_least(count: int) -> None:
        while not sink.exists() or len(sink.read_bytes().splitlines()) < count:
            processes.check_alive()
            await asyncio.sleep(0.02)

    await lines_at_least(1)  # the job has fixed its range: live traffic from now on is not part of it
    live = asyncio.create_task(_publish(ws, ws.request_topic, inputs[:300], "slow-tiny", "live"))
    await lines_at_least(300)
    first.signal(signal.SIGKILL)  # no goodbye: whatever was written after the last commit is cut on resume
    first.proc.wait(30)
    await live
    written = len(sink.read_bytes().splitlines())
    assert 300 <= written < n

    _, summary, _ = _replay(ws, *args, FAULT_DELAY_MS="5")
    assert summary["complete"] is True and summary["range_size"] == n
    assert 0 < summary["done_before"] <= written
    assert summary["done_before"] + summary["processed"] == n
    lines = _lines(sink)
    assert len(lines) == n  # nothing twice, nothing lost, and none of the live traffic that came later
    assert sorted(r["id"] for r in lines) == [f"r{i:05d}" for i in range(n)]

    # Done is done: the same command again has nothing left; --restart does it all over.
    _, again, _ = _replay(ws, *args)
    assert again["processed"] == 0 and again["complete"] is True
    assert len(_lines(sink)) == n
    _, restarted, _ = _replay(ws, *args, "--restart", FAULT_DELAY_MS="0")
    assert restarted["processed"] == n + 300  # the range now includes the live traffic
    assert len(_lines(sink)) == n + 300


async def test_a_second_run_of_a_running_job_refuses_to_start(
    created_topics: WorkerSettings, tmp_path: Path, processes: Processes
) -> None:
    """Two runs of one job would write into one sink together: the second refuses, naming the job, and the
    first goes on to write every result once."""
    ws = created_topics
    n = 600
    await _publish(ws, ws.request_topic, load_model("tiny-mlp", "cpu").example_inputs(n, seed=6), "slow-tiny", "j")
    sink = tmp_path / "once.jsonl"
    args = ["--model", "tests.fault_models:slow_tiny", "--batch-size", "4", "--sink", str(sink), "--job", "once"]
    # 150 batches of 100 ms: it runs longer than a second run waits (a session timeout and a little) to refuse.
    first = WorkerProcess({**settings_env(ws), "FAULT_DELAY_MS": "100"}, tmp_path / "first.log", "--no-progress",
                          *args, command="replay")
    processes.started.append(first)
    while not sink.exists() or not sink.read_bytes():
        processes.check_alive()
        await asyncio.sleep(0.05)
    code, _, err = await asyncio.to_thread(_replay, ws, *args, check=False, FAULT_DELAY_MS="0")
    assert code == 2, err
    assert "replay job 'once' is already running" in err and "Traceback" not in err
    assert first.proc.wait(120) == 0
    lines = _lines(sink)
    assert sorted(r["id"] for r in lines) == [f"j{i:05d}" for i in range(n)]  # each once: nothing interleaved


@pytest.mark.slow
async def test_replay_through_minilm_2stage_into_parquet(worker_settings: WorkerSettings, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    ws = worker_settings
    name = f"minilm-2stage-{uuid.uuid4().hex[:8]}"
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text((BUILTIN_PIPELINES / "minilm-2stage.toml").read_text()
                         .replace('name = "minilm-2stage"', f'name = "{name}"'))
    spec = load_pipeline(spec_path)
    source = spec.input_topic(spec.order[0].name)
    await kafka.ensure_topics(ws, [kafka.TopicSpec(source, 3)])
    reference = load_model("minilm", "cpu")
    sentences = reference.example_inputs(40, seed=8)
    await _publish(ws, source, sentences, name, "s")

    out = tmp_path / "embeddings.parquet"
    _, summary, _ = _replay(ws, "--pipeline", str(spec_path), "--device", "cpu", "--topic", source,
                            "--batch-size", "16", "--sink", str(out), STREAMER_TORCH_THREADS="1")
    assert summary["complete"] and summary["processed"] == 40 and summary["ok"] == 40
    table = pq.read_table(out).to_pylist()
    assert not out.with_name(out.name + ".jsonl").exists()  # the journal is gone once the Parquet file is whole
    assert sorted(r["id"] for r in table) == [f"s{i:05d}" for i in range(40)]
    expected = reference.run([reference.validate(s) for s in sentences])
    for row in table:
        got = np.asarray(row["outputs"], dtype=np.float32)
        assert float(np.abs(got - expected[int(row["id"][1:])]).max()) <= 1e-5
        assert [s["stage"] for s in row["stages"]] == ["tokenize", "encode"]


@pytest.mark.slow
async def test_republish_feeds_live_workers_under_its_own_reply_topic(
    created_topics: WorkerSettings, processes: Processes, tmp_path: Path
) -> None:
    ws = created_topics
    model = load_model("tiny-mlp", "cpu")
    inputs = model.example_inputs(150, seed=6)
    await _publish(ws, ws.request_topic, inputs, "tiny-mlp", "p")
    await processes.group(ws, 1)
    live_results = await read_topic(ws, ws.results_topic, 150)  # the live system answered the originals

    # Slowly (40/s), and stopped part-way: the job commits how far it sent.
    args = ["--republish", "--rate", "40", "--checkpoint-s", "0.2", "--model", "tiny-mlp", "--job", "re",
            "--sink", str(tmp_path / "re.jsonl")]
    first = WorkerProcess(settings_env(ws), tmp_path / "republish.log", "--no-progress", *args, command="replay")
    processes.started.append(first)
    await asyncio.sleep(4)  # start-up, then about 80 of the 150 sent
    first.signal(signal.SIGTERM)
    assert first.proc.wait(60) == 3  # stopped early: resumable
    assert not (tmp_path / "re.jsonl").exists()  # the sink is written once every answer is in

    _, summary, _ = _replay(ws, *[a if a != "40" else "400" for a in args])
    assert summary["complete"] and summary["range_size"] == 150 and summary["ok"] == 150
    assert 0 < summary["done_before"] < 150 and summary["done_before"] + summary["processed"] == 150
    lines = _lines(tmp_path / "re.jsonl")
    assert sorted(r["id"] for r in lines) == [f"p{i:05d}" for i in range(150)]
    for line in lines:
        np.testing.assert_allclose(line["outputs"], model.run([model.validate(inputs[int(line["id"][1:])])])[0],
                                   rtol=1e-5, atol=1e-6)
    # Replies went to the job's own topic, not to the live results topic.
    ends, _ = await kafka.offset_bounds(ws, [TopicPartition(ws.results_topic, p) for p in range(4)])
    assert sum(ends.values()) == len(live_results)


@pytest.mark.slow
async def test_replay_in_two_processes_joins_one_sink(created_topics: WorkerSettings, tmp_path: Path) -> None:
    ws = created_topics
    model = load_model("tiny-mlp", "cpu")
    inputs = model.example_inputs(400, seed=12)
    await _publish(ws, ws.request_topic, inputs, "tiny-mlp", "m")
    sink = tmp_path / "joined.parquet"
    _, summary, _ = _replay(ws, "--model", "tiny-mlp", "--processes", "2", "--batch-size", "64", "--sink", str(sink))
    assert summary["complete"] and summary["range_size"] == summary["processed"] == summary["ok"] == 400
    import pyarrow.parquet as pq

    rows = pq.read_table(sink).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"m{i:05d}" for i in range(400)]
    for r in rows:
        np.testing.assert_allclose(r["outputs"], model.run([model.validate(inputs[int(r["id"][1:])])])[0],
                                   rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in _listing(tmp_path)) == ["joined.parquet"]  # the parts are gone
    # Two jobs did the work, one per process, each with its own committed progress.
    _, again, _ = _replay(ws, "--model", "tiny-mlp", "--processes", "2", "--batch-size", "64", "--sink", str(sink))
    assert again["processed"] == 0 and again["done_before"] == 400 and again["complete"]
    assert len(pq.read_table(sink)) == 400  # a finished job leaves its sink alone


@pytest.mark.slow
async def test_republish_into_a_live_pipeline(worker_settings: WorkerSettings, processes: Processes,
                                              tmp_path: Path) -> None:
    """--republish --pipeline: the range goes to the pipeline's first stage; its answers to the job's topic."""
    from .test_pipelines import TINY

    ws = worker_settings
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY.format(name=name, delay_ms=0))
    spec = load_pipeline(spec_path)
    source = spec.input_topic(spec.order[0].name)
    await kafka.ensure_topics(ws, [*(kafka.TopicSpec(spec.input_topic(s.name), 2) for s in spec.order),
                                   *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order),
                                   kafka.TopicSpec(ws.results_topic, 2)])
    for stage in spec.order:
        processes.stage(ws, spec_path, stage.name)
    inputs = [np.full(4, i, dtype=np.float32) for i in range(60)]
    await _publish(ws, source, inputs, name, "t")
    live = {(r := Codec().decode_result(rec.value)).id: r for rec in await read_topic(ws, ws.results_topic, 60)}

    _, summary, _ = _replay(ws, "--republish", "--pipeline", str(spec_path), "--topic", source, "--rate", "500",
                            "--sink", str(tmp_path / "tiny.jsonl"))
    assert summary["complete"] and summary["processed"] == 60 and summary["ok"] == 60
    lines = _lines(tmp_path / "tiny.jsonl")
    assert sorted(r["id"] for r in lines) == sorted(live)
    for line in lines:
        np.testing.assert_allclose(line["outputs"], live[line["id"]].outputs)
        assert [s["stage"] for s in line["stages"]] == ["double", "total"]
    ends, _ = await kafka.offset_bounds(ws, [TopicPartition(ws.results_topic, p) for p in range(2)])
    assert sum(ends.values()) == 60  # the republished requests were answered on the job's topic only
