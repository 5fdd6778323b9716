"""A FastStream batch subscriber doing the worker's job, the way FastStream's users write it.

``@broker.subscriber(batch=True)`` hands the handler a list of raw request bodies; the handler decodes
them (the codec, plain msgpack), runs the model on the batch, and publishes the results with
``broker.publish_batch`` (one produce request); offsets are committed after the handler (AckPolicy.ACK).
The producer gets the worker's settings (acks=all, idempotent, 256 KiB batches). The model output is
``OUT`` (tiny-mlp, or the 384-d stand-in of bench/standins.py).
Not a product dependency: ``pip install 'faststream[kafka]==0.7.8'`` for the benchmark.
Run: python bench/faststream_loop.py BOOTSTRAP REQUEST_TOPIC GROUP MAX_BATCH [MODEL] [OUT_TOPIC]
"""

from __future__ import annotations

import asyncio
import sys

import torch
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker

from schemas import Codec, now_ms
from streamer.models import load_model


def main(bootstrap: str, topic: str, group: str, max_batch: int = 32, model_spec: str = "tiny-mlp",
         out_topic: str = "") -> None:
    torch.set_num_threads(1)
    model = load_model(model_spec, "cpu")
    codec = Codec()
    broker = KafkaBroker(bootstrap, acks="all", enable_idempotence=True, linger_ms=0, max_batch_size=256 * 1024)
    app = FastStream(broker)

    @broker.subscriber(topic, group_id=group, batch=True, max_records=max_batch, batch_timeout_ms=5,
                       auto_offset_reset="earliest", ack_policy=AckPolicy.ACK)
    async def handle(bodies: list[bytes]) -> None:
        requests = [codec.unpack(b) for b in bodies]
        outputs = model.run([model.validate(q["inputs"] if "inputs" in q else q["payload"]) for q in requests])
        results = []
        for q, out in zip(requests, outputs, strict=True):
            if out_topic:  # a stage: forward the payload on
                q.pop("inputs", None)
                results.append(codec.pack({**q, "payload": out}))
            else:
                results.append(codec.pack({"id": q["id"], "model": model.name, "model_version": model.version,
                                           "status": "ok", "outputs": out, "worker": "faststream",
                                           "created_ms": now_ms()}))
        await broker.publish_batch(*results, topic=out_topic or requests[0]["reply_to"]["topic"])

    asyncio.run(app.run())


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:5]), *sys.argv[5:7])
