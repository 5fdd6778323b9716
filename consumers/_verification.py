"""A transaction's records and offsets refused while the broker verifies the transaction: retried in ms, not 100.

Since Kafka 3.6 (KIP-890, ``transaction.partition.verification.enable``, on by default) a partition leader asks
the transaction coordinator whether the partition is in the producer's open transaction before it appends a
transactional record batch, and the group coordinator does the same before it takes a transaction's offsets. The
coordinator answers ``CONCURRENT_TRANSACTIONS`` while it is writing a change to that transaction (the group added
by AddOffsetsToTxn, or another partition by AddPartitionsToTxn), and the broker gives clients of aiokafka's
request versions a retriable error instead: ``NOT_ENOUGH_REPLICAS`` for records (KAFKA-15459) and
``COORDINATOR_LOAD_IN_PROGRESS`` for offsets. aiokafka retries both after ``retry_backoff_ms`` (100 ms), and
meanwhile the transaction, and the worker's pipeline behind its commit, waits. The coordinator's write takes a
few ms, so the worker retries after ``FIRST_S``, doubling with each refusal in a row up to aiokafka's backoff:
a refusal that lasts (too few in-sync replicas, a coordinator really loading) is retried at aiokafka's pace
after about 0.2 s. (Kafka 4's transactions v2 retry this in the broker, KAFKA-18654; aiokafka speaks v1.)

Traced in a worker at 1,500 requests/s, one broker: 16 such refusals in 6 s, each holding a transaction's
commit 100 ms.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import NotEnoughReplicasError
from aiokafka.producer import sender as _sender

__all__ = ["FIRST_S", "refused", "retry_refusals_soon", "settled"]

FIRST_S = 0.003  # the first retry after a refusal; doubled with each refusal in a row


def refused(sender: Any) -> float:
    """The backoff before retrying what the broker refused while verifying the transaction."""
    n: int = getattr(sender, "_streamer_refusals", 0)
    sender._streamer_refusals = n + 1
    return float(min(sender._retry_backoff, FIRST_S * 2**n))


def settled(sender: Any) -> None:
    """A request of the transaction went through: the next refusal is retried soon again."""
    sender._streamer_refusals = 0


class _TransactionalProduce(_sender.SendProduceReqHandler):  # type: ignore[misc]
    """aiokafka's produce request, its record batches refused in verification retried soon."""

    def handle_response(self, response: Any) -> None:
        codes = {p[1] for _, partitions in response.topics for p in partitions}
        super().handle_response(response)
        if self._to_reenqueue and codes <= {0, NotEnoughReplicasError.errno}:
            self._default_backoff = refused(self._sender)  # the backoff ``do`` waits before re-enqueueing
        elif not self._to_reenqueue:
            settled(self._sender)


def retry_refusals_soon(producer: AIOKafkaProducer) -> None:
    """Make transactional ``producer`` retry record batches refused in verification soon. Before it starts."""
    sender = producer._sender

    async def _send_produce_req(node_id: int, batches: Any) -> None:
        await _TransactionalProduce(sender, batches).do(node_id)
        sender._in_flight.remove(node_id)
        for tp in batches:
            sender._muted_partitions.remove(tp)

    sender._send_produce_req = _send_produce_req
