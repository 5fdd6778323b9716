"""Producer-side partitioners: Java-compatible key hashing, round-robin, random, sticky."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from producers import request_headers
from schemas import Codec, InferenceRequest, ReplyTo
from streamer import WorkerSettings, kafka
from streamer.models import load_model
from streamer.partitioners import PARTITIONERS, STICKY_RECORDS, make_partitioner, murmur2_partition

from .helpers import Processes, read_topic

# Computed with the Java client itself (kafka-clients 4.1.1):
#   Utils.murmur2(key.getBytes(UTF_8)) and Utils.toPositive(Utils.murmur2(...)) % n for n in 1, 3, 12, 16, 100.
JAVA_PAIRS = [
    ("", 275646681, (0, 0, 9, 9, 81)),
    ("a", -1563381124, (0, 1, 4, 12, 24)),
    ("k0", -704538303, (0, 2, 5, 1, 45)),
    ("k1", 1684045097, (0, 2, 5, 9, 97)),
    ("user-42", 1459644460, (0, 1, 4, 12, 60)),
    ("order:1234567", -1252482902, (0, 0, 6, 10, 46)),
    ("ключ", 2122343024, (0, 2, 8, 0, 24)),
    ("🔑", 2080712807, (0, 2, 11, 7, 7)),
    ("the quick brown fox", 2136040129, (0, 1, 1, 1, 29)),
    ("0123456789abcdef0123456789abcdef", 81657833, (0, 2, 5, 9, 33)),
]
COUNTS = (1, 3, 12, 16, 100)


@pytest.mark.parametrize(("key", "java_hash", "expected"), JAVA_PAIRS)
def test_murmur2_matches_the_java_client(key: str, java_hash: int, expected: tuple[int, ...]) -> None:
    from aiokafka.partitioner import murmur2

    assert murmur2(key.encode()) == java_hash & 0xFFFFFFFF  # aiokafka returns the same 32 bits, unsigned
    part = make_partitioner("murmur2")
    for n, want in zip(COUNTS, expected, strict=True):
        assert murmur2_partition(key.encode(), n) == want
        # The partitioner itself, given partitions in any order and some without a leader.
        assert part(key.encode(), list(reversed(range(n))), [0]) == want


def test_round_robin_spreads_evenly_and_ignores_keys() -> None:
    part = make_partitioner("round-robin")
    counts = Counter(part(b"same-key", list(range(12)), list(range(12))) for _ in range(1200))
    assert counts == dict.fromkeys(range(12), 100)
    keyless = make_partitioner("murmur2")
    assert Counter(keyless(None, list(range(5)), list(range(5))) for _ in range(50)) == dict.fromkeys(range(5), 10)


def test_keyless_records_avoid_partitions_without_a_leader() -> None:
    for name in PARTITIONERS:
        part = make_partitioner(name)
        assert {part(None, [0, 1, 2, 3], [1, 3]) for _ in range(2000)} == {1, 3}, name


def test_random_uses_every_partition() -> None:
    part = make_partitioner("random")
    counts = Counter(part(b"k", list(range(8)), list(range(8))) for _ in range(4000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 300  # 500 expected each; 300 is > 9 standard deviations away


def test_sticky_keeps_keyless_records_together_and_keys_on_their_hash() -> None:
    part = make_partitioner("sticky")
    seq = [part(None, list(range(6)), list(range(6))) for _ in range(4 * STICKY_RECORDS)]
    runs = [seq[i:i + STICKY_RECORDS] for i in range(0, len(seq), STICKY_RECORDS)]
    assert all(len(set(run)) == 1 for run in runs)
    assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))
    assert part(b"user-42", list(range(16)), list(range(16))) == 12


def test_unknown_partitioner_is_named() -> None:
    with pytest.raises(ValueError, match="unknown partitioner 'hash'; choose from murmur2, round-robin"):
        make_partitioner("hash")


@pytest.mark.kafka
@pytest.mark.parametrize("name", ["murmur2", "sticky", "round-robin"])
async def test_partitioner_through_a_worker(
    name: str, created_topics: WorkerSettings, processes: Processes
) -> None:
    """Requests placed by each partitioner come back, one result each; key-keeping ones keep per-key order."""
    ws = created_topics
    settings = ws.model_copy(update={"partitioner": name})
    n, keys = 400, 20
    inputs = load_model("tiny-mlp", "cpu").example_inputs(n, seed=5)
    codec = Codec()
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for i, x in enumerate(inputs):
            req = InferenceRequest(id=f"{i:05d}", model="tiny-mlp", inputs=x, key=f"key-{i % keys}",
                                   reply_to=ReplyTo(topic=ws.results_topic))
            await producer.send(ws.request_topic, codec.encode_request(req), key=req.key.encode(),  # type: ignore[union-attr]
                                headers=request_headers(req))
        await producer.flush()
    finally:
        await producer.stop()
    placed = await read_topic(ws, ws.request_topic, n)
    by_partition = Counter(r.partition for r in placed)
    if name == "round-robin":
        assert by_partition == dict.fromkeys(range(4), n // 4)
    else:
        for r in placed:
            assert r.partition == murmur2_partition(r.key, 4)

    processes.worker(ws)
    results = [codec.decode_result(r.value) for r in await read_topic(ws, ws.results_topic, n, timeout_s=120)]
    assert sorted(r.id for r in results) == [f"{i:05d}" for i in range(n)]
    assert all(r.status == "ok" for r in results)
    if name != "round-robin":
        # One key, one request partition, one worker at a time: its results come out in request order.
        arrived: dict[int, list[str]] = defaultdict(list)
        for r in results:
            arrived[int(r.id) % keys].append(r.id)
        for ids in arrived.values():
            assert ids == sorted(ids)


def _wire_md_vectors() -> list[tuple[bytes, int, tuple[int, ...]]]:
    text = (Path(__file__).resolve().parent.parent / "schemas" / "WIRE.md").read_text()
    table = text[text.index("| key (UTF-8) | murmur2"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = b"" if cells[0] == "(empty)" else cells[0].strip("`").encode()
        rows.append((key, int(cells[1]), tuple(int(c) for c in cells[2:])))
    return rows


def _murmur2_as_wire_md_says(data: bytes) -> int:
    """The pseudocode of WIRE.md, written out, for a client in another language to compare with."""
    mask, m, r = 0xFFFFFFFF, 0x5BD1E995, 24
    n = len(data)
    h = (0x9747B28C ^ n) & mask
    for i in range(0, n - n % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    t = data[n - n % 4:]
    if n % 4 == 3:
        h ^= t[2] << 16
    if n % 4 >= 2:
        h ^= t[1] << 8
    if n % 4 >= 1:
        h ^= t[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def test_wire_md_vectors_match_the_partitioner_and_the_documented_algorithm() -> None:
    rows = _wire_md_vectors()
    assert [(k.decode(), h, p) for k, h, p in rows] == JAVA_PAIRS
    for key, java_hash, parts in rows:
        assert _murmur2_as_wire_md_says(key) == java_hash
        assert tuple(murmur2_partition(key, n) for n in COUNTS) == parts
