"""Fault suite, workers: SIGKILL mid-batch under steady keyed load (real processes, real broker)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import pytest

from producers import StreamerClient
from schemas import InferenceResult
from streamer import ClientSettings, WorkerSettings
from streamer.models import load_model

from ..helpers import Processes
from .load import MODES, Load, check, drain, explain_duplicates, figures, isolation, report, scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SLOW = ("--model", "tests.fault_models:slow_tiny")  # tiny-mlp sleeping 40 ms per batch


@pytest.mark.parametrize("mode", MODES)
async def test_sigkill_one_of_three_workers_five_times(
    mode: str, created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    workers = await processes.group(ws, 3, *SLOW, torch_threads=1, delivery=mode)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(6000), seed=31)
    kills: list[float] = []
    async with StreamerClient(client_settings) as client:
        load = Load(client, "slow-tiny", inputs, keys=24, rate=150)
        publishing = asyncio.create_task(load.run())
        for n in range(5):
            # Each kill a fault of its own: the group has recovered from the last (a killed member's
            # partitions wait for the 6 s session timeout) before the next. Kills closer than that
            # chain their rebalances, and the figure measures the chain, not one crash.
            await asyncio.sleep(2.5 if n == 0 else 8.0)
            victim = workers[n % 3]
            victim.signal(signal.SIGKILL)  # the model sleeps 40 ms per batch: this lands mid-batch
            kills.append(time.monotonic())
            await asyncio.to_thread(victim.proc.wait)
            workers[n % 3] = processes.worker(ws, *SLOW, torch_threads=1, delivery=mode)
        await publishing
        results = await load.results()
        raw = await drain(client_settings, client.reply_to.topic, isolation_level=isolation(mode))
    fig = figures(load, results, raw, kills)
    await explain_duplicates(fig, client_settings, created_topics.request_topic, raw)
    report(fig.line(f"SIGKILL 1 of 3 workers x5 [{mode}]"), fig, mode=mode)
    check(fig, mode)
    assert all(not isinstance(r, BaseException) and r.status == "ok" for r in results)


@pytest.mark.parametrize("mode", MODES)
async def test_scale_one_three_one_during_load(
    mode: str, created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    first = processes.worker(ws, *SLOW, torch_threads=1, delivery=mode)
    await processes.wait_group(ws, ws.group_id, 1)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(2400), seed=33)
    events: list[float] = []
    async with StreamerClient(client_settings) as client:
        load = Load(client, "slow-tiny", inputs, keys=24, rate=150)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        events.append(time.monotonic())
        extra = await processes.group(ws, 2, *SLOW, members=3, torch_threads=1, delivery=mode)
        await asyncio.sleep(3)
        for p in extra:
            p.signal(signal.SIGTERM)  # scale back down the way an orchestrator does
        events.append(time.monotonic())
        assert all(code == 0 for code in await asyncio.gather(*(asyncio.to_thread(p.proc.wait) for p in extra)))
        await publishing
        results = await load.results()
        raw = await drain(client_settings, client.reply_to.topic, isolation_level=isolation(mode))
    fig = figures(load, results, raw, events)
    await explain_duplicates(fig, client_settings, created_topics.request_topic, raw)
    report(fig.line(f"scale 1 -> 3 -> 1 workers [{mode}]"), fig, mode=mode)
    check(fig, mode)
    assert first.proc.poll() is None
    served = {r.worker for r in results if not isinstance(r, BaseException)}
    assert len(served) == 3, f"all three workers should have served: {served}"


@pytest.mark.parametrize("mode", MODES)
async def test_sigstop_past_the_session_timeout_then_sigcont(
    mode: str, created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics.model_copy(update={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000})
    frozen = processes.worker(ws, torch_threads=1, delivery=mode)
    processes.worker(ws, torch_threads=1, delivery=mode)
    await processes.wait_group(ws, ws.group_id, 2)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(1800), seed=35)
    async with StreamerClient(client_settings) as client:
        load = Load(client, "tiny-mlp", inputs, keys=24, rate=120)
        publishing = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await asyncio.sleep(9)  # past the 6 s session timeout: the group moves on without it
        frozen.signal(signal.SIGCONT)
        await publishing
        results = await load.results()
        raw = await drain(client_settings, client.reply_to.topic, isolation_level=isolation(mode))
    fig = figures(load, results, raw, [stopped_at])
    await explain_duplicates(fig, client_settings, created_topics.request_topic, raw)
    report(fig.line(f"SIGSTOP a worker past the session timeout, then SIGCONT [{mode}]"), fig, mode=mode)
    check(fig, mode)
    assert frozen.proc.poll() is None, "the resumed worker must rejoin, not die"


async def test_a_batch_longer_than_the_poll_interval_keeps_its_membership(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    """The model runs 7 s per batch against a 5 s max.poll.interval: no rebalance, no redo loop."""
    ws = created_topics
    w = processes.worker(ws, "--model", "tests.fault_models:slow_tiny", max_poll_interval_ms=5000,
                         max_batch_size=8, max_buffered=8, FAULT_DELAY_MS=7000, FAULT_PROMPT_BATCHES=2)
    w_env_ok = w.proc.poll() is None
    assert w_env_ok
    await processes.wait_group(ws, ws.group_id, 1)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(16, seed=37)  # two batches, each past the interval
    async with StreamerClient(client_settings) as client:
        results = await asyncio.gather(*(client.infer(x, model="slow-tiny", key=f"k{i % 4}", timeout_s=200)
                                         for i, x in enumerate(inputs)))
        raw = await drain(client_settings, client.reply_to.topic)
    assert len({r.id for r in results}) == 16 and all(r.status == "ok" for r in results)
    assert len(raw) == 16, "no batch may be redone: a redo means the worker lost its membership"
    assert processes.logs().count("partitions revoked") == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_rebalance_while_the_queue_is_full_does_not_stall_the_worker(
    mode: str, created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    """Worker A's queue is full when B joins: the rebalance drops A's queued records, and A must fetch
    again at once, not after max_poll_interval_ms / 3 (100 s) waiting for room that was already made."""
    ws = created_topics
    slow = {"torch_threads": 1, "delivery": mode, "max_batch_size": 8, "FAULT_DELAY_MS": 250}
    processes.worker(ws, *SLOW, **slow)
    await processes.wait_group(ws, ws.group_id, 1)
    inputs = iter(load_model("tiny-mlp", "cpu").example_inputs(scaled(200) + 6000, seed=41))
    arrived: list[float] = []
    futures: list[asyncio.Future[InferenceResult]] = []
    async with StreamerClient(client_settings) as client:

        async def submit() -> None:
            n = len(futures)
            fut = await client.submit(next(inputs), model="slow-tiny", key=f"k{n % 16}", timeout_s=240)
            fut.add_done_callback(lambda _f: arrived.append(time.monotonic()))
            futures.append(fut)

        for _ in range(scaled(200)):
            await submit()
        # A is serving, 8 records per 250 ms, with its queue full behind.
        await asyncio.wait(futures[:16])
        processes.worker(ws, *SLOW, **slow)
        joined = time.monotonic()
        # B's start (Python, torch, the model, the join) took 6 s here on an idle machine, longer under the
        # whole suite: A's backlog is topped up at A's own pace until B is in the group, so B's join always
        # finds A's queue full, however long the start took.
        joining = asyncio.create_task(processes.wait_group(ws, ws.group_id, 2))
        while not joining.done():
            await submit()
            await asyncio.sleep(1 / 32)
        await joining
        results = await asyncio.gather(*futures)
    assert all(r.status == "ok" for r in results)
    assert len({r.worker for r in results}) == 2  # both served
    after = [t - joined for t in arrived if t > joined]
    gaps = [b - a for a, b in itertools.pairwise([0.0, *sorted(after)])]
    report(f"rebalance with a full queue [{mode}]: {len(after)} requests answered in {max(after):.1f} s after "
           f"the join, longest pause {max(gaps):.1f} s")
    assert max(after) < 60, "a worker stalled after a rebalance with a full queue"
