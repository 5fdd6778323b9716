"""Exactly-once decisions without a broker (tests/fakes.py): when a partition taken over is read, and from where;
what a failed commit leads to. tests/test_exactly_once_handover.py shows the same on the real broker."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, ProducerFenced

from consumers._group_fencing import Committed, GoneFromGroup, Member, UnstableOffsets
from consumers._outbox import Delivery
from consumers._transactions import TransactionWindows, _Window
from streamer.assignors import MemberCard
from streamer.config import WorkerSettings
from streamer.errors import AuthenticationFailed, BrokerError

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
             group: Group | None = None) -> tuple[TransactionWindows, list[TopicPartition], Group]:
    """Windows over ``consumer``; producer starts fail with ``start_failures`` in turn, then succeed (noted in
    the consumer's calls, so that their order with its calls shows). Fencing an id aborts its transaction."""
    voided: list[TopicPartition] = []
    windows = TransactionWindows(WorkerSettings(bootstrap_servers="unused:9092", group_id="g"), "w",
                                 outbox=None, consumer=consumer, void=voided.append)  # type: ignore[arg-type]
    group = group or Group(consumer)
    failures = list(start_failures or [])
    starts = 0

    async def start(slot: int) -> Any:
        nonlocal starts
        starts += 1
        await asyncio.sleep(0.01)
        consumer.calls.append(("start", slot))
        if failures:
            raise failures.pop(0)
        producer = FakeProducer(f"p{starts}")
        windows._producers[slot] = producer
        return producer

    async def fence(base: str, why: str) -> None:
        consumer.calls.append(("fence", base))
        group.complete(base, commit=False)

    async def members() -> list[MemberCard]:
        consumer.calls.append(("members",))
        return [MemberCard(m, txn=m) for m in group.live]

    windows._start = start  # type: ignore[method-assign]
    windows._fence = fence  # type: ignore[method-assign]
    windows._fetch = group.fetch  # type: ignore[method-assign]
    windows._members = members  # type: ignore[method-assign]
    return windows, voided, group


async def _settled(windows: TransactionWindows) -> None:
    while windows.taking:
        await asyncio.gather(*windows.taking.values(), return_exceptions=True)


async def test_a_partition_taken_over_is_read_from_its_committed_offset_once_the_producer_started() -> None:
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 5})
    windows, _, _ = _windows(consumer)
    windows.assigned(Member(7, "m-1", None), [TP])
    assert consumer.paused() == {TP} and windows.member == Member(7, "m-1", None)
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start", 0), ("start", 1), ("fetch-unstable", TP), ("fetch", TP),
                              ("seek", TP, 5), ("resume", TP)]
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
    assert [c for c in consumer.calls if c[0] == "start"] == [("start", 0), ("start", 1)] * 2
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
    assert [c for c in consumer.calls if c[0] in {"start", "fetch"}] == [("start", 0), ("start", 1), ("fetch", TP, tp1)]
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


def _open(windows: TransactionWindows, producer: FakeProducer, tps: dict[TopicPartition, int],
          sent: list[asyncio.Future[Any]] | None = None) -> _Window:
    """A window open on ``producer`` (the slot after the last window's) over ``tps`` up to their offsets, whose
    records are answered by ``sent``."""
    last = windows._last
    slot = 0 if last is None else (last.slot + 1) % len(windows._producers)
    windows._producers[slot] = producer
    w = _Window(slot, producer, time.monotonic(), last=dict(tps), tps=set(tps),
                sent=[Delivery(f, None, "result", "results", 0, []) for f in sent or []])  # type: ignore[arg-type]
    windows._window = windows._users[slot] = w
    return w


def _answered() -> asyncio.Future[Any]:
    f = asyncio.get_running_loop().create_future()
    f.set_result(None)
    return f


async def test_one_transaction_commits_the_offsets_of_every_partition_it_covers() -> None:
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1})
    windows, _, _ = _windows(consumer)
    producer = FakeProducer("p")
    _open(windows, producer, {TP: 9, tp1: 3})
    await windows.commit()
    assert windows.left_s() is None  # handed to its commit: none open
    await windows.settled()
    assert producer.calls == [("offsets", "p", {TP: 10, tp1: 4}), ("commit", "p")]
    assert windows.committed == 1


@pytest.mark.parametrize("error", [KafkaTimeoutError(), GoneFromGroup("generation 7 is over"), ProducerFenced()],
                         ids=["answer-lost", "gone-from-group", "fenced"])
async def test_a_commit_that_fails_goes_on_from_the_stable_offset_not_the_window_start(error: Exception) -> None:
    """Whether the commit landed (an answer lost), was refused (a generation over) or the producer's id was
    fenced, nothing is guessed: the producers go, the partitions are taken over again (once the new producers
    started: their start aborts the transaction if it is still open), and the offsets say."""
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 10})  # here the commit did land: 0-9 done
    windows, voided, _ = _windows(consumer)
    old = FakeProducer("old", commit_error=error)
    _open(windows, old, {TP: 9})
    await windows.commit()
    await windows.settled()
    assert voided == [TP] and old.stopped
    await _settled(windows)
    assert consumer.calls == [("pause", TP), ("start", 0), ("start", 1), ("fetch-unstable", TP), ("fetch", TP),
                              ("seek", TP, 10), ("resume", TP)]
    assert windows.committed == 0


