"""One client process driving a worker group: N keyed requests, every result awaited; prints a JSON line.

Variants:
- ``stream``: ``StreamerClient.stream`` (the way a user drives a group from one process);
- ``submit``: ``StreamerClient.submit`` per request, then the futures gathered;
- ``raw``: the floor, a minimal aiokafka client doing the same I/O: each request packed as a plain map
  (same fields, codec's tensors), one ``producer.send`` each, results read from its own reply topic and
  matched to requests by id in a dict. What a client library must not cost much more than.

CPU is this process's (``getrusage``) over the measured requests, after a warm-up of 500 of them.
Run: python bench/client_loop.py BOOTSTRAP REQUEST_TOPIC RESULTS_TOPIC MODEL VARIANT N
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import uuid
from typing import Any

import numpy as np

from schemas import Codec, new_request_id, now_ms
from streamer import kafka
from streamer.config import ClientSettings

KEYS = 64


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _client(settings: ClientSettings, model: str, inputs: list[Any], variant: str, n: int,
                  state: dict[str, Any]) -> None:
    from producers import StreamerClient

    if "client" not in state:
        state["client"] = StreamerClient(settings)
        await state["client"].start()
    client = state["client"]
    if variant == "stream":
        keys = {id(x): f"key-{i % KEYS}" for i, x in enumerate(inputs)}
        async for r in client.stream((inputs[i % len(inputs)] for i in range(n)), model=model,
                                     key=lambda x: keys[id(x)]):
            assert r.status == "ok", r
    else:
        futures = [await client.submit(inputs[i % len(inputs)], model=model, key=f"key-{i % KEYS}")
                   for i in range(n)]
        for r in await asyncio.gather(*futures):
            assert r.status == "ok", r


async def _raw(settings: ClientSettings, model: str, inputs: list[Any], n: int, state: dict[str, Any]) -> None:
    codec = Codec()
    if "producer" not in state:
        reply = f"{settings.results_topic}.reply.raw{uuid.uuid4().hex[:8]}"
        await kafka.ensure_topics(settings, [kafka.TopicSpec(reply, 1)])
        state["reply"] = reply
        state["producer"] = kafka.producer(settings, linger_ms=0)
        state["consumer"] = kafka.consumer(settings, reply, group_id=None, auto_offset_reset="earliest")
        await state["producer"].start()
        await state["consumer"].start()
        await state["consumer"].getmany(timeout_ms=100)
    producer, consumer, reply = state["producer"], state["consumer"], state["reply"]
    waiting: dict[str, asyncio.Future[Any]] = {}
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while waiting:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    res = codec.unpack(r.value)
                    fut = waiting.pop(res["id"], None)
                    if fut is not None:
                        fut.set_result(res)

    futures = []
    for i in range(n):
        rid, created = new_request_id(), now_ms()
        key = f"key-{i % KEYS}"
        value = codec.pack({"id": rid, "model": model, "inputs": inputs[i % len(inputs)], "key": key,
                            "reply_to": {"topic": reply}, "deadline_ms": created + 30_000, "created_ms": created,
                            "metadata": {}})
        fut = waiting[rid] = loop.create_future()
        futures.append(fut)
        if i == 0:
            reader = asyncio.create_task(read())
        await producer.send(settings.request_topic, value, key=key.encode(),
                            headers=[("streamer-schema", b"1"), ("streamer-request-id", rid.encode())])
    for r in await asyncio.gather(*futures):
        assert r["status"] == "ok", r
    await reader


async def main(bootstrap: str, request_topic: str, results_topic: str, model: str, variant: str, n: str) -> None:
    # The workers answer reply topics named after their results topic (<results>.reply.<client>) only.
    settings = ClientSettings(bootstrap_servers=bootstrap, request_topic=request_topic, results_topic=results_topic,
                              timeout_s=120)
    from streamer.models import load_model

    inputs = [np.ascontiguousarray(x) for x in load_model(model, "cpu").example_inputs(256, seed=1)]
    state: dict[str, Any] = {}
    out: dict[str, Any] = {"variant": variant}
    for phase, count in (("warm", 500), ("run", int(n))):
        cpu0, t0 = _cpu(), time.perf_counter()
        if variant == "raw":
            await _raw(settings, model, inputs, count, state)
        else:
            await _client(settings, model, inputs, variant, count, state)
        if phase == "run":
            out.update(requests=count, seconds=time.perf_counter() - t0,
                       cpu_us_per_request=(_cpu() - cpu0) / count * 1e6)
    if "client" in state:
        await state["client"].close()
    else:
        await state["producer"].stop()
        await state["consumer"].stop()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(*sys.argv[1:7]))
