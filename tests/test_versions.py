"""Model versions: a rolling upgrade without loss, a canary's share of the partitions, hot reload of the weights.

Two versions of tiny-mlp differ only in their weights (two safetensors files); every result names the version
that computed it, and its outputs are checked against that version's weights run directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from safetensors.torch import load_file, save_file

from producers import StreamerClient
from schemas import InferenceResult
from streamer import ClientSettings, ConfigError, WorkerSettings, kafka, load_settings
from streamer.assignors import CapacityAssignor, MemberCard
from streamer.models import TinyMLP, tiny_mlp_weights
from streamer.status import group_status

from .faults.load import Load, figures
from .helpers import Processes


class _Cluster:
    def __init__(self, partitions: int) -> None:
        self.n = partitions

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.n))


def _shares(cards: dict[str, MemberCard], partitions: int) -> dict[str, int]:
    members = {m: ConsumerProtocolMemberMetadata(1, ["t"], c.encode()) for m, c in cards.items()}
    result = CapacityAssignor(lambda: MemberCard("x")).assign(_Cluster(partitions), members)
    return {m: sum(len(p) for _, p in a.assignment) for m, a in result.items()}


def test_canary_share_is_rounded_to_whole_partitions() -> None:
    regular = {f"r{i}": MemberCard(f"r{i}", 100.0) for i in range(3)}
    assert _shares({**regular, "c": MemberCard("c", 100.0, share=0.25)}, 8)["c"] == 2
    assert _shares({**regular, "c": MemberCard("c", 100.0, share=0.1)}, 8)["c"] == 1  # 0.8 -> 1
    assert _shares({**regular, "c": MemberCard("c", 100.0, share=0.01)}, 8)["c"] == 1  # at least one
    got = _shares({"r": MemberCard("r", 100.0), "c": MemberCard("c", 100.0, share=0.9)}, 4)
    assert got == {"r": 1, "c": 3}  # 3.6 -> 4, but one stays with the regular member
    two = _shares({**regular, "c1": MemberCard("c1", 1.0, share=0.1), "c2": MemberCard("c2", 1.0, share=0.1)}, 10)
    assert (two["c1"], two["c2"]) == (1, 1)
    assert sum(v for k, v in two.items() if k.startswith("r")) == 8
    assert _shares({"c": MemberCard("c", share=0.2)}, 4) == {"c": 4}  # only canaries: they take everything
    assert _shares({"r": MemberCard("r", 1.0), "c": MemberCard("c", share=0.5)}, 1) == {"r": 1, "c": 0}


def test_traffic_share_needs_the_capacity_assignor() -> None:
    with pytest.raises(ConfigError, match="traffic_share needs assignor capacity"):
        load_settings(WorkerSettings, traffic_share=0.1)
    assert load_settings(WorkerSettings, traffic_share=0.1, assignor="capacity").traffic_share == 0.1


def _weights(path: Path, scale: float) -> Path:
    """tiny-mlp's weights with the output layer scaled: another version, same shapes."""
    state = load_file(str(tiny_mlp_weights()))
    state["fc2.weight"] = state["fc2.weight"] * scale
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _expected(weights: Path, inputs: list[Any]) -> list[Any]:
    model = TinyMLP(torch.device("cpu"), weights)
    return model.run([model.validate(x) for x in inputs])


def _computed_by(result: InferenceResult, x: int, expected: dict[str, list[Any]]) -> str | None:
    """The version whose weights give this result's outputs, if any."""
    for version, outputs in expected.items():
        if np.allclose(np.asarray(result.outputs), outputs[x], rtol=1e-4, atol=1e-5):
            return version
    return None


async def _topics(ws: WorkerSettings, partitions: int) -> None:
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, partitions),
                                   kafka.TopicSpec(ws.results_topic, 2), kafka.TopicSpec(ws.dead_letter_topic, 1)])


