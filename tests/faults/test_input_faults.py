"""Fault suite, inputs: poison items, hostile bytes, expired deadlines, floods (real worker processes)."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest

from producers import StreamerClient, request_headers
from schemas import Codec, InferenceRequest, ReplyTo
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.models import load_model

from ..helpers import Processes, read_topic
from .load import report, scaled

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_poison_item_is_bisected_out_of_its_batch(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    inputs = [np.full(16, float(i), dtype=np.float32) for i in range(32)]  # inputs[13] is all 13.0: poison
    async with StreamerClient(client_settings) as client:
        futures = [await client.submit(x, model="poison-tiny", key="one-batch") for x in inputs]
        w = processes.worker(ws, "--model", "tests.fault_models:poison_tiny", max_batch_size=32, max_wait_ms=500)
        results = [await f for f in futures]
    assert [r.status for r in results] == ["ok"] * 13 + ["error"] + ["ok"] * 18
    assert results[13].error is not None and results[13].error.code == "model_error"
    assert "poison" in results[13].error.message
    expected = load_model("tiny-mlp", "cpu").run([x for i, x in enumerate(inputs) if i != 13])
    np.testing.assert_allclose(np.stack([r.outputs for i, r in enumerate(results) if i != 13]), np.stack(expected),
                               rtol=1e-5, atol=1e-6)
    dead = await read_topic(ws, ws.dead_letter_topic, 1)
    assert dict(dead[0].headers)["streamer-request-id"].decode() == results[13].id
    w.signal(signal.SIGTERM)
    assert await asyncio.to_thread(w.proc.wait, 60) == 0
    passes = re.findall(r"forward_passes=(\d+), extra_forward_passes=(\d+)", processes.logs())
    total, extra = map(int, passes[-1])
    report(f"poison item in a batch of 32: 1 error, 31 ok, {extra} extra forward passes ({total} in all)")
    assert extra <= 2 * 5  # bisection: two passes per level, log2(32) = 5 levels


async def test_hostile_bytes_cost_little_memory_and_the_partition_keeps_moving(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    w = processes.worker(ws, max_message_bytes=200_000, max_batch_size=64)
    await processes.wait_group(ws, ws.group_id, 1)
    reply = ReplyTo(topic=ws.results_topic)

    def raw(i: int, **fields: object) -> bytes:
        return msgpack.packb({"id": f"h{i}", "model": "tiny-mlp", "reply_to": reply.model_dump(), **fields})

    hostile = [
        b"\x91" * 10_000 + b"\x90",  # nesting 10,000 deep
        b"\xdd\x3b\x9a\xca\x00",  # an array declaring 10^9 items
        b"\xdb\x3b\x9a\xca\x00abc",  # a string declaring 10^9 bytes
        b"\x81\xa2id\xa2\xff\xfe",  # bad UTF-8
        b"\x81\x01\x02",  # an integer map key
        raw(0, inputs=[0.0] * 30_000),  # over the 200 kB limit
        raw(1, inputs=[float("nan")] * 16),  # NaN where the model forbids it
        raw(2, inputs=[float("inf")] * 16),
        raw(3, inputs=msgpack.ExtType(1, bytes([9, 1, 0, 0, 0, 0, 0, 0]) + (16).to_bytes(8, "little") + bytes(128))),
        raw(4, inputs=[1.0] * 5),  # the wrong shape
    ]
    producer = kafka.producer(ws)
    await producer.start()
    try:
        await producer.send_and_wait(ws.request_topic, Codec().encode_request(
            InferenceRequest(id="warm", model="tiny-mlp", inputs=[0.0] * 16, reply_to=reply)), key=b"k")
        await read_topic(ws, ws.results_topic, 1)
        before = rss_mb(w.proc.pid)
        rounds = 60
        for r in range(rounds):
            for n, value in enumerate(hostile):
                rid = f"hostile-{r}-{n}"
                await producer.send(ws.request_topic, value, key=b"k",
                                    headers=request_headers(InferenceRequest(id=rid, model="x", inputs=None,
                                                                             reply_to=reply)))
        await producer.flush()
        results = await read_topic(ws, ws.results_topic, 1 + rounds * len(hostile), timeout_s=120)
        after = rss_mb(w.proc.pid)
    finally:
        await producer.stop()
    dead = await read_topic(ws, ws.dead_letter_topic, rounds * len(hostile), timeout_s=120)
    statuses = [Codec().decode_result(r.value).status for r in results[1:]]
    assert statuses == ["error"] * (rounds * len(hostile))
    assert len(dead) == rounds * len(hostile)
    report(f"hostile bytes: {rounds * len(hostile)} records, worker RSS {before:.0f} -> {after:.0f} MB")
    assert after - before < 100
    async with StreamerClient(client_settings) as client:  # the partition keeps moving
        assert (await client.infer([0.1] * 16, model="tiny-mlp", key="k", timeout_s=60)).status == "ok"


async def test_an_expired_deadline_is_dropped_before_inference(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    processes.worker(ws)
    async with StreamerClient(client_settings) as client:
        expired = await client.infer([0.1] * 16, model="tiny-mlp", deadline_ms=1, check=False, timeout_s=60)
        fine = await client.infer([0.1] * 16, model="tiny-mlp", timeout_s=60)
    assert expired.status == "expired" and expired.error is not None
    assert expired.error.code == "deadline_exceeded" and expired.timings is None  # the model never ran
    assert fine.status == "ok"


async def test_a_flood_on_a_slow_model_stays_bounded_and_recovers(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    w = processes.worker(ws, "--model", "tests.fault_models:slow_tiny", max_batch_size=32, stats_interval_s=1,
                         FAULT_DELAY_MS=40)
    await processes.wait_group(ws, ws.group_id, 1)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(scaled(6000), seed=39)
    async with StreamerClient(client_settings) as client:
        before = rss_mb(w.proc.pid)
        futures = [await client.submit(x, model="slow-tiny", key=f"k{i % 32}", timeout_s=300)
                   for i, x in enumerate(inputs)]
        peak = before
        while not all(f.done() for f in futures):
            peak = max(peak, rss_mb(w.proc.pid))
            await asyncio.wait(futures, timeout=0.5)
        results = [f.result() for f in futures]
        after_flood = await client.infer(inputs[0], model="slow-tiny", timeout_s=60)
    assert all(r.status == "ok" for r in results) and after_flood.status == "ok"
    buffered = [int(b) for b in re.findall(r"buffered (\d+)", processes.logs())]
    report(f"flood of {len(inputs)} on a slow model: RSS {before:.0f} -> peak {peak:.0f} MB, "
          f"most records buffered {max(buffered, default=0)} (limit 128)")
    assert max(buffered, default=0) <= 128 + 32
    assert peak - before < 100
