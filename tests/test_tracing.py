"""Tracing across hops (streamer.tracing): one trace per request from the client through the worker (or each stage
of a pipeline) and back, with the SDK's in-memory exporter; off, and not even imported, unless configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from .test_pipelines import TINY

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parent.parent



def _traced(bootstrap: str, *spec: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "tests.traced_run", bootstrap, uuid.uuid4().hex[:8], *spec],
                         capture_output=True, text=True, cwd=ROOT, timeout=240, check=False,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout))


def _by_trace(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    traces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        traces[s["trace"]].append(s)
    return traces


def _one(spans: list[dict[str, Any]], name: str, **attrs: Any) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, attrs, spans)
    return found[0]


def _check_request_traces(run: dict[str, Any], stages: list[str | None]) -> None:
    """Each request: client request -> publish -> process (each stage, a child of the one before) -> back."""
    spans = run["spans"]
    traces = _by_trace(spans)
    by_id = {s["id"]: s for s in spans}
    assert len(run["results"]) == 6 and all(r["status"] == "ok" for r in run["results"])
    heads = {h["streamer-request-id"]: h.get("traceparent", "") for h in run["reply_headers"]}
    for result in run["results"]:
        request = _one(spans, "streamer request", **{"streamer.request_id": result["id"]})
        assert request["kind"] == "CLIENT" and request["attributes"]["streamer.status"] == "ok"
        assert request["attributes"]["streamer.model_version"]
        trace = traces[request["trace"]]
        publish = _one(trace, "streamer publish")
        assert publish["parent"] == request["id"] and publish["kind"] == "PRODUCER"
        parent = publish
        for stage in stages:
            process = _one(trace, "streamer process", **({"streamer.stage": stage} if stage else {}))
            assert process["parent"] == parent["id"] and process["kind"] == "CONSUMER", (process, parent)
            assert process["attributes"]["streamer.batch_size"] >= 1
            assert process["attributes"]["streamer.model"]
            wait = [s for s in trace if s["name"] == "streamer queue wait" and s["parent"] == process["id"]]
            assert len(wait) == 1 and wait[0]["start"] <= wait[0]["end"]
            # The batch span (a trace of its own, as a batch of messages is) links to this item, and its
            # inference span is its child, with the batch size and the model as attributes.
            batch = [s for s in spans if s["name"] == "streamer batch" and process["id"] in s["links"]]
            assert len(batch) == 1
            assert batch[0]["attributes"]["streamer.batch_size"] == process["attributes"]["streamer.batch_size"]
            inference = [s for s in spans if s["name"] == "streamer inference" and s["parent"] == batch[0]["id"]]
            assert len(inference) == 1 and inference[0]["attributes"]["streamer.model"]
            parent = process
        # The result carries the trace back: its traceparent names the last hop's process span.
        traceparent = heads[result["id"]]
        assert traceparent.split("-")[1:3] == [request["trace"], parent["id"]], traceparent
        assert by_id[parent["id"]]["trace"] == request["trace"]
    # The first request was sent inside the application's own span: its trace continues that one.
    user = _one(spans, "user operation")
    first = _one(spans, "streamer request", **{"streamer.request_id": run["results"][0]["id"]})
    assert first["parent"] == user["id"] and first["trace"] == user["trace"]


def test_a_worker_continues_each_request_trace_and_returns_it(broker: Any) -> None:
    _check_request_traces(_traced(broker.bootstrap_servers), [None])


def test_each_stage_of_a_pipeline_continues_the_trace(broker: Any, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY.format(name=f"tr{uuid.uuid4().hex[:6]}", delay_ms=0))
    _check_request_traces(_traced(broker.bootstrap_servers, str(spec)), ["double", "total"])


@pytest.mark.parametrize(("env", "on"), [({}, False), ({"OTEL_TRACES_EXPORTER": "none"}, False),
                                         ({"OTEL_TRACES_EXPORTER": "console"}, True)])
def test_tracing_is_off_and_not_imported_unless_configured(env: dict[str, str], on: bool) -> None:
    code = ("import sys, producers, consumers, streamer.app.cli\n"
            "from streamer.tracing import tracing\n"
            "print(tracing() is not None, 'opentelemetry' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**clean, **env}, check=True)
    assert out.stdout.split() == ([str(on), "True"] if on else ["False", "False"]), out
