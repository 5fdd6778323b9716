"""Property: whatever records arrive, a real worker keeps serving, and every record gets one outcome.

hypothesis generates hostile records (tests/hostile.py), interleaved with good requests, into one
running worker on the real broker. Invariants, checked after each example: the worker is alive;
every good request gets its ``ok`` result; every record that is in fact a valid request gets one;
no record gets more than one dead letter; the group's committed offsets pass every record; the
worker wrote into no topic a client named but the results topic; its memory stays bounded. A few
examples run here; ``bench/soak.py`` runs many more.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import Codec
from streamer import WorkerSettings, kafka
from streamer.models import load_model
from streamer.testing import WorkerProcess

from .faults.test_input_faults import rss_mb
from .helpers import settings_env
from .hostile import CODECS, Record, good_record, must_answer, pure_python_batches, records

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MODEL = load_model("tiny-mlp", "cpu")


class Served:
    """One worker serving a fresh set of topics for the whole module, with long-lived producers (one per
    codec) and one reader of everything the worker wrote, so each example costs only its own records."""

    def __init__(self, ws: WorkerSettings, proc: WorkerProcess) -> None:
        self.ws = ws
        self.proc = proc
        self.produced = 0
        self.results_seen: dict[str, list[Any]] = {}
        self.dead_seen: Counter[int] = Counter()  # request-topic offset -> dead letters with that source offset
        self.rss_start = rss_mb(proc.proc.pid)
        self.producers: dict[str | None, Any] = {}
        self.outputs = [TopicPartition(ws.dead_letter_topic, 0), TopicPartition(ws.results_topic, 0),
                        TopicPartition(ws.results_topic, 1)]
        self.reader = kafka.consumer(ws, group_id=None)

    async def start(self) -> None:
        for codec in CODECS:
            self.producers[codec] = kafka.producer(self.ws, compression_type=codec, max_request_size=4 * 1024 * 1024)
            await self.producers[codec].start()
        await self.reader.start()
        self.reader.assign(self.outputs)
        await self.reader.seek_to_beginning(*self.outputs)

    async def close(self) -> None:
        for p in self.producers.values():
            await p.stop()
        await self.reader.stop()

    async def produce(self, batch: list[Record]) -> None:
        with pure_python_batches():
            for r in batch:
                await self.producers[r.codec].send_and_wait(self.ws.request_topic, r.value, key=r.key,
                                                            headers=r.headers)
        self.produced += len(batch)

    async def read_outputs(self) -> None:
        """Everything the worker has written since the last call."""
        ends = await self.reader.end_offsets(self.outputs)
        while [tp for tp in self.outputs if await self.reader.position(tp) < ends[tp]]:
            for tp, got in (await self.reader.getmany(timeout_ms=200)).items():
                for rec in got:
                    if tp.topic == self.ws.dead_letter_topic:
                        self.dead_seen[int(dict(rec.headers)["streamer-source-offset"])] += 1
                    else:
                        r = Codec().decode_result(rec.value)
                        self.results_seen.setdefault(r.id, []).append(r)


@pytest.fixture(scope="module")
async def served(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    tag = uuid.uuid4().hex[:10]
    ws = WorkerSettings(bootstrap_servers=broker.bootstrap_servers, request_topic=f"p-{tag}.requests",
                        results_topic=f"p-{tag}.results", dead_letter_topic=f"p-{tag}.dlq", group_id=f"pg-{tag}",
                        max_wait_ms=5)
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 1), kafka.TopicSpec(ws.results_topic, 2),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1)])
    log: Path = tmp_path_factory.mktemp("property") / "worker.log"
    proc = WorkerProcess(settings_env(ws, max_message_bytes=100_000, max_batch_size=16), log)
    try:
        await kafka.wait_for_group(ws, ws.group_id, 1, 120)
        s = Served(ws, proc)
        await s.start()
        t0 = time.monotonic()
        try:
            yield s
        finally:
            await s.close()
            _report(s, time.monotonic() - t0)
    finally:
        proc.stop()


def _report(s: Served, seconds: float) -> None:
    """For bench/soak.py: what the examples fed the worker, and what became of it."""
    path = os.environ.get("STREAMER_SOAK_REPORT")
    if not path or s.proc.proc.poll() is not None:
        return
    figures = {"records": s.produced, "dead_letters": sum(s.dead_seen.values()),
               "results": sum(len(v) for v in s.results_seen.values()),
               "ok": sum(1 for v in s.results_seen.values() for r in v if r.status == "ok"),
               "rss_start_mb": round(s.rss_start), "rss_end_mb": round(rss_mb(s.proc.proc.pid)),
               "seconds": round(seconds, 1), "worker_alive": True}
    Path(path).write_text(json.dumps(figures))


async def check_example(s: Served, batch: list[Record]) -> None:
    ws = s.ws
    request_tp = TopicPartition(ws.request_topic, 0)
    start = s.produced
    await s.produce(batch)
    # Wait for the group's commit to pass every record: then every outcome is written.
    async with asyncio.timeout(120):
        while True:
            assert s.proc.proc.poll() is None, "the worker exited:\n" + s.proc.log_path.read_text()[-3000:]
            committed = await kafka.committed_offsets(ws, ws.group_id)
            if committed.get(request_tp) is not None and committed[request_tp].offset >= s.produced:
                break
            await asyncio.sleep(0.2)
    ends, _ = await kafka.offset_bounds(ws, [request_tp])
    assert ends[request_tp] == s.produced  # nothing written into the request topic
    await s.read_outputs()
    for offset, r in enumerate(batch, start):
        dead = s.dead_seen[offset]
        assert dead <= 1, f"record {offset} got {dead} dead letters"
        if r.good_id is not None:
            assert dead == 0 and any(res.status == "ok" for res in s.results_seen.get(r.good_id, ())), (offset, r)
            continue
        expected = must_answer(r, MODEL, ws.results_topic)
        if expected is not None:  # a valid request: answered, not dead-lettered
            rid, statuses = expected
            assert dead == 0 and any(res.status in statuses for res in s.results_seen.get(rid, ())), (offset, r)
        else:  # not a request the worker can answer: its dead letter is its outcome
            assert dead == 1, (offset, r)
    assert rss_mb(s.proc.proc.pid) - s.rss_start < 150


def examples(ws_results: str, ws_requests: str) -> st.SearchStrategy[list[Record]]:
    hostile = records(MODEL.name, ws_requests, ws_results)
    good = st.builds(lambda: good_record(MODEL.name, [0.25] * 16, ws_results))
    return st.lists(st.one_of(hostile, hostile, good), min_size=10, max_size=40)


@settings(max_examples=int(os.environ.get("STREAMER_PROPERTY_EXAMPLES", "4")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
async def test_no_record_stops_a_worker_and_each_gets_one_outcome(served: Served, data: st.DataObject) -> None:
    batch = data.draw(examples(served.ws.results_topic, served.ws.request_topic))
    await check_example(served, batch)
