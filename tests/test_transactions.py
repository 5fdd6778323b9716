"""Exactly-once decisions without a broker (tests/fakes.py): when a partition taken over is read, and from where;
what a failed commit leads to. tests/test_exactly_once_handover.py shows the same on the real broker."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, ProducerFenced

from consumers._group_fencing import Committed, GoneFromGroup, Member, UnstableOffsets
from consumers._outbox import Delivery
from consumers._transactions import TransactionWindows, _Window
from streamer.assignors import MemberCard
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError
from streamer.metrics import WorkerMetrics

from .fakes import FakeConsumer, FakeProducer

TP = TopicPartition("requests", 0)


@dataclass
class Group:
    """The group's offsets as the coordinator keeps them: committed (with the committer's id), and those waiting
    in an open transaction of some transactional id (unstable until it completes)."""

    consumer: FakeConsumer
    owners: dict[TopicPartition, str] = field(default_factory=dict)
    pending: dict[TopicPartition, tuple[str, int]] = field(default_factory=dict)  # tp -> (txn id, offset)
    live: set[str] = field(default_factory=set)  # the transactional ids of the group's members

    async def fetch(self, tps: list[TopicPartition], *, stable: bool) -> dict[TopicPartition, Committed | None]:
        await asyncio.sleep(0)
        self.consumer.calls.append(("fetch", *tps) if stable else ("fetch-unstable", *tps))
        if stable and (unstable := [tp for tp in tps if tp in self.pending]):
            raise UnstableOffsets(unstable)
        offsets = self.consumer.committed_offsets
        return {tp: Committed(offsets[tp], self.owners.get(tp)) if tp in offsets else None for tp in tps}

    def complete(self, txn_id: str, commit: bool) -> None:
        for tp, (owner, offset) in list(self.pending.items()):
            if owner == txn_id:
                del self.pending[tp]
                if commit:
                    self.consumer.committed_offsets[tp], self.owners[tp] = offset, owner


def _windows(consumer: FakeConsumer, start_failures: list[BaseException] | None = None,
             group: Group | None = None, metrics: WorkerMetrics | None = None,
             ) -> tuple[TransactionWindows, list[TopicPartition], Group]:
    """Windows over ``consumer``; producer starts fail with ``start_failures`` in turn, then succeed (noted in
    the consumer's calls, so that their order with its calls shows). Fencing an id aborts its transaction."""
    voided: list[TopicPartition] = []
    windows = TransactionWindows(WorkerSettings(bootstrap_servers="unused:9092", group_id="g"), "w",
                                 outbox=None, consumer=consumer, void=voided.append,  # type: ignore[arg-type]
                                 metrics=metrics or WorkerMetrics("tiny-mlp"))
    group = group or Group(consumer)
    failures = list(start_failures or [])
    starts = 0

    async def start() -> Any:
        nonlocal starts
        starts += 1
        await asyncio.sleep(0.01)
        consumer.calls.append(("start",))
        if failures:
            raise failures.pop(0)
        producer = FakeProducer(f"p{starts}")
        windows._producer = producer  # type: ignore[assignment]
        return producer

    async def fence(txn_id: str, why: str) -> None:
        consumer.calls.append(("fence", txn_id))
        group.complete(txn_id, commit=False)

    async def members() -> list[MemberCard]:
        consumer.calls.append(("members",))
        return [MemberCard(m, txn=m) for m in group.live]

    windows._start = start  # type: ignore[method-assign]
    windows._fence = fence  # type: ignore[method-assign]
    windows._fetch = group.fetch  # type: ignore[method-assign]
    windows._members = members  # type: ignore[method-assign]
    return windows, voided, group


def _metric(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": metrics.model, "stage": "", **labels}) or 0.0


async def _settled(windows: TransactionWindows) -> None:
    while windows.taking:
        await asyncio.gather(*windows.taking.values(), return_exceptions=True)


async def test_a_partition_taken_over_is_read_from_its_committed_offset_once_the_producer_started() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 5})
    windows, _, _ = _windows(consumer)
    windows.assigned(Member(7, "m-1", None), [TP])
    assert consumer.paused() == {TP} and windows.member == Member(7, "m-1", None)
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start",), ("fetch-unstable", TP), ("fetch", TP), ("seek", TP, 5),
                             ("resume", TP)]
    assert windows.error is None and not consumer.paused()


async def test_a_previous_owners_open_transaction_is_waited_for_while_it_may_complete_it() -> None:
    """The previous owner (alive, its partitions revoked) commits offsets up to 7 a moment after the takeover
    began: read before, offset 5 would process 5 and 6 twice."""
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 5})
    group = Group(consumer, owners={TP: "g.a"}, pending={TP: ("g.a", 7)}, live={"g.a"})
    windows, _, _ = _windows(consumer, group=group)
    asyncio.get_running_loop().call_later(0.1, group.complete, "g.a", True)
    windows.take([TP])
    await _settled(windows)
    assert consumer.positions == {TP: 7} and ("fence", "g.a") not in consumer.calls


