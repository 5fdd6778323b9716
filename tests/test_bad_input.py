"""Bad input: each case gets an error result (where it can be routed) and a dead letter; the rest goes on."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from producers import StreamerClient, request_headers
from schemas import Codec, InferenceRequest, ReplyTo
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.models import load_model

from .helpers import Processes, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KEY = b"one-partition"  # every record on one partition, so bad and good items share batches


def _tensor_ext(dtype_code: int, shape: tuple[int, ...], data: bytes) -> msgpack.ExtType:
    head = struct.pack("<BB6x", dtype_code, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    return msgpack.ExtType(1, head + data)


def _raw_request(rid: str, reply: ReplyTo, **fields: Any) -> bytes:
    body = {"id": rid, "model": "tiny-mlp", "reply_to": reply.model_dump(exclude_none=True),
            "created_ms": 1, **fields}
    return msgpack.packb(body, use_bin_type=True)


async def test_each_bad_input_gets_an_error_result_and_a_dead_letter(
    created_topics: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = created_topics
    reply = ReplyTo(topic=ws.results_topic, partition=0)
    codec = Codec()
    good = load_model("tiny-mlp", "cpu").example_inputs(6, seed=5)

    def headers(rid: str | None) -> list[tuple[str, bytes]]:
        if rid is None:
            return []
        h = request_headers(InferenceRequest(id=rid, model="tiny-mlp", inputs=None, reply_to=reply))
        if rid == "future-schema":
            h = [("streamer-schema", b"2") if k == "streamer-schema" else (k, v) for k, v in h]
        return h

    def good_req(i: int) -> tuple[str | None, bytes]:
        rid = f"good-{i}"
        return rid, codec.encode_request(InferenceRequest(id=rid, model="tiny-mlp", inputs=good[i], reply_to=reply))

    # (request id or None, bytes, expected error code or None for a good one)
    cases: list[tuple[str | None, bytes, str | None]] = [
        (*good_req(0), None),
        ("undecodable", b"\xc1\x00garbage", "decode_error"),
        (None, b"\xc1 no headers either", None),  # dead letter only: nobody to reply to
        ("bad-utf8", b"\x81\xa2id\xa2\xff\xfe", "decode_error"),
        ("int-keys", b"\x81\x01\x02", "decode_error"),
        ("too-deep", b"\x91" * 10_000 + b"\x90", "decode_error"),
        ("huge-length", b"\xdd\x3b\x9a\xca\x00", "decode_error"),
        (*good_req(1), None),
        ("schema", _raw_request("schema", reply, model=None, inputs=[1.0]), "schema_error"),
        ("unknown-model", _raw_request("unknown-model", reply, model="no-such-model", inputs=[1.0] * 16),
         "unknown_model"),
        ("oversized", _raw_request("oversized", reply, inputs=np.zeros(40_000, np.float32).tolist()), "decode_error"),
        ("too-many-elements", _raw_request("too-many-elements", reply,
                                           inputs=_tensor_ext(11, (10**9,), b"")), "decode_error"),
        ("wrong-dtype", _raw_request("wrong-dtype", reply, inputs=_tensor_ext(9, (16,), bytes(128))), "bad_input"),
        ("wrong-shape", _raw_request("wrong-shape", reply, inputs=[1.0] * 3), "bad_input"),
        ("nan", _raw_request("nan", reply, inputs=[float("nan")] + [0.0] * 15), "bad_input"),
        (*good_req(2), None),
        ("future-schema", good_req(3)[1], "decode_error"),
    ]
    producer = kafka.producer(ws)
    await producer.start()
    try:
        for rid, value, _code in cases:
            await producer.send_and_wait(ws.request_topic, value, key=KEY, headers=headers(rid))
    finally:
        await producer.stop()
    # Start the worker after publishing, so bad and good items arrive in the same batches.
    processes.worker(ws, max_message_bytes=100_000, max_batch_size=8)

    routed = [c for c in cases if c[0] is not None]
    records = await read_topic(ws, ws.results_topic, len(routed))
    results = {r.id: r for r in (codec.decode_result(rec.value) for rec in records)}
    assert set(results) == {c[0] for c in routed}
    for rid, _value, code in routed:
        r = results[rid]
        if code is None:
            assert r.status == "ok", r
        else:
            assert r.status == "error", r
            assert r.error is not None and r.error.code == code, (rid, r.error)
            assert r.error.message

    bad = [c for c in cases if c[2] is not None or c[0] is None]
    dead = await read_topic(ws, ws.dead_letter_topic, len(bad))
    assert [d.value for d in dead] == [c[1] for c in bad]  # the original bytes, in order
    for d, (rid, _value, code) in zip(dead, bad, strict=True):
        h = dict(d.headers)
        assert h["streamer-error-code"].decode() == (code or "decode_error")
        assert h["streamer-error-message"]
        assert h["streamer-source-topic"].decode() == ws.request_topic
        assert int(h["streamer-source-offset"]) == cases.index((rid, _value, code))
        assert h["streamer-source-partition"]
        assert d.key == KEY

    # The worker keeps going.
    async with StreamerClient(client_settings) as client:
        ok = await client.infer(good[4], model="tiny-mlp", timeout_s=60)
    assert ok.status == "ok"
