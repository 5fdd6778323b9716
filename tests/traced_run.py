"""A traced run, in a process of its own (the OpenTelemetry tracer provider is global and set once per process):
the SDK's in-memory exporter, a worker (or the two stages of a pipeline) and a client in this process, on the
test broker. Prints the finished spans and the trace headers of the result records as JSON.

    python -m tests.traced_run BOOTSTRAP TAG [PIPELINE_SPEC]
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)

from consumers import Worker, stage_worker  # noqa: E402 - after the provider: streamer decides at start-up
from producers import StreamerClient  # noqa: E402
from streamer import ClientSettings, WorkerSettings, kafka, load_settings  # noqa: E402
from streamer.pipeline import load_pipeline  # noqa: E402


def _span(s: Any) -> dict[str, Any]:
    ctx = s.get_span_context()
    return {"name": s.name, "trace": f"{ctx.trace_id:032x}", "id": f"{ctx.span_id:016x}",
            "parent": f"{s.parent.span_id:016x}" if s.parent else None, "kind": s.kind.name,
            "attributes": dict(s.attributes or {}), "links": [f"{link.context.span_id:016x}" for link in s.links],
            "start": s.start_time, "end": s.end_time}


async def main(bootstrap: str, tag: str, spec_path: str | None) -> None:
    common = {"bootstrap_servers": bootstrap, "results_topic": f"tr-{tag}.results",
              "dead_letter_topic": f"tr-{tag}.dlq"}
    workers: list[Worker] = []
    if spec_path:
        spec = load_pipeline(spec_path)
        base = load_settings(WorkerSettings, **common)
        await kafka.ensure_topics(base, [
            *(kafka.TopicSpec(spec.input_topic(s.name), 2) for s in spec.order),
            *(kafka.TopicSpec(spec.dead_letter_topic(s.name), 1) for s in spec.order),
            kafka.TopicSpec(base.results_topic, 1)])
        workers = [stage_worker(spec, s.name, base) for s in spec.order]
        model, request_topic, inputs = spec.name, spec.input_topic(spec.order[0].name), [[1.0, 2.0, 3.0, 4.0]] * 6
    else:
        ws = load_settings(WorkerSettings, request_topic=f"tr-{tag}.requests", group_id=f"tr-{tag}", **common)
        await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 2), kafka.TopicSpec(ws.results_topic, 1),
                                       kafka.TopicSpec(ws.dead_letter_topic, 1)])
        workers = [Worker(ws)]
        model, request_topic, inputs = "tiny-mlp", ws.request_topic, [[0.5] * 16] * 6
    for w in workers:
        await w.start()
    results: list[Any] = []
    reply_topic = ""
    try:
        cs = load_settings(ClientSettings, request_topic=request_topic, timeout_s=60, **{
            k: v for k, v in common.items() if k in ClientSettings.model_fields})
        async with StreamerClient(cs) as client:
            reply_topic = client.reply_to.topic
            user = trace.get_tracer("the-application")
            with user.start_as_current_span("user operation"):  # the first request continues the caller's trace
                results.append(await client.infer(inputs[0], model=model, key="k0"))
            results += [r async for r in client.stream(inputs[1:], model=model)]
            raw = await _reply_headers(cs, reply_topic)
    finally:
        for w in workers:
            await w.stop()
    _provider.force_flush()
    print(json.dumps({"spans": [_span(s) for s in EXPORTER.get_finished_spans()],
                      "results": [{"id": r.id, "status": r.status} for r in results],
                      "reply_headers": raw}))


async def _reply_headers(settings: ClientSettings, topic: str) -> list[dict[str, str]]:
    """The headers of every record of the client's reply topic (read before the client deletes it)."""
    consumer = kafka.consumer(settings, topic, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: list[dict[str, str]] = []
    try:
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out += [{k: (v or b"").decode() for k, v in r.headers} for r in records]
            if len(out) >= 6:
                break
    finally:
        await consumer.stop()
    return out


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
