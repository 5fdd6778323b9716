"""What a transactional worker's producer does when the broker refuses a transaction's records or offsets while it
verifies the transaction (consumers/_verification.py): retried in ms, doubling, up to aiokafka's own backoff; any
other retriable error keeps aiokafka's backoff. Without a broker: the refusal depends on a race in the broker (the
coordinator writing a change to the transaction just then), which the exactly-once benchmark shows (BENCHMARKS.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CoordinatorLoadInProgressError, NotEnoughReplicasError, NotLeaderForPartitionError

from consumers._group_fencing import Member, _GroupCommitHandler
from consumers._verification import FIRST_S, _TransactionalProduce, refused, settled

A, B = TopicPartition("results", 0), TopicPartition("results", 1)


@dataclass
class _Sender:
    _retry_backoff: float = 0.1
    _txn_manager: Any = field(default_factory=lambda: _Txn())
    client: Any = field(default_factory=lambda: _Client())


class _Client:
    def __init__(self) -> None:
        self.metadata_updates = 0

    def force_metadata_update(self) -> None:
        self.metadata_updates += 1


@dataclass
class _Txn:
    transactional_id: str = "g.w.1"
    producer_id: int = 7
    producer_epoch: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)

    def offset_committed(self, tp: TopicPartition, offset: int, group_id: str) -> None:
        self.committed[tp] = offset


@dataclass
class _Batch:
    done_at: int | None = None

    def done(self, offset: int, timestamp: int, log_start_offset: int) -> None:
        self.done_at = offset

    def expired(self) -> bool:
        return False


@dataclass
class _ProduceResponse:
    topics: list[tuple[str, list[tuple[int, int, int, int, int]]]]
    API_VERSION: int = 7


def _produce_answer(codes: dict[TopicPartition, int]) -> _ProduceResponse:
    return _ProduceResponse([("results", [(tp.partition, code, 10 if code == 0 else -1, -1, 0)
                                          for tp, code in codes.items()])])


def test_refusals_in_a_row_are_retried_after_3_ms_doubling_up_to_aiokafkas_backoff() -> None:
    sender = _Sender()
    waits = [refused(sender) for _ in range(8)]
    assert waits == pytest.approx([FIRST_S * 2**n for n in range(6)] + [0.1, 0.1])
    settled(sender)
    assert refused(sender) == pytest.approx(FIRST_S)


def test_records_refused_in_verification_are_retried_soon_and_the_others_are_done() -> None:
    sender = _Sender()
    batches = {A: _Batch(), B: _Batch()}
    handler = _TransactionalProduce(sender, batches)
    handler.handle_response(_produce_answer({A: 0, B: NotEnoughReplicasError.errno}))
    assert batches[A].done_at == 10 and batches[B].done_at is None
    assert handler._to_reenqueue == [batches[B]]
    assert handler._default_backoff == pytest.approx(FIRST_S)
    again = _TransactionalProduce(sender, {B: batches[B]})
    again.handle_response(_produce_answer({B: NotEnoughReplicasError.errno}))
    assert again._default_backoff == pytest.approx(2 * FIRST_S)
    _TransactionalProduce(sender, {B: batches[B]}).handle_response(_produce_answer({B: 0}))
    assert batches[B].done_at == 10
    assert refused(sender) == pytest.approx(FIRST_S), "a request that went through starts the doubling again"


def test_records_refused_for_another_reason_keep_aiokafkas_backoff() -> None:
    sender = _Sender()
    handler = _TransactionalProduce(sender, {A: _Batch(), B: _Batch()})
    handler.handle_response(_produce_answer({A: NotEnoughReplicasError.errno, B: NotLeaderForPartitionError.errno}))
    assert len(handler._to_reenqueue) == 2
    assert handler._default_backoff == pytest.approx(0.1)
    assert sender.client.metadata_updates == 1, "a partition without its leader asks for metadata, as aiokafka does"


def test_offsets_refused_in_verification_are_retried_soon() -> None:
    sender = _Sender()
    offsets = {tp: type("Offset", (), {"offset": 5, "metadata": ""})() for tp in (A, B)}
    handler = _GroupCommitHandler(sender, offsets, "g", Member(3, "m", None), "g.w.1")
    load = CoordinatorLoadInProgressError.errno
    assert handler.handle_response(_TxnOffsetAnswer([("results", [(0, load, {}), (1, load, {})], {})])) \
        == pytest.approx(FIRST_S)
    assert handler.handle_response(_TxnOffsetAnswer([("results", [(0, load, {}), (1, load, {})], {})])) \
        == pytest.approx(2 * FIRST_S)
    assert handler.handle_response(_TxnOffsetAnswer([("results", [(0, 0, {}), (1, 0, {})], {})])) is None
    assert sender._txn_manager.committed == {A: 5, B: 5}
    assert refused(sender) == pytest.approx(FIRST_S)


@dataclass
class _TxnOffsetAnswer:
    topics: list[tuple[str, list[tuple[int, int, dict[int, bytes]]], dict[int, bytes]]]
