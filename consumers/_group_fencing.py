"""The two Kafka requests that group-fenced transactions (KIP-447) need and aiokafka 0.14 lacks.

- **TxnOffsetCommit v3** carries the consumer group's generation and member id: the group coordinator refuses
  the offsets of a member whose generation is over (``ILLEGAL_GENERATION``, ``UNKNOWN_MEMBER_ID``), so a worker
  that lost its partitions in a rebalance (a zombie) cannot commit a transaction over them, whatever its
  transactional id. One transactional producer per worker is then enough (aiokafka alone fences by
  transactional id only, which takes one producer per input partition). The offsets' metadata names the
  committing transactional id, so that whoever takes a partition over can fence a committer that died. And the
  group is added to each transaction (AddOffsetsToTxn) as it opens, beside its records, instead of after them.
- **OffsetFetch v7** with ``require_stable``: a partition whose offsets wait in an open transaction answers
  ``UNSTABLE_OFFSET_COMMIT`` instead of the offset committed before it, so that a new owner never starts from
  an offset that the previous owner's last transaction is about to move.

Both are sent with aiokafka's own clients: the producer's sender sends the first in place of its v0 request
(``group_commit``), the consumer's client the second (``fetch_offsets``). Kafka 2.5 or newer.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

from ._verification import refused, settled

__all__ = ["Committed", "GoneFromGroup", "Member", "UnstableOffsets", "fetch_offsets", "group_commit", "member_of"]

UNSTABLE_OFFSET_COMMIT = 88
FENCED_INSTANCE_ID = 82
_GONE_FROM_GROUP = {Errors.IllegalGenerationError.errno, Errors.UnknownMemberIdError.errno,
                    Errors.RebalanceInProgressError.errno, FENCED_INSTANCE_ID}


class UnstableOffsets(Errors.KafkaError):  # type: ignore[misc]
    """Partitions whose offsets wait in a transaction not yet complete (``UNSTABLE_OFFSET_COMMIT``)."""

    retriable = True

    def __init__(self, tps: list[TopicPartition]) -> None:
        super().__init__(f"offsets in an open transaction: {tps}")
        self.tps = tps


class GoneFromGroup(Errors.KafkaError):  # type: ignore[misc]
    """The group coordinator refused a transaction's offsets: the member's generation is over."""


@dataclass(frozen=True, slots=True)
class Member:
    """The consumer group member a transaction's offsets are committed as (from the assignment in hand)."""

    generation: int
    member_id: str
    instance_id: str | None


def member_of(consumer: AIOKafkaConsumer, instance_id: str | None) -> Member:
    """The consumer's generation and member id now (in a rebalance callback: those of the assignment)."""
    coordinator = consumer._coordinator
    return Member(coordinator.generation, coordinator.member_id, instance_id)


@dataclass(frozen=True, slots=True)
class Committed:
    offset: int
    metadata: str | None  # the transactional id that committed it (ours), or what another client wrote


_S = TypeVar("_S", bound=RequestStruct)


class _OneVersion(Request[_S]):  # type: ignore[misc]
    """A request at the one version its subclass names (``_OneVersion[<RequestStruct>]``), built from its fields
    in the struct's order: aiokafka 0.14 sends these at versions without the fields streamer needs."""

    API_KEY = -1  # each subclass names its own

    def __init__(self, *fields: Any) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[_S]) -> _S:
        return request_struct_class(*self._fields)  # type: ignore[no-any-return]


# -- TxnOffsetCommit v3 ------------------------------------------------------------------------------------------
class _TxnOffsetCommitResponseV3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields))),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommitRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = _TxnOffsetCommitResponseV3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("committed_metadata", CompactString("utf-8")),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


_TxnOffsetCommitStruct: TypeAlias = _TxnOffsetCommitRequestV3


class _TxnOffsetCommitV3(_OneVersion[_TxnOffsetCommitStruct]):
    API_KEY = 28


class _GroupCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's handler of a transaction's offsets, sending v3 with the member's generation."""

    def __init__(self, sender: Any, offsets: Any, group_id: str, member: Member, metadata: str) -> None:
        super().__init__(sender, offsets, group_id)
        self._member = member
        self._metadata = metadata

    def create_request(self) -> _TxnOffsetCommitV3:
        txn = self._sender._txn_manager
        topics: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            topics[tp.topic].append((tp.partition, offset.offset, -1, self._metadata, {}))
        m = self._member
        return _TxnOffsetCommitV3(txn.transactional_id, self._group_id, txn.producer_id, txn.producer_epoch,
                                  m.generation, m.member_id, m.instance_id,
                                  [(topic, parts, {}) for topic, parts in topics.items()], {})

    def handle_response(self, resp: Any) -> float | None:
        txn = self._sender._txn_manager
        if any(code == Errors.CoordinatorLoadInProgressError.errno for _, ps, _ in resp.topics for _, code, _ in ps):
            return refused(self._sender)  # the transaction is being verified: soon (``_verification``)
        settled(self._sender)
        for topic, partitions, _ in resp.topics:
            for partition, error_code, _ in partitions:
                tp = TopicPartition(topic, partition)
                if error_code == 0:
                    txn.offset_committed(tp, self._offsets[tp].offset, self._group_id)
                elif error_code in _GONE_FROM_GROUP:
                    # Abortable: the transaction can only abort, and the worker takes its partitions over again.
                    txn.error_transaction(GoneFromGroup(f"{Errors.for_code(error_code).__name__} ({error_code}): "
                                                        f"generation {self._member.generation} is over"))
                    return None
                else:  # aiokafka's v0 handling: retry, fence, or fail
                    retry: float | None = super().handle_response(
                        _V0Errors([(topic, [(partition, error_code)])]))
                    return retry
        return None


