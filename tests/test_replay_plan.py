"""Replay's plan and range reader without a broker (tests/fakes.py): what is done and left, where a span ends
when its last offsets hold no record, what a stopped read leaves, and what each commit records."""

from __future__ import annotations

import contextlib
import json

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumers.replay import Plan, ReplaySummary, Span, anonymous_error
from consumers.replay.reader import RangeReader
from streamer.config import WorkerSettings

from .fakes import FakeConsumer

TOPIC = "requests"
SETTINGS = WorkerSettings(bootstrap_servers="unused:9092")


def _records(partition: int, offsets: range) -> list[ConsumerRecord]:
    return [ConsumerRecord(TOPIC, partition, o, 0, 0, None, b"x", None, 0, 1, ()) for o in offsets]


def test_a_plan_says_what_earlier_runs_did() -> None:
    whole = [Span(0, 0, 100), Span(1, 10, 60)]
    plan = Plan(whole, [Span(0, 40, 100), Span(1, 60, 60)], sink_at=123)
    assert (plan.size, plan.done) == (150, 90)
    summary = ReplaySummary.of(plan)
    assert (summary.range_size, summary.done_before, summary.processed) == (150, 90, 0)
    assert Plan(whole, whole).done == 0


def test_a_record_without_an_id_is_answered_under_its_offset() -> None:
    result = anonymous_error(TOPIC, 3, 42, "tiny-mlp", "decode_error", "not msgpack", stage="encode")
    assert result.id == "requests:3:42" and result.status == "error"
    assert result.error is not None and (result.error.code, result.error.stage) == ("decode_error", "encode")


async def test_the_reader_goes_partition_by_partition_and_past_offsets_that_hold_no_record() -> None:
    p0, p1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    # Partition 0's span ends at 10 but its last record is at 8 (a transaction marker at 9); partition 1 has
    # nothing left but markers.
    consumer = FakeConsumer(log={p0: _records(0, range(2, 9)), p1: []}, ends={p0: 10, p1: 5})
    plan = Plan([Span(0, 2, 10), Span(1, 3, 5)], [Span(0, 2, 10), Span(1, 3, 5)])
    reader = RangeReader(SETTINGS, TOPIC, "job", plan, consumer=consumer)
    await reader.start()
    assert consumer.paused() == {p0, p1} and consumer.commits[0][p0].offset == 2  # the plan, before any output
    assert json.loads(consumer.commits[0][p0].metadata) == {"start": 2, "end": 10, "sink": 0}
    read: list[list[int]] = []
    for tp in reader.pending():
        async for chunk in reader.records(tp, 4):
            read.append([r.offset for r in chunk])
            for r in chunk:
                assert not reader.complete
                reader.done(r)
    assert read == [[2, 3, 4, 5], [6, 7, 8]]
    assert reader.nxt == {p0: 10, p1: 5} and reader.complete  # 8 was partition 0's last record
    await reader.commit(sink_at=77)
    assert {tp: (om.offset, json.loads(om.metadata)["sink"]) for tp, om in consumer.commits[-1].items()} == {
        p0: (10, 77), p1: (5, 77)}
    assert consumer.paused() == {p0, p1}


async def test_a_read_stopped_part_way_leaves_the_rest_for_the_next_run() -> None:
    p0 = TopicPartition(TOPIC, 0)
    consumer = FakeConsumer(log={p0: _records(0, range(0, 20))}, ends={p0: 20})
    plan = Plan([Span(0, 0, 20)], [Span(0, 0, 20)])
    reader = RangeReader(SETTINGS, TOPIC, "job", plan, consumer=consumer)
    await reader.start()
    async with contextlib.aclosing(reader.records(p0, 5)) as chunks:
        async for chunk in chunks:
            for r in chunk[:3]:
                reader.done(r)
            break  # stopped after the first chunk, three of its records done
    assert reader.nxt == {p0: 3} and not reader.complete and consumer.paused() == {p0}


async def test_records_done_after_their_span_was_read_still_finish_it() -> None:
    """The offline engine reads ahead: a span's last record is written (done) after the reader went past it."""
    p0 = TopicPartition(TOPIC, 0)
    consumer = FakeConsumer(log={p0: _records(0, range(0, 6))}, ends={p0: 8})
    plan = Plan([Span(0, 0, 8)], [Span(0, 0, 8)])
    reader = RangeReader(SETTINGS, TOPIC, "job", plan, consumer=consumer)
    await reader.start()
    read = [r async for chunk in reader.records(p0, 4) for r in chunk]
    assert reader.nxt == {p0: 0}  # nothing written yet: nothing done
    for r in read[:-1]:
        reader.done(r)
    assert reader.nxt == {p0: 5} and not reader.complete
    reader.done(read[-1])
    assert reader.nxt == {p0: 8} and reader.complete
