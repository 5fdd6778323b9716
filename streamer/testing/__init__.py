"""What tests, benchmarks and the demo use to run the real thing on one machine: a KRaft cluster of several nodes
on loopback (``LocalKafkaCluster``), the Tansu broker for hosts without Java (``TansuBroker``; never to prove
delivery), brokers started again on new ports when a port picked free was taken (``start_on_free_ports``), and
``streamer`` commands as child processes (``WorkerProcess``). Waiting for a group to settle is
``streamer.kafka.wait_for_group``.

No product module imports this package but the demo (the application); the import-linter contracts in
``pyproject.toml`` check it. The single-node ``LocalKafka`` that ``streamer broker`` runs is ``streamer.broker``.
"""

from __future__ import annotations

from .cluster import LocalKafkaCluster, start_on_free_ports
from .processes import WorkerProcess
from .tansu import TansuBroker

__all__ = ["LocalKafkaCluster", "TansuBroker", "WorkerProcess", "start_on_free_ports"]