async def test_a_previous_owner_no_member_has_any_more_is_fenced_at_once() -> None:
    """A worker killed with a transaction open that holds records but no offsets yet: the offsets are stable, but
    its records hold back read_committed readers until the transaction times out. Its id (the metadata of the
    offsets it committed before) is no member's: fenced at once. A live member's id is left alone."""
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1}, committed_offsets={TP: 5, tp1: 2})
    group = Group(consumer, owners={TP: "g.dead", tp1: "g.alive"}, live={"g.alive"})
    windows, _, _ = _windows(consumer, group=group)
    windows.take([TP, tp1])
    await _settled(windows)
    fences = [c for c in consumer.calls if c[0] == "fence"]
    assert fences == [("fence", "g.dead")] and consumer.positions == {TP: 5, tp1: 2}
    assert consumer.calls.index(("fence", "g.dead")) < consumer.calls.index(("seek", TP, 5))


async def test_a_dead_owners_open_transaction_is_fenced_through_the_offsets_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The previous owner died with offsets up to 9 in its open transaction, and the group's description still
    lists it (it lags behind): after a while its id (the metadata of the offsets it committed before) is
    fenced all the same, which aborts that transaction; reading goes on from 5."""
    monkeypatch.setattr("consumers._transactions._FENCE_AFTER_S", 0.05)
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 5})
    group = Group(consumer, owners={TP: "g.dead"}, pending={TP: ("g.dead", 9)}, live={"g.dead"})
    windows, _, _ = _windows(consumer, group=group)
    windows.take([TP])
    await _settled(windows)
    assert ("fence", "g.dead") in consumer.calls and consumer.positions == {TP: 5}
    assert windows.error is None


async def test_a_partition_never_committed_is_read_from_the_beginning() -> None:
    consumer = FakeConsumer(assigned={TP})
    windows, _, _ = _windows(consumer)
    windows.take([TP])
    await _settled(windows)
    assert consumer.positions == {TP: "earliest"} and not consumer.paused()


async def test_a_takeover_waits_out_a_cluster_that_does_not_answer() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 3})
    windows, _, _ = _windows(consumer, [BrokerError("cannot reach the cluster"), KafkaTimeoutError()])
    windows.take([TP])
    await _settled(windows)
    assert [c for c in consumer.calls if c[0] == "start"] == [("start",)] * 3
    assert consumer.calls[-2:] == [("seek", TP, 3), ("resume", TP)] and windows.error is None


async def test_refused_credentials_stop_a_takeover_and_the_partition_stays_paused() -> None:
    consumer = FakeConsumer(assigned={TP})
    refused = AuthenticationFailed("refused")
    windows, _, _ = _windows(consumer, [refused])
    windows.take([TP])
    await _settled(windows)
    assert windows.error is refused and consumer.paused() == {TP}
    assert not any(c[0] in {"fetch", "seek", "resume"} for c in consumer.calls)


async def test_a_partition_revoked_during_its_takeover_is_never_resumed() -> None:
    consumer = FakeConsumer(assigned={TP})
    windows, _, _ = _windows(consumer, [BrokerError("down")] * 50)
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
    windows, _, _ = _windows(consumer)
    windows.take([TP, tp1])
    await _settled(windows)
    assert [c for c in consumer.calls if c[0] in {"start", "fetch"}] == [("start",), ("fetch", TP, tp1)]
    assert ("members",) not in consumer.calls  # never committed by another: nobody to ask about
    # Both resumed in one call, after both offsets were read.
    assert consumer.calls[-2:] in ([("resume", TP), ("resume", tp1)], [("resume", tp1), ("resume", TP)])
    assert consumer.positions == {TP: 4, tp1: 9}


async def test_a_partition_revoked_from_a_takeover_leaves_the_others_taken_over() -> None:
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1}, committed_offsets={tp1: 9})
    windows, _, _ = _windows(consumer, [BrokerError("down")] * 3)
    windows.take([TP, tp1])
    await asyncio.sleep(0.005)
    consumer.assigned.discard(TP)
    await windows.release([TP])
    await _settled(windows)
    assert ("resume", tp1) in consumer.calls and ("resume", TP) not in consumer.calls
    assert consumer.positions == {tp1: 9} and windows.error is None


def _open(windows: TransactionWindows, producer: FakeProducer, tps: dict[TopicPartition, int]) -> None:
    windows._producer = producer  # type: ignore[assignment]
    windows._window = _Window(producer, time.monotonic(), last=dict(tps))  # type: ignore[arg-type]


async def test_one_transaction_commits_the_offsets_of_every_partition_it_covers() -> None:
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1})
    metrics = WorkerMetrics("tiny-mlp")
    windows, _, _ = _windows(consumer, metrics=metrics)
    producer = FakeProducer("p")
    _open(windows, producer, {TP: 9, tp1: 3})
    await windows.commit()
    assert producer.calls == [("offsets", "p", {TP: 10, tp1: 4}), ("commit", "p")]
    assert _metric(metrics, "streamer_transactions_total", outcome="committed") == 1 and windows.left_s() is None


class _Learnt:
    """The outbox's part in a commit: the records the cluster refused, learnt from."""

    def __init__(self) -> None:
        self.refused: list[BaseException] = []

    async def learn(self, delivery: Delivery, exc: BaseException, producer: Any) -> None:
        self.refused.append(exc)