@pytest.mark.kafka
@pytest.mark.slow
async def test_rolling_upgrade_under_load_loses_nothing(worker_settings: WorkerSettings,
                                                        client_settings: ClientSettings, processes: Processes,
                                                        tmp_path: Path) -> None:
    """Two v1 workers serve steady keyed load; two v2 workers join; the v1 workers are stopped (SIGTERM, which
    drains) one at a time. Nothing is lost, per-key order holds, and every result names the version whose
    weights computed it."""
    ws = worker_settings
    await _topics(ws, 4)
    files = {"v1": _weights(tmp_path / "v1.safetensors", 1.0), "v2": _weights(tmp_path / "v2.safetensors", -2.0)}
    common: dict[str, Any] = {"torch_threads": 1, "session_timeout_ms": 6000}
    old = [processes.worker(ws, weights=files["v1"], model_version="v1", **common) for _ in range(2)]
    await processes.wait_group(ws, ws.group_id, 2)
    inputs = TinyMLP(torch.device("cpu")).example_inputs(1800, seed=9)
    expected = {v: _expected(f, inputs) for v, f in files.items()}
    async with StreamerClient(client_settings) as client:
        # The v2 workers' start took longer than the load under the whole suite on a 2-core machine (every
        # result from v1): the last 300 requests wait until both v1 workers are stopped, so v2 serves them.
        load = Load(client, "tiny-mlp", inputs, keys=16, rate=150, tail=300)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(2)
        changes = [time.monotonic()]
        for _ in range(2):
            processes.worker(ws, weights=files["v2"], model_version="v2", **common)
        await processes.wait_group(ws, ws.group_id, 4)
        for n, proc in enumerate(old):
            changes.append(time.monotonic())
            # SIGTERM: the batch in flight finishes and is committed (off the loop: the load goes on meanwhile)
            assert await asyncio.to_thread(processes.stop, proc) == 0
            await processes.wait_group(ws, ws.group_id, 3 - n)
        load.release()
        await publishing
        results = await load.results()
    fig = figures(load, results, [], changes)
    failed = [r for r in results if not isinstance(r, InferenceResult) or r.status != "ok"]
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    assert fig.lost == 0 and fig.duplicates_after_dedup == 0 and fig.order_violations == 0, fig
    ok = [r for r in results if isinstance(r, InferenceResult)]
    named = Counter(r.model_version for r in ok)
    assert set(named) == {"v1", "v2"} and named["v2"] > 0, (named, "v2 started, v1 workers stopped at (s):",
                                                              [round(t - changes[0], 1) for t in changes])
    wrong = [i for i, r in enumerate(ok) if _computed_by(r, i, expected) != r.model_version]
    assert not wrong, f"{len(wrong)} results name another version than the weights that computed them"
    versions_by_worker: dict[str, set[str]] = {}
    for r in ok:
        versions_by_worker.setdefault(r.worker, set()).add(r.model_version)
    assert all(len(v) == 1 for v in versions_by_worker.values()), versions_by_worker
    status = await group_status(ws, ws.group_id)
    assert {m.version for m in status.members} == {"v2"}


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_canary_takes_its_share_of_the_partitions(worker_settings: WorkerSettings,
                                                          client_settings: ClientSettings, processes: Processes,
                                                          tmp_path: Path) -> None:
    """Three v1 members and one v2 canary with --traffic-share 0.25 on 8 partitions: the canary owns 2 partitions,
    and answers a quarter of uniformly keyed traffic, within one partition's worth (1/8)."""
    ws = worker_settings
    await _topics(ws, 8)
    files = {"v1": _weights(tmp_path / "v1.safetensors", 1.0), "v2": _weights(tmp_path / "v2.safetensors", 0.5)}
    common: dict[str, Any] = {"torch_threads": 1, "assignor": "capacity", "capacity": 500}
    for _ in range(3):
        processes.worker(ws, weights=files["v1"], model_version="v1", **common)
    processes.worker(ws, weights=files["v2"], model_version="v2", traffic_share=0.25, **common)
    await processes.wait_group(ws, ws.group_id, 4)
    status = await group_status(ws, ws.group_id)
    owned = {m.version: 0 for m in status.members}
    for m in status.members:
        owned[m.version] = owned.get(m.version, 0) + len(m.partitions)
    assert owned == {"v1": 6, "v2": 2}, status.members

    inputs = TinyMLP(torch.device("cpu")).example_inputs(800, seed=10)
    expected = {v: _expected(f, inputs) for v, f in files.items()}
    async with StreamerClient(client_settings) as client:
        results = await asyncio.gather(*[await client.submit(x, model="tiny-mlp", key=f"user-{i}")
                                         for i, x in enumerate(inputs)])
    assert all(r.status == "ok" for r in results)
    assert all(_computed_by(r, i, expected) == r.model_version for i, r in enumerate(results))
    canary = sum(r.model_version == "v2" for r in results) / len(results)
    assert abs(canary - 0.25) <= 1 / 8, canary


