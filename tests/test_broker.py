"""The local broker launcher: storage formatting with any valid cluster id."""

from __future__ import annotations

import base64
import os

import pytest

from streamer import kafka
from streamer.broker import LocalKafka, _cluster_id
from streamer.config import KafkaSettings


def test_generated_cluster_ids_never_begin_with_a_dash() -> None:
    ids = [_cluster_id() for _ in range(5000)]  # without the rule, about 78 of them would
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)


@pytest.mark.kafka
async def test_a_cluster_id_that_begins_with_a_dash_formats_and_serves() -> None:
    dash_id = base64.urlsafe_b64encode(b"\xf8" + os.urandom(15)).rstrip(b"=").decode()
    assert dash_id.startswith("-")
    broker = LocalKafka(cluster_id=dash_id)
    try:
        broker.start()
        meta = (broker.data_dir / "log" / "meta.properties").read_text()
        assert f"cluster.id={dash_id}" in meta
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        assert await kafka.ensure_topics(settings, [kafka.TopicSpec("dash-id-check", 1)]) == ["dash-id-check"]
    finally:
        broker.stop()
