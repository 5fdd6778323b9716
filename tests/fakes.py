"""In-memory stand-ins for the parts of aiokafka's consumer and producer that the worker's inside uses, so its
decisions can be tested in milliseconds without a broker. They record what was asked of them, in order; the
real-broker tests keep the end-to-end behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord


@dataclass
class FakeConsumer:
    """Assignment, pause/resume, committed offsets, seeks and commits, with every call noted in ``calls``; and a
    log per partition to fetch from, whose end offset (``ends``) may lie past its last record, as a transaction
    marker's or a compacted gap's does."""

    assigned: set[TopicPartition] = field(default_factory=set)
    committed_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    positions: dict[TopicPartition, int | str] = field(default_factory=dict)
    _paused: set[TopicPartition] = field(default_factory=set)
    on_committed: Callable[[TopicPartition], Any] | None = None  # called as committed() is answered
    log: dict[TopicPartition, list[ConsumerRecord]] = field(default_factory=dict)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    commits: list[dict[TopicPartition, Any]] = field(default_factory=list)

    async def start(self) -> None:
        self.calls.append(("start",))

    async def stop(self) -> None:
        self.calls.append(("stop",))

    def assign(self, tps: Any) -> None:
        self.assigned = set(tps)

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(dict(offsets))

    async def position(self, tp: TopicPartition) -> int:
        position = self.positions[tp]
        assert isinstance(position, int)
        return position

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        await asyncio.sleep(0)
        out = {}
        for tp in tps or tuple(self.assigned):
            if tp in self._paused or tp not in self.assigned:
                continue
            at = self.positions[tp]
            assert isinstance(at, int)
            got = [r for r in self.log.get(tp, []) if r.offset >= at][:max_records]
            if got:
                out[tp] = got
                self.positions[tp] = got[-1].offset + 1
            else:
                self.positions[tp] = max(at, self.ends.get(tp, at))  # past markers and gaps
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)
        self.calls.extend(("pause", tp) for tp in tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)
        self.calls.extend(("resume", tp) for tp in tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def committed(self, tp: TopicPartition) -> int | None:
        await asyncio.sleep(0)
        if self.on_committed is not None:
            self.on_committed(tp)
        self.calls.append(("committed", tp))
        return self.committed_offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset
        self.calls.append(("seek", tp, offset))

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = "earliest"
            self.calls.append(("seek", tp, "earliest"))


@dataclass
class FakeProducer:
    """A transactional producer's calls, noted in ``calls``; ``commit_error`` is raised by the next commit."""

    name: str
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    commit_error: BaseException | None = None
    stopped: bool = False

    async def begin_transaction(self) -> None:
        self.calls.append(("begin", self.name))

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        self.calls.append(("offsets", self.name, offsets))

    async def commit_transaction(self) -> None:
        self.calls.append(("commit", self.name))
        if self.commit_error is not None:
            error, self.commit_error = self.commit_error, None
            raise error

    async def stop(self) -> None:
        self.stopped = True
        self.calls.append(("stop", self.name))
