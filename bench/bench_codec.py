"""The hot path's codec, per item, three ways: how the worker reads a request and writes its result.

Read (a 230-byte tiny-mlp request with a tensor, a reply route, a key and metadata, as bench_worker sends):
- ``models``: ``Codec.decode_request`` (msgpack with every limit, then the pydantic model), as the worker did;
- ``hand``: msgpack with every limit and hand-written checks of each field (the alternative the issue names);
- ``msgspec``: ``schemas.FastReader`` (msgspec Structs for the envelope in C, the inputs by msgpack with limits).
Write (an ok result of 8 float32):
- ``models``: an ``InferenceResult`` (and its ``Timings``) then ``Codec.encode_result``;
- ``writer``: ``schemas.ResultWriter.results`` over a batch of 32.
Medians of 7 rounds of 20,000 items, in one process. Writes bench/results/codec.json.
Run: python bench/bench_codec.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_worker import machine  # noqa: E402
from schemas import Codec, FastReader, InferenceRequest, InferenceResult, ReplyTo, ResultWriter, Timings  # noqa: E402
from schemas._models import valid_request_id  # noqa: E402
from streamer.models import load_model  # noqa: E402

N = 20_000


def _hand(codec: Codec) -> Callable[[bytes], tuple[dict[str, Any], Any]]:
    """msgpack with the codec's limits, then each field checked in Python (what a fast path without msgspec
    would do; the unknown-field, UTF-8 and depth rules come from Codec.unpack)."""

    def read(data: bytes) -> tuple[dict[str, Any], Any]:
        obj = codec.unpack(data)
        if type(obj) is not dict:
            raise ValueError("not a map")
        rid, model, key, reply = obj.get("id"), obj.get("model"), obj.get("key"), obj.get("reply_to")
        if not valid_request_id(rid) or type(model) is not str or not 0 < len(model) <= 256 or "inputs" not in obj:
            raise ValueError("bad envelope")
        if key is not None and (type(key) is not str or len(key) > 1024):
            raise ValueError("bad key")
        if reply is not None:
            if type(reply) is not dict or type(reply.get("topic")) is not str:
                raise ValueError("bad reply_to")
            part = reply.get("partition")
            if part is not None and (type(part) is not int or part < 0):
                raise ValueError("bad partition")
        for name in ("deadline_ms", "created_ms"):
            v = obj.get(name)
            if v is not None and (type(v) is not int or v < 0):
                raise ValueError(f"bad {name}")
        meta = obj.get("metadata")
        if meta is not None and (type(meta) is not dict or
                                 not all(type(v) in (str, int, float, bool, type(None)) for v in meta.values())):
            raise ValueError("bad metadata")
        return obj, obj["inputs"]

    return read


def _time(fn: Callable[[], Any], n: int) -> float:
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        fn()
        rounds.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    codec = Codec()
    model = load_model("tiny-mlp", "cpu")
    xs = model.example_inputs(256, seed=1)
    data = [codec.encode_request(InferenceRequest(
        id=f"{i:08d}-{uuid.uuid4().hex[:16]}", model="tiny-mlp", inputs=xs[i % 256], key=f"key-{i % 64}",
        reply_to=ReplyTo(topic="b.res"), metadata={"pad": "x" * 8})) for i in range(N)]
    reader, hand = FastReader(codec), _hand(codec)
    read = {
        "models": _time(lambda: [codec.decode_request(d) for d in data], N),
        "hand": _time(lambda: [hand(d) for d in data], N),
        "msgspec": _time(lambda: [reader.request(d) for d in data], N),
    }
    outs = model.run([model.validate(x) for x in xs[:32]])
    ids = [f"{i:08d}-{uuid.uuid4().hex[:16]}" for i in range(32)]
    timing = (1.5, 32, 0.2)
    writer = ResultWriter(codec, "tiny-mlp", model.version, "w-1")

    def models_write() -> None:
        for _ in range(N // 32):
            for rid, out in zip(ids, outs, strict=True):
                codec.encode_result(InferenceResult(
                    id=rid, model="tiny-mlp", model_version=model.version, status="ok", outputs=out,
                    timings=Timings(queue_ms=timing[0], batch_size=timing[1], inference_ms=timing[2]), worker="w-1"))

    def writer_write() -> None:
        for _ in range(N // 32):
            writer.results(ids, outs, [timing] * 32)

    write = {"models": _time(models_write, N // 32 * 32), "writer": _time(writer_write, N // 32 * 32)}
    out = {"machine": machine(), "request_bytes": len(data[0]), "read_us_per_item": read,
           "write_us_per_item": write, "msgpack": msgpack.version}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "codec.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