async def _sequential(client: StreamerClient, inputs: list[Any], out: list[InferenceResult],
                      stop: asyncio.Event) -> None:
    """One request at a time, one key: the results come in the order the worker computed them."""
    i = 0
    while not stop.is_set():
        out.append(await client.infer(inputs[i % len(inputs)], model="tiny-mlp", key="one", timeout_s=60))
        i += 1
        await asyncio.sleep(0.01)


def _switches(versions: list[str]) -> list[str]:
    """The versions in the order served, each run of one version once."""
    runs = [versions[0]] if versions else []
    for v in versions[1:]:
        if v != runs[-1]:
            runs.append(v)
    return runs


async def _wait_for(cond: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.kafka
async def test_hot_reload_on_sighup_and_when_the_file_changes(worker_settings: WorkerSettings,
                                                               client_settings: ClientSettings,
                                                               processes: Processes, tmp_path: Path) -> None:
    """A worker serving a weights file reloads it between batches, without leaving the group: on SIGHUP, and
    (another worker) when the file changes. No request fails, results switch version at one point, and a file
    that cannot be loaded keeps the weights served, with the reason in the log."""
    ws = worker_settings
    await _topics(ws, 1)
    a = _weights(tmp_path / "a.safetensors", 1.0)
    b = _weights(tmp_path / "b.safetensors", 3.0)
    served = tmp_path / "served.safetensors"
    served.write_bytes(a.read_bytes())
    version = {p: TinyMLP(torch.device("cpu"), p).version for p in (a, b)}
    inputs = TinyMLP(torch.device("cpu")).example_inputs(50, seed=11)
    expected = {version[p]: _expected(p, inputs) for p in (a, b)}
    worker = processes.worker(ws, weights=served, reload_poll_s=0, torch_threads=1)  # SIGHUP only
    await processes.wait_group(ws, ws.group_id, 1)

    out: list[InferenceResult] = []
    stop = asyncio.Event()
    async with StreamerClient(client_settings) as client:
        running = asyncio.create_task(_sequential(client, inputs, out, stop))
        await _wait_for(lambda: len(out) >= 20)
        os.replace(tmp_path / "b.safetensors", served)  # a new file; no signal yet: still version a
        seen = len(out)
        await _wait_for(lambda: len(out) >= seen + 30)
        assert {r.model_version for r in out} == {version[a]}
        worker.signal(signal.SIGHUP)
        await _wait_for(lambda: out[-1].model_version == version[b])
        await _wait_for(lambda: len(out) >= seen + 60)
        served.write_bytes(b"not a safetensors file")  # a bad file: refused, version b stays
        worker.signal(signal.SIGHUP)
        await _wait_for(lambda: "failed; still serving version" in worker.log_path.read_text())
        seen = len(out)
        await _wait_for(lambda: len(out) >= seen + 20)
        stop.set()
        await running
    assert all(r.status == "ok" for r in out)
    assert _switches([r.model_version for r in out]) == [version[a], version[b]]
    assert all(_computed_by(r, i % len(inputs), expected) == r.model_version for i, r in enumerate(out))
    log = worker.log_path.read_text()
    assert f"version {version[a]} -> {version[b]}" in log and "SIGHUP" in log
    assert log.count("partitions assigned") == 1  # never left the group

    # The file watch: another worker, checking every 0.2 s, follows a change of the file with no signal.
    assert await asyncio.to_thread(processes.stop, worker) == 0
    served.write_bytes(a.read_bytes())
    watcher = processes.worker(ws, weights=served, reload_poll_s=0.2, torch_threads=1)
    await processes.wait_group(ws, ws.group_id, 1)
    out, stop = [], asyncio.Event()
    async with StreamerClient(client_settings) as client:
        running = asyncio.create_task(_sequential(client, inputs, out, stop))
        await _wait_for(lambda: len(out) >= 20)
        tmp = tmp_path / "next.safetensors"
        _weights(tmp, 3.0)
        os.replace(tmp, served)
        await _wait_for(lambda: out[-1].model_version == version[b])
        seen = len(out)
        await _wait_for(lambda: len(out) >= seen + 20)
        stop.set()
        await running
    assert all(r.status == "ok" for r in out)
    assert _switches([r.model_version for r in out]) == [version[a], version[b]]
    assert "the file changed" in watcher.log_path.read_text()