def _sent(windows: TransactionWindows) -> asyncio.Future[None]:
    """One record batch in the open transaction, on its way: resolve the future to have it written."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert windows._window is not None
    windows._window.sent.append(Delivery(future, None, "result", "results", 0, [0]))  # type: ignore[arg-type]
    return future


async def test_the_offsets_go_while_the_records_are_on_their_way_and_the_commit_after_both() -> None:
    consumer = FakeConsumer(assigned={TP})
    metrics = WorkerMetrics("tiny-mlp")
    windows, _, _ = _windows(consumer, metrics=metrics)
    producer = FakeProducer("p")
    _open(windows, producer, {TP: 9})
    written = _sent(windows)
    commit = asyncio.create_task(windows.commit())
    for _ in range(5):
        await asyncio.sleep(0)
    assert producer.calls == [("offsets", "p", {TP: 10})]  # before the records are written: no commit yet
    written.set_result(None)
    await commit
    assert producer.calls == [("offsets", "p", {TP: 10}), ("commit", "p")]
    assert _metric(metrics, "streamer_transactions_total", outcome="committed") == 1
    assert _metric(metrics, "streamer_transactions_total", outcome="failed") == 0
    for phase in ("open", "deliver", "end"):  # each committed transaction timed once in each phase
        assert _metric(metrics, "streamer_transaction_seconds_count", phase=phase) == 1
    # The commit waited at least the five loop turns before the records were written.
    assert _metric(metrics, "streamer_transaction_seconds_sum", phase="deliver") > 0


async def test_a_record_refused_aborts_the_transaction_its_offsets_sent_beside_it_included() -> None:
    """The offsets went with the records; a record refused means no commit: the producer goes (its transaction is
    aborted when the next one starts) and the partition is read again from its committed offset."""
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 3})
    metrics = WorkerMetrics("tiny-mlp")
    windows, voided, _ = _windows(consumer, metrics=metrics)
    windows.outbox = learnt = _Learnt()  # type: ignore[assignment]
    producer = FakeProducer("p")
    _open(windows, producer, {TP: 9})
    refused = MessageSizeTooLargeError()
    _sent(windows).set_exception(refused)
    await windows.commit()
    assert learnt.refused == [refused]
    assert ("commit", "p") not in producer.calls and producer.stopped and voided == [TP]
    await _settled(windows)
    assert consumer.positions == {TP: 3}
    assert _metric(metrics, "streamer_transactions_total", outcome="committed") == 0
    assert _metric(metrics, "streamer_transactions_total", outcome="failed") == 1


@pytest.mark.parametrize("error", [KafkaTimeoutError(), GoneFromGroup("generation 7 is over"), ProducerFenced()],
                         ids=["answer-lost", "gone-from-group", "fenced"])
async def test_a_commit_that_fails_goes_on_from_the_stable_offset_not_the_window_start(error: Exception) -> None:
    """Whether the commit landed (an answer lost), was refused (a generation over) or the producer's id was
    fenced, nothing is guessed: the producer goes, the partitions are taken over again, and the offsets say."""
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 10})  # here the commit did land: 0-9 done
    metrics = WorkerMetrics("tiny-mlp")
    windows, voided, _ = _windows(consumer, metrics=metrics)
    old = FakeProducer("old", commit_error=error)
    _open(windows, old, {TP: 9})
    await windows.commit()
    assert voided == [TP] and old.stopped
    assert _metric(metrics, "streamer_transactions_total", outcome="failed") == 1
    assert _metric(metrics, "streamer_transactions_total", outcome="committed") == 0
    assert _metric(metrics, "streamer_transaction_seconds_count", phase="end") == 0  # not timed: not committed
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start",), ("fetch-unstable", TP), ("fetch", TP), ("seek", TP, 10),
                             ("resume", TP)]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The takeover backs off 0.1 s, doubling; the tests need not wait for it."""
    sleep = asyncio.sleep

    async def short(delay: float, *args: Any) -> Any:
        return await sleep(min(delay, 0.01), *args)

    monkeypatch.setattr("consumers._transactions.asyncio.sleep", short)
