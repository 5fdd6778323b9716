"""The Grafana dashboard of compose's ``metrics`` profile (ops/grafana): provisioned as compose mounts it, and every
metric it queries is one that a running worker exports (a renamed metric would leave a panel empty, silently).

No Docker engine here: Grafana itself is not started, so the dashboard has not been looked at in a browser
(README says so)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from producers import StreamerClient
from streamer import ClientSettings, WorkerSettings, kafka
from streamer.broker import free_port
from streamer.models import load_model

from .helpers import Processes

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "streamer.json").read_text())
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def _queries() -> list[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    return exprs


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bstreamer_[a-z_]+\b", expr))


def test_dashboard_is_provisioned_as_compose_mounts_it() -> None:
    svc = COMPOSE["services"]["grafana"]
    assert svc["profiles"] == ["metrics"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()
    assert (ROOT / mounts["/var/lib/grafana/dashboards"]).resolve() == (GRAFANA / "dashboards").resolve()
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/streamer.json"

    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in COMPOSE["services"] and COMPOSE["services"]["prometheus"]["profiles"] == ["metrics"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "streamer.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    for expr in _queries():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    # What the operator issue asks the dashboard to show.
    used = set().union(*map(_metric_names, _queries()))
    wanted = {"streamer_results_total", "streamer_end_to_end_latency_seconds_bucket", "streamer_batch_size_sum",
              "streamer_consumer_lag", "streamer_workers_needed", "streamer_dead_letters_total",
              "streamer_rebalances_total"}
    assert wanted <= used, wanted - used


def _scrape(port: int) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.kafka
async def test_every_metric_the_dashboard_queries_is_exported_by_a_running_worker(
    worker_settings: WorkerSettings, client_settings: ClientSettings, processes: Processes
) -> None:
    ws = worker_settings.model_copy(update={"delivery": "exactly-once"})  # exports the transactions' metrics too
    await kafka.ensure_topics(ws, [kafka.TopicSpec(ws.request_topic, 2), kafka.TopicSpec(ws.results_topic, 1),
                                   kafka.TopicSpec(ws.dead_letter_topic, 1)])
    port = free_port()
    await processes.group(ws, 1, metrics_port=port, stats_interval_s=1)
    inputs = load_model("tiny-mlp", "cpu").example_inputs(50, seed=2)
    async with StreamerClient(client_settings) as client:
        results = [r async for r in client.stream(inputs, model="tiny-mlp")]
    assert all(r.status == "ok" for r in results)
    producer = AIOKafkaProducer(bootstrap_servers=ws.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(ws.request_topic, b"\xc1 not msgpack")  # a dead letter
    finally:
        await producer.stop()

    queried = set().union(*map(_metric_names, _queries()))
    exported: set[str] = set()
    for _ in range(50):
        exported = await asyncio.to_thread(_scrape, port)
        if queried <= exported:
            break
        await asyncio.sleep(0.2)
    assert queried <= exported, f"the dashboard queries metrics no worker exports: {sorted(queried - exported)}"


def test_readme_lists_the_metrics_the_dashboard_uses() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in set().union(*map(_metric_names, _queries())):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}" in readme, base
