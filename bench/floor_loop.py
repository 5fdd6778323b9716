"""The floor: a minimal aiokafka batch loop with the worker's I/O, and nothing else.

getmany (whatever has arrived, up to 16 batches), decode each request with plain msgpack (the
codec's limits and zero-copy tensors, no validation models), the same model on batches of
MAX_BATCH (one torch intra-op thread), one produce per
result (a plain map in the wire format) with the worker's producer settings (idempotent, acks=all,
256 KiB batches), wait for the acks once per poll, commit. What a framework for batched inference must not cost
much more than.
With OUT_TOPIC it is the first stage of a two-stage hop: it forwards each request with the output as its
``payload`` to OUT_TOPIC, and the second stage (a floor reading OUT_TOPIC) answers.
Run: python bench/floor_loop.py BOOTSTRAP REQUEST_TOPIC GROUP [MAX_BATCH] [MODEL] [OUT_TOPIC]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import Codec, now_ms
from streamer.models import load_model


async def main(bootstrap: str, topic: str, group: str, max_batch: int = 32, model_spec: str = "tiny-mlp",
               out_topic: str = "") -> None:
    torch.set_num_threads(1)
    model = load_model(model_spec, "cpu")
    codec = Codec()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0,
                                max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        while not stop.is_set():
            # As much as has arrived (up to 16 batches), so acks and the commit are waited for once per poll,
            # not once per batch; the model still runs on batches of max_batch.
            batches = await consumer.getmany(timeout_ms=100, max_records=16 * max_batch)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                continue
            requests = [codec.unpack(r.value) for r in records]
            inputs = [model.validate(q["inputs"] if "inputs" in q else q["payload"]) for q in requests]
            outputs = [out for i in range(0, len(inputs), max_batch) for out in model.run(inputs[i:i + max_batch])]
            futures = []
            for r, q, out in zip(records, requests, outputs, strict=True):
                if out_topic:  # a stage: the message goes on with the output as its payload
                    q.pop("inputs", None)
                    value = codec.pack({**q, "payload": out})
                else:
                    value = codec.pack({"id": q["id"], "model": model.name, "model_version": model.version,
                                        "status": "ok", "outputs": out, "worker": "floor", "created_ms": now_ms()})
                futures.append(await producer.send(out_topic or q["reply_to"]["topic"], value, key=r.key))
            await asyncio.gather(*futures)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:5]), *sys.argv[5:7]))
