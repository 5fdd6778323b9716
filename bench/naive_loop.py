"""The baseline: a naive per-message aiokafka consume -> model -> produce loop.

What a first attempt looks like: one record at a time, the model on one item on the event
loop, ``send_and_wait`` per result, auto-commit. Same codec and model as the worker.
Run: python bench/naive_loop.py BOOTSTRAP REQUEST_TOPIC GROUP
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import Codec, InferenceResult
from streamer.models import load_model


async def main(bootstrap: str, topic: str, group: str) -> None:
    model = load_model("tiny-mlp", "cpu")
    codec = Codec()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        while not stop.is_set():
            try:
                msg = await asyncio.wait_for(consumer.getone(), 0.5)
            except TimeoutError:
                continue
            req = codec.decode_request(msg.value)
            out = model.run([model.validate(req.inputs)])[0]
            result = InferenceResult(id=req.id, model=model.name, status="ok", outputs=out)
            assert req.reply_to is not None
            await producer.send_and_wait(req.reply_to.topic, codec.encode_result(result), key=msg.key)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(*sys.argv[1:4]))