async def test_the_next_window_commits_only_after_the_one_before_it() -> None:
    """Two windows in flight, on two producers: the second's records went while the first committed, but its
    offsets go after the first's (the group keeps the offsets written last) and its commit after the first's."""
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1})
    windows, _, _ = _windows(consumer)
    log: list[tuple[Any, ...]] = []
    hold = asyncio.Event()
    first, second = FakeProducer("a", log=log, hold=hold), FakeProducer("b", log=log)
    _open(windows, first, {TP: 9})
    await windows.commit()
    _open(windows, second, {TP: 19, tp1: 4}, sent=[_answered()])
    await windows.commit()
    for _ in range(20):
        await asyncio.sleep(0)
    assert log == [("offsets", "a", {TP: 10}), ("offsets", "b", {TP: 20, tp1: 5})]  # b waits for a's commit
    hold.set()
    await windows.settled()
    assert log[2:] == [("commit", "a"), ("commit", "b")] and windows.committed == 2


async def test_a_window_opens_once_the_last_ones_records_are_acknowledged_and_its_producer_is_free() -> None:
    """Per-key order: the next window's records go after the last window's, which another producer sent. And a
    producer carries one transaction at a time: the third window waits for the first to be over."""
    consumer = FakeConsumer(assigned={TP})
    windows, _, _ = _windows(consumer)
    hold = asyncio.Event()
    acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _open(windows, FakeProducer("a", hold=hold), {TP: 9})
    await windows.commit()
    second = _open(windows, FakeProducer("b"), {TP: 19}, sent=[acked])
    await windows.commit()
    opening = asyncio.create_task(windows._open())
    await asyncio.sleep(0.01)
    assert not opening.done()  # b's records are not acknowledged yet
    acked.set_result(None)
    await asyncio.sleep(0.01)
    assert second.acked.done() and not opening.done()  # a (the producer it needs) is still committing
    hold.set()
    third = await opening
    assert third.slot == 0 and third.producer is windows._producers[0] and windows._window is third


async def test_a_failed_window_takes_the_ones_after_it_down_and_the_producers_go_once_the_one_before_is_over(
) -> None:
    """Window 1 commits slowly; window 2 (records of TP and tp1) fails on its commit; window 3 was open. Window 1
    still commits; window 2 and 3 never do; the producers are replaced only after window 1 is over; what 2 and 3
    covered is voided and taken over again."""
    tp1, tp2 = TopicPartition("requests", 1), TopicPartition("requests", 2)
    consumer = FakeConsumer(assigned={TP, tp1, tp2}, committed_offsets={TP: 10, tp1: 3, tp2: 7})
    windows, voided, _ = _windows(consumer)
    log: list[tuple[Any, ...]] = []
    hold = asyncio.Event()
    a = FakeProducer("a", log=log, hold=hold)
    b = FakeProducer("b", log=log, commit_error=ProducerFenced())
    _open(windows, a, {TP: 9})
    await windows.commit()
    _open(windows, b, {TP: 19, tp1: 2})
    await windows.commit()
    for _ in range(20):
        await asyncio.sleep(0)
    assert ("commit", "b") not in log  # b waits for a
    windows._users[0] = None  # a third window, open on a (as if a were over), covering tp2
    _open(windows, a, {tp2: 6})
    hold.set()
    await windows.settled()
    assert log.index(("commit", "a")) < log.index(("commit", "b")) < log.index(("stop", "a"))
    assert windows.committed == 1 and sorted(voided) == sorted([TP, tp1, tp2]) and windows._window is None
    await _settled(windows)
    assert consumer.positions == {TP: 10, tp1: 3, tp2: 7} and not consumer.paused()


async def test_a_window_after_a_failed_one_is_abandoned_without_committing() -> None:
    """Window 1's records were refused: window 2, in flight after it, must not commit (its offsets would pass
    window 1's records): it is abandoned, and both windows' partitions taken over."""
    tp1 = TopicPartition("requests", 1)
    consumer = FakeConsumer(assigned={TP, tp1}, committed_offsets={TP: 0, tp1: 0})
    windows, voided, _ = _windows(consumer)
    windows.outbox = Learns()  # type: ignore[assignment]
    refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    log: list[tuple[Any, ...]] = []
    _open(windows, FakeProducer("a", log=log), {TP: 9}, sent=[refused])
    await windows.commit()
    _open(windows, FakeProducer("b", log=log), {tp1: 4}, sent=[_answered()])
    await windows.commit()
    refused.set_exception(KafkaTimeoutError())
    await windows.settled()
    assert not any(c[0] in {"offsets", "commit"} for c in log), log
    assert sorted(voided) == sorted([TP, tp1]) and windows.committed == 0


async def test_a_window_never_opens_on_a_producer_replaced_while_it_began() -> None:
    """A failure while the next window's producer begins its transaction: the producers are replaced, and the
    window opens on the replacement, not on the producer that was thrown away."""
    consumer = FakeConsumer(assigned={TP}, committed_offsets={TP: 0})
    windows, voided, _ = _windows(consumer)
    gate = asyncio.Event()
    old = FakeProducer("old", begin_hold=gate)
    windows._producers[0] = old
    opening = asyncio.create_task(windows._open())
    await asyncio.sleep(0.01)
    failed = _Window(1, FakeProducer("x"), time.monotonic(), tps={TP})  # type: ignore[arg-type]
    windows._fail(failed, KafkaTimeoutError())
    await asyncio.sleep(0.01)
    gate.set()
    w = await asyncio.wait_for(opening, 5)
    assert old.stopped and w.producer is windows._producers[0] and w.producer is not old
    assert voided == [TP] and windows._window is w
    await windows.settled()


class Learns:
    """The outbox's part in a refused record: nothing to learn here."""

    async def learn(self, delivery: Any, exc: BaseException, producer: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The takeover backs off 0.1 s, doubling; the tests need not wait for it."""
    sleep = asyncio.sleep

    async def short(delay: float, *args: Any) -> Any:
        return await sleep(min(delay, 0.01), *args)

    monkeypatch.setattr("consumers._transactions.asyncio.sleep", short)