@dataclass(slots=True)
class _V0Errors:
    errors: list[tuple[str, list[tuple[int, int]]]]


def group_commit(producer: AIOKafkaProducer, member: Callable[[], Member], metadata: str, group: str) -> None:
    """Make ``producer`` send its transactions' offsets to ``group`` as TxnOffsetCommit v3, as ``member()`` (asked
    each time), with ``metadata`` for every partition. Before it starts. Every transaction adds the group
    (AddOffsetsToTxn) as soon as it opens, beside its records, rather than when its offsets are sent: a commit
    then takes one round trip less."""
    sender = producer._sender
    txn = producer._txn_manager
    added_late = txn.consumer_group_to_add

    def consumer_group_to_add() -> str | None:
        if txn.is_in_transaction() and txn._txn_consumer_group is None:
            return group
        late: str | None = added_late()
        return late

    txn.consumer_group_to_add = consumer_group_to_add

    async def _do_txn_offset_commit(offsets: Any, group_id: str) -> bool | None:
        if not offsets:
            return None
        try:
            node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
        except Errors.GroupAuthorizationFailedError as exc:
            sender._txn_manager.error_transaction(exc)
            return None
        done: bool = await _GroupCommitHandler(sender, offsets, group_id, member(), metadata).do(node_id)
        return done

    sender._do_txn_offset_commit = _do_txn_offset_commit


# -- OffsetFetch v7 ----------------------------------------------------------------------------------------------
class _OffsetFetchResponseV7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("metadata", CompactString("utf-8")),
                ("error_code", Int16),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class _OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partition_indexes", CompactArray(Int32)),
            ("tags", TaggedFields),
        )),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


_OffsetFetchStruct: TypeAlias = _OffsetFetchRequestV7


class _OffsetFetchV7(_OneVersion[_OffsetFetchStruct]):
    API_KEY = 9


async def fetch_offsets(consumer: AIOKafkaConsumer, group_id: str, tps: list[TopicPartition], *,
                        stable: bool) -> dict[TopicPartition, Committed | None]:
    """The group's committed offsets of ``tps`` (None: none committed). ``stable``: raise :class:`UnstableOffsets`
    for partitions whose offsets wait in an open transaction, instead of answering the offsets before it."""
    coordinator = consumer._coordinator
    await coordinator.ensure_coordinator_known()
    by_topic: dict[str, list[int]] = collections.defaultdict(list)
    for tp in tps:
        by_topic[tp.topic].append(tp.partition)
    request = _OffsetFetchV7(group_id, [(topic, parts, {}) for topic, parts in by_topic.items()], stable, {})
    try:
        resp = await consumer._client.send(coordinator.coordinator_id, request, group=ConnectionGroup.COORDINATION)
    except Errors.KafkaError:
        coordinator.coordinator_dead()
        raise
    except NotImplementedError as exc:  # aiokafka: the broker has no OffsetFetch v7
        raise Errors.IncompatibleBrokerVersion("exactly-once needs Kafka 2.5 or newer (OffsetFetch v7, "
                                               "TxnOffsetCommit v3)") from exc
    if resp.error_code:
        _raise(resp.error_code, coordinator)
    out: dict[TopicPartition, Committed | None] = {}
    unstable = []
    for topic, partitions, _ in resp.topics:
        for partition, offset, _epoch, metadata, error_code, _ in partitions:
            tp = TopicPartition(topic, partition)
            if error_code == UNSTABLE_OFFSET_COMMIT:
                unstable.append(tp)
            elif error_code:
                _raise(error_code, coordinator)
            else:
                out[tp] = None if offset < 0 else Committed(offset, metadata)
    if unstable:
        raise UnstableOffsets(unstable)
    return out


def _raise(error_code: int, coordinator: Any) -> None:
    if error_code == UNSTABLE_OFFSET_COMMIT:
        raise UnstableOffsets([])
    error = Errors.for_code(error_code)
    if error in (Errors.NotCoordinatorError, Errors.CoordinatorNotAvailableError):
        coordinator.coordinator_dead()
    raise error()
