"""Generated hostile records (hypothesis strategies) and the oracle that says how each must end.

Used by the property test (tests/test_property_worker.py, a few examples in CI) and by the soak
script (bench/soak.py, many more). A record is what any Kafka client in any language could
write: random bytes, truncated and mutated valid requests, any compression codec, huge and
empty keys, random headers (null values, keys and values that are not UTF-8), ids and names at
and over every limit, reply routes that do not exist.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as aiokafka_producer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from hypothesis import strategies as st

from schemas import Codec, WireError, now_ms
from streamer.errors import BadInput
from streamer.models import Model

CODECS = [None, "gzip", "snappy", "lz4", "zstd"]


class RawKey(str):
    """A header key that goes on the wire as the given bytes (not UTF-8), as another client may write it."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


@contextlib.contextmanager
def pure_python_batches() -> Iterator[None]:
    """aiokafka's pure-Python record builder, which writes RawKey's bytes as they are."""
    fast = message_accumulator.DefaultRecordBatchBuilder
    for module in (message_accumulator, aiokafka_producer):
        module.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in (message_accumulator, aiokafka_producer):
            module.DefaultRecordBatchBuilder = fast  # type: ignore[attr-defined]


@dataclass
class Record:
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    codec: str | None
    good_id: str | None = None  # a well-formed request whose result the test waits for


def good_record(model: str, inputs: Any, results_topic: str) -> Record:
    rid = f"good-{uuid.uuid4().hex}"
    value = msgpack.packb({"id": rid, "model": model, "inputs": inputs, "reply_to": {"topic": results_topic}},
                          use_bin_type=True)
    return Record(value, b"good", [("streamer-schema", b"1"), ("streamer-request-id", rid.encode())], None, rid)


INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry


def records(model: str, request_topic: str, results_topic: str) -> st.SearchStrategy[Record]:
    """One hostile record."""
    ids = st.one_of(st.text(min_size=1, max_size=8), st.text(min_size=120, max_size=140), st.just(""),
                    INTS, st.none(), st.binary(max_size=8))
    topics = st.sampled_from([results_topic, f"{results_topic}.reply.gone", request_topic, "__consumer_offsets",
                              "bad topic!", "t" * 250, "", "other-team.topic"])
    reply = st.one_of(st.none(), st.fixed_dictionaries({
        "topic": st.one_of(topics, INTS),
        "partition": st.one_of(st.none(), st.integers(-3, 40), st.just("0"), st.floats()),
    }), st.text(max_size=5))
    inputs = st.one_of(st.lists(st.floats(), min_size=16, max_size=16), st.lists(st.floats(), max_size=20),
                       st.text(max_size=50), st.none(), st.binary(max_size=64), INTS,
                       st.dictionaries(st.text(max_size=5), INTS, max_size=3),
                       st.builds(lambda c, n: msgpack.ExtType(c, bytes(n)), st.integers(0, 127), st.integers(0, 40)),
                       st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)))
    body = st.fixed_dictionaries({"id": ids, "model": st.one_of(st.just(model), st.text(max_size=300)),
                                  "inputs": inputs},
                                 optional={"reply_to": reply, "created_ms": st.one_of(st.none(), INTS),
                                           "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=3),
                                                                                           INTS, max_size=2)),
                                           "deadline_ms": st.one_of(st.none(), st.integers(-1, 2**63)),
                                           "key": st.one_of(st.none(), st.text(max_size=1100))})
    packed = body.map(lambda b: msgpack.packb(b, use_bin_type=True, datetime=False))

    def mutate(data: bytes, at: int, junk: bytes, cut: bool) -> bytes:
        at %= max(1, len(data))
        return data[:at] if cut else data[:at] + junk + data[at + len(junk):]

    values = st.one_of(
        st.binary(max_size=300),
        packed,
        st.builds(mutate, packed, st.integers(0, 500), st.binary(min_size=1, max_size=4), st.booleans()),
        st.builds(lambda v: msgpack.packb(v, use_bin_type=True),
                  st.one_of(INTS, st.text(max_size=10), st.lists(INTS, max_size=3),
                            st.dictionaries(st.binary(max_size=3), INTS, max_size=2))),
    )
    header_keys = st.one_of(st.sampled_from(["streamer-schema", "streamer-request-id", "streamer-reply-topic",
                                             "streamer-reply-partition", "content-type"]),
                            st.text(max_size=10), st.binary(min_size=1, max_size=6).map(RawKey))
    header_values = st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"1", b"2", b"0", b"-1", b"x" * 200,
                                                                                   results_topic.encode()]))
    keys = st.one_of(st.none(), st.just(b""), st.binary(max_size=40), st.binary(min_size=4000, max_size=5000))
    return st.builds(Record, values, keys, st.lists(st.tuples(header_keys, header_values), max_size=6),
                     st.sampled_from(CODECS))


def must_answer(record: Record, model: Model, results_topic: str) -> tuple[str, set[str]] | None:
    """(id, the statuses its result may have) for a hostile record that is in fact a valid request the
    worker must answer; None for any other record, which must be dead-lettered.

    The oracle is the wire contract read independently of the worker: the codec and the model's own
    validation, plus the reply-route rule (only the results topic, two partitions, is a route here).
    """
    schema = [v for k, v in record.headers if k == "streamer-schema"]
    if schema and schema[0] is not None and schema[0] != b"1":
        return None
    try:
        req = Codec().decode_request(record.value)
    except WireError:
        return None
    if req.model != model.name:
        return None
    if req.reply_to is not None and (req.reply_to.topic != results_topic or (req.reply_to.partition or 0) > 1):
        return None
    # The worker checks the deadline before the inputs (WIRE.md: an expired request is not run).
    if req.deadline_ms is not None and req.deadline_ms < now_ms() - 60_000:
        return req.id, {"expired"}
    try:
        model.validate(req.inputs)
    except (BadInput, ValueError, TypeError):
        return None  # dead-lettered (a deadline passing in the last minute could make it "expired": rare)
    return req.id, {"ok"} if req.deadline_ms is None else {"ok", "expired"}
