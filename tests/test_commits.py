"""At-least-once commits without a broker: a partition's offset is committed only once every result before it
is acknowledged, in the order batches were processed, and only in the assignment epoch it was fetched in."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, NodeNotReadyError

from consumers._commit import ConsumerCommitter, OrderedCommits

from .fakes import FakeConsumer

P0, P1 = TopicPartition("requests", 0), TopicPartition("requests", 1)


@dataclass
class Committed:
    """A committer that notes what it was asked to commit; ``refuse`` makes the next commit refused."""

    offsets: list[dict[TopicPartition, int]] = field(default_factory=list)
    refuse: bool = False

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if self.refuse:
            self.refuse = False
            return False
        self.offsets.append(dict(offsets))
        return True


@dataclass
class Delivery:
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_batch_is_committed_only_after_it_and_every_batch_before_it_are_acknowledged() -> None:
    committer = Committed()
    epochs: defaultdict[TopicPartition, int] = defaultdict(int)
    commits = OrderedCommits(committer, epochs.__getitem__)
    commits.start()
    first, second = Delivery(), Delivery()
    commits.add([first], {P0: (10, 0)})
    commits.add([second], {P0: (20, 0), P1: (5, 0)})
    second.future.set_result(None)  # acknowledged before the batch ahead of it
    await _settle()
    assert committer.offsets == []
    first.future.set_result(None)
    await commits.drain()
    # Both batches were waiting when the first was acknowledged: one commit covers them.
    assert committer.offsets == [{P0: 20, P1: 5}]
    await commits.close()
    assert commits.committed_batches == 2


async def test_offsets_fetched_before_a_revoke_are_not_committed() -> None:
    committer = Committed()
    epochs: defaultdict[TopicPartition, int] = defaultdict(int)
    commits = OrderedCommits(committer, epochs.__getitem__)
    commits.start()
    d = Delivery()
    commits.add([d], {P0: (10, 0), P1: (7, 0)})
    epochs[P0] += 1  # P0 was revoked (and maybe assigned again) while the results were in flight
    d.future.set_result(None)
    await commits.drain()
    await commits.close()
    assert committer.offsets == [{P1: 7}]


async def test_a_refused_delivery_is_settled_and_what_is_sent_instead_is_waited_for() -> None:
    committer = Committed()
    instead = Delivery()
    settled: list[tuple[Any, BaseException]] = []

    async def settle(delivery: Any, exc: BaseException) -> list[Any]:
        settled.append((delivery, exc))
        return [instead]  # its dead letter, say

    commits = OrderedCommits(committer, lambda _tp: 0, settle)
    commits.start()
    refused = Delivery()
    commits.add([refused], {P0: (3, 0)})
    refused.future.set_exception(NodeNotReadyError())
    await _settle()
    assert [d for d, _ in settled] == [refused] and committer.offsets == []
    instead.future.set_result(None)
    await commits.drain()
    await commits.close()
    assert committer.offsets == [{P0: 3}]


async def test_a_failure_nothing_settles_stops_the_commits_with_nothing_committed_past_it() -> None:
    committer = Committed()

    async def settle(delivery: Any, exc: BaseException) -> list[Any]:
        raise exc  # fatal: our own dead-letter topic is unreachable, say

    commits = OrderedCommits(committer, lambda _tp: 0, settle)
    commits.start()
    failed = Delivery()
    commits.add([failed], {P0: (3, 0)})
    failed.future.set_exception(NodeNotReadyError())
    with pytest.raises(NodeNotReadyError):
        await asyncio.wait_for(asyncio.shield(commits.task), 1)  # type: ignore[arg-type]
    assert committer.offsets == []
    with pytest.raises(NodeNotReadyError):
        commits.add([Delivery()], {P0: (4, 0)})  # the worker learns it at its next batch


async def test_a_refused_commit_is_counted_and_the_next_one_covers_it() -> None:
    committer = Committed(refuse=True)
    commits = OrderedCommits(committer, lambda _tp: 0)
    commits.start()
    a = Delivery()
    commits.add([a], {P0: (1, 0)})
    a.future.set_result(None)
    await commits.drain()
    b = Delivery()
    commits.add([b], {P0: (2, 0)})
    b.future.set_result(None)
    await commits.drain()
    await commits.close()
    assert commits.refused == 1 and committer.offsets == [{P0: 2}]


class CommittingConsumer(FakeConsumer):
    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__(assigned={P0})
        self.error = error

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.calls.append(("commit", offsets))
        if self.error is not None:
            raise self.error


async def test_the_consumer_committer_commits_only_owned_partitions_and_reports_a_moved_group() -> None:
    consumer = CommittingConsumer()
    assert await ConsumerCommitter(consumer).commit({P0: 5, P1: 9})  # type: ignore[arg-type]
    assert consumer.calls == [("commit", {P0: 5})]
    moved = CommittingConsumer(CommitFailedError("the group rebalanced"))
    assert not await ConsumerCommitter(moved).commit({P0: 5})  # type: ignore[arg-type]


async def _acknowledged(commits: OrderedCommits, tp: TopicPartition, offset: int) -> None:
    d = Delivery()
    d.future.set_result(None)
    commits.add([d], {tp: (offset, 0)})
    await _settle()


async def test_commits_are_an_interval_apart_and_what_comes_meanwhile_shares_the_next() -> None:
    """Batches acknowledged within ``interval_s`` of the last commit share the next one, which comes when the
    interval is up even if nothing more arrives."""
    committer = Committed()
    commits = OrderedCommits(committer, lambda _tp: 0, interval_s=1.0)
    commits.start()
    loop = asyncio.get_running_loop()
    times: list[float] = []
    second = asyncio.Event()
    real_commit = committer.commit

    async def commit(offsets: dict[TopicPartition, int]) -> bool:
        times.append(loop.time())
        if len(times) == 2:
            second.set()
        return await real_commit(offsets)

    committer.commit = commit  # type: ignore[method-assign]
    await _acknowledged(commits, P0, 1)  # the first commit goes at once
    assert committer.offsets == [{P0: 1}]
    for tp, off in ((P0, 2), (P1, 3), (P1, 4)):
        await _acknowledged(commits, tp, off)
    assert committer.offsets == [{P0: 1}]  # the rest wait for the interval, then go together
    async with asyncio.timeout(10):
        await second.wait()
    assert committer.offsets == [{P0: 1}, {P0: 2, P1: 4}]
    assert times[1] - times[0] >= 0.99
    await commits.close()
    assert commits.committed_batches == 4


async def test_a_drain_and_a_close_commit_at_once_within_the_interval() -> None:
    """A rebalance (drain) and shutdown (close) do not wait out the interval."""
    committer = Committed()
    commits = OrderedCommits(committer, lambda _tp: 0, interval_s=60.0)
    commits.start()
    await _acknowledged(commits, P0, 1)
    await _acknowledged(commits, P0, 2)
    async with asyncio.timeout(10):  # the interval is 60 s
        await commits.drain()
    assert committer.offsets == [{P0: 1}, {P0: 2}]
    await _acknowledged(commits, P1, 5)
    async with asyncio.timeout(10):
        await commits.close()
    assert committer.offsets[-1] == {P1: 5} and commits.committed_batches == 3
