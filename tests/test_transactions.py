"""Exactly-once decisions without a broker (tests/fakes.py): when a partition taken over is read, and from where;
what a failed commit leads to. tests/test_exactly_once_handover.py shows the same on the real broker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, ProducerFenced

from consumers._transactions import TransactionWindows, _Window
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError

from .fakes import FakeConsumer, FakeProducer

TP = TopicPartition("requests", 0)


def _windows(consumer: FakeConsumer, start_failures: list[BaseException] | None = None,
             on_start: Any = None) -> tuple[TransactionWindows, list[TopicPartition]]:
    """Windows over ``consumer``; producer starts fail with ``start_failures`` in turn, then succeed (noted in
    the consumer's calls, so that their order with its calls shows)."""
    voided: list[TopicPartition] = []
    windows = TransactionWindows(WorkerSettings(bootstrap_servers="unused:9092", group_id="g"), "w",
                                 outbox=None, consumer=consumer, void=voided.append)  # type: ignore[arg-type]
    failures = list(start_failures or [])
    starts = 0

    async def start(tp: TopicPartition) -> Any:
        nonlocal starts
        starts += 1
        await asyncio.sleep(0.01)
        consumer.calls.append(("start", tp))
        if failures:
            raise failures.pop(0)
        if on_start is not None:
            on_start(tp)
        return FakeProducer(f"p{starts}")

    windows.producers._start = start  # type: ignore[method-assign]
    return windows, voided


async def _settled(windows: TransactionWindows) -> None:
    while windows.taking:
        await asyncio.gather(*windows.taking.values(), return_exceptions=True)


async def test_a_partition_taken_over_is_read_from_the_offset_committed_once_its_producer_started() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 5})
    # The previous owner's last transaction (offsets up to 7) completes when the new producer's start fences it.
    windows, _ = _windows(consumer, on_start=lambda tp: consumer.committed_offsets.__setitem__(tp, 7))
    windows.take([TP])
    assert consumer.paused() == {TP}
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start", TP), ("committed", TP), ("seek", TP, 7), ("resume", TP)]
    assert windows.error is None and not consumer.paused()


async def test_a_partition_never_committed_is_read_from_the_beginning() -> None:
    consumer = FakeConsumer(assigned={TP})
    windows, _ = _windows(consumer)
    windows.take([TP])
    await _settled(windows)
    assert consumer.positions == {TP: "earliest"} and not consumer.paused()


async def test_a_takeover_waits_out_a_cluster_that_does_not_answer() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 3})
    windows, _ = _windows(consumer, [BrokerError("cannot reach the cluster"), KafkaTimeoutError()])
    windows.take([TP])
    await _settled(windows)
    assert [c for c in consumer.calls if c[0] == "start"] == [("start", TP)] * 3
    assert consumer.calls[-2:] == [("seek", TP, 3), ("resume", TP)] and windows.error is None


async def test_refused_credentials_stop_a_takeover_and_the_partition_stays_paused() -> None:
    consumer = FakeConsumer(assigned={TP})
    refused = AuthenticationFailed("refused")
    windows, _ = _windows(consumer, [refused])
    windows.take([TP])
    await _settled(windows)
    assert windows.error is refused and consumer.paused() == {TP}
    assert not any(c[0] in {"committed", "seek", "resume"} for c in consumer.calls)


async def test_a_partition_revoked_during_its_takeover_is_never_resumed() -> None:
    consumer = FakeConsumer(assigned={TP})
    windows, _ = _windows(consumer, [BrokerError("down")] * 50)
    windows.take([TP])
    await asyncio.sleep(0.05)
    consumer.assigned.clear()
    await windows.release([TP])
    assert not windows.taking
    assert not any(c[0] in {"seek", "resume"} for c in consumer.calls)


async def test_partitions_taken_over_together_become_readable_together() -> None:
    """Resumed one by one, the first partition's records could fill the worker's queue while the others wait."""
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1}, committed_offsets={TP: 4, tp1: 9})
    windows, _ = _windows(consumer)
    windows.take([TP, tp1])
    await _settled(windows)
    starts = [i for i, c in enumerate(consumer.calls) if c[0] == "start"]
    resumes = [c for c in consumer.calls if c[0] == "resume"]
    assert len(starts) == 2 and set(resumes) == {("resume", TP), ("resume", tp1)}
    # Both resumed in one call, after both producers started and both offsets were read.
    assert consumer.calls[-2:] in ([("resume", TP), ("resume", tp1)], [("resume", tp1), ("resume", TP)])
    assert consumer.positions == {TP: 4, tp1: 9}


async def test_a_partition_revoked_from_a_takeover_leaves_the_others_taken_over() -> None:
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1}, committed_offsets={tp1: 9})
    windows, _ = _windows(consumer, [BrokerError("down")] * 3)
    windows.take([TP, tp1])
    await asyncio.sleep(0.005)
    consumer.assigned.discard(TP)
    await windows.release([TP])
    await _settled(windows)
    assert ("resume", tp1) in consumer.calls and ("resume", TP) not in consumer.calls
    assert consumer.positions == {tp1: 9} and windows.error is None


def _open(windows: TransactionWindows, producer: FakeProducer) -> None:
    windows.producers._producers[TP] = producer  # type: ignore[assignment]
    windows._open[TP] = _Window(producer, last=9, opened=time.monotonic())  # type: ignore[arg-type]


async def test_a_commit_whose_answer_is_lost_goes_on_from_the_committed_offset_not_the_window_start() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 10})  # the commit did land: offsets 0-9 done
    windows, voided = _windows(consumer)
    old = FakeProducer("old", commit_error=KafkaTimeoutError())
    _open(windows, old)
    await windows.commit()
    assert voided == [TP] and old.stopped
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start", TP), ("committed", TP), ("seek", TP, 10), ("resume", TP)]
    assert windows.committed == 0


async def test_a_fenced_partition_is_dropped_and_not_taken_again() -> None:
    consumer = FakeConsumer(assigned={TP})
    windows, voided = _windows(consumer)
    _open(windows, FakeProducer("old", commit_error=ProducerFenced()))
    await windows.commit()
    assert voided == [TP] and windows.fenced == {TP}
    assert not windows.taking and consumer.calls == []
    windows.take([TP])  # assigned to us anew by the group: taken over again
    assert windows.fenced == set()
    await _settled(windows)
    assert consumer.calls[-1] == ("resume", TP)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The takeover backs off 0.1 s, doubling; the tests need not wait for it."""
    sleep = asyncio.sleep

    async def short(delay: float, *args: Any) -> Any:
        return await sleep(min(delay, 0.01), *args)

    monkeypatch.setattr("consumers._transactions.asyncio.sleep", short)
