"""Brokers the way tests and benchmarks start them: a KRaft cluster of several nodes on loopback ports (for
broker-failure tests), and any launcher started again on new ports when a port picked free was taken meanwhile."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..broker import LocalKafka, _cluster_id, free_ports
from ..errors import BrokerError

__all__ = ["LocalKafkaCluster", "start_on_free_ports"]

_Startable = TypeVar("_Startable", LocalKafka, "LocalKafkaCluster")


def start_on_free_ports(make: Callable[[], _Startable], attempts: int = 3) -> _Startable:
    """``make().start()``, with new ports when a port picked by :func:`free_port` was taken before the broker bound
    it (another process's outgoing connection may get it meanwhile: the ephemeral range is shared)."""
    for attempt in range(attempts):
        try:
            return make().start()
        except BrokerError as exc:
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class LocalKafkaCluster:
    """Several KRaft nodes (broker + controller each) on loopback, for broker-failure tests.

    Every node votes in the controller quorum; topics default to replication factor ``nodes``
    and ``min.insync.replicas=2``. Nodes can be killed and restarted one by one (``nodes[i]``).
    """

    def __init__(self, nodes: int = 3, *, heap_mb: int = 320, extra_properties: dict[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="streamer-kafka-cluster-"))
        picked = free_ports(2 * nodes)
        ports = list(zip(picked[::2], picked[1::2], strict=True))
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, 1))
        cluster_id = _cluster_id()
        self.nodes = [
            LocalKafka(port=p, controller_port=c, data_dir=self.root / f"node-{i}", heap_mb=heap_mb, node_id=i,
                       voters=voters, cluster_id=cluster_id, extra_properties=extra_properties)
            for i, (p, c) in enumerate(ports, 1)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes)

    def start(self, timeout_s: float = 120.0) -> LocalKafkaCluster:
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def node_by_id(self, node_id: int) -> LocalKafka:
        return next(n for n in self.nodes if n.node_id == node_id)

    def stop(self) -> None:
        """Kill every node and delete the cluster's data. A controlled shutdown would only tidy data that is about
        to be deleted, and with every node of the quorum leaving at once it took up to 20 s per node."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalKafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
