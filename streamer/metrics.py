"""Prometheus metrics of one worker or stage process, served over HTTP (prometheus-client).

Each process has its own registry; ``serve`` starts the exporter thread on ``metrics_port``
(0 picks a free port). Labels: ``model`` and ``stage`` (empty for a single-stage worker).

The scaling signal, ``streamer_workers_needed``, is the number of workers like this one that
would keep up with the arrival rate and drain the present lag within ``drain_s``:

    (arrival rate + total lag / drain_s) / this worker's capacity

Arrival rate and lag are taken over all partitions of the input topic, so every member of the
group exports the same estimate, up to its own capacity; an autoscaler takes the average
over the group and rounds up (README: "Autoscaling").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from schemas import ErrorCode

__all__ = ["WorkerMetrics", "observe_many", "scaling_estimate"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TRANSACTION_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1,
                        2.5, 5, 10)
_ITEMS_BUCKETS = (*_BATCH_BUCKETS, 8192, 16384, 32768)


def observe_many(child: Any, amount: float, n: int) -> None:
    """``n`` observations of ``amount`` in a histogram child, in one step (the items of a batch share their
    queue wait): what ``n`` calls of ``observe`` would record. Reads prometheus-client's (pinned) internals."""
    if n <= 0:
        return
    child._sum.inc(amount * n)
    for i, bound in enumerate(child._upper_bounds):
        if amount <= bound:
            child._buckets[i].inc(n)
            return


def scaling_estimate(arrival_per_s: float, lag: int, capacity_per_s: float, drain_s: float) -> float:
    """Workers needed to keep up with ``arrival_per_s`` and drain ``lag`` within ``drain_s``."""
    if capacity_per_s <= 0:
        return 0.0
    return (max(0.0, arrival_per_s) + max(0, lag) / drain_s) / capacity_per_s


@dataclass
class WorkerMetrics:
    model: str
    stage: str = ""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    port: int | None = None

    def __post_init__(self) -> None:
        r, labels = self.registry, ("model", "stage")
        self.requests = Counter("streamer_requests", "Records consumed from the input topic", labels, registry=r)
        self.results = Counter("streamer_results", "Results and stage outputs published, by status",
                               (*labels, "status"), registry=r)
        self.batch_size = Histogram("streamer_batch_size", "Items per batch", labels, buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram("streamer_queue_wait_seconds", "From a record's arrival in the worker to its "
                                    "batch's start", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("streamer_inference_seconds", "Model time per batch", labels,
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("streamer_end_to_end_latency_seconds", "From the request's creation (created_ms) "
                                 "to its result's publication", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("streamer_consumer_lag", "Records not yet processed, per assigned partition",
                         (*labels, "topic", "partition"), registry=r)
        self.rebalances = Counter("streamer_rebalances", "Group rebalances this worker went through", labels,
                                  registry=r)
        self.dead_letters = Counter("streamer_dead_letters", "Dead-letter records written, by error code",
                                    (*labels, "code"), registry=r)
        self.dropped = Counter("streamer_dropped_records", "Records whose dead letter could not be written "
                               "either (each is logged)", labels, registry=r)
        self.capacity = Gauge("streamer_capacity_items_per_second", "Items/s this worker sustains when busy",
                              labels, registry=r)
        self.arrival = Gauge("streamer_arrival_rate_per_second", "Records/s arriving on the whole input topic",
                             labels, registry=r)
        self.topic_lag = Gauge("streamer_topic_lag", "Records not yet committed on the whole input topic, "
                               "as of the group's commits", labels, registry=r)
        self.batch_limit = Gauge("streamer_batch_limit", "Items a batch may hold now: max_batch_size, or what the "
                                 "latency target chose", labels, registry=r)
        self.batch_wait = Gauge("streamer_batch_wait_seconds", "How long a batch may wait to fill now: max_wait_ms, "
                                "or what the latency target chose", labels, registry=r)
        self.workers_needed = Gauge("streamer_workers_needed", "Workers like this one needed to keep up with the "
                                    "arrival rate and drain the lag in time", labels, registry=r)
        # Exactly-once only (``consumers._transactions``); their series exist once a worker runs exactly-once.
        self.transactions = Counter("streamer_transactions", "Exactly-once transactions ended, by outcome: committed, "
                                    "or failed (the producer is replaced, which settles it, and its partitions are "
                                    "read again from their committed offsets)", (*labels, "outcome"), registry=r)
        self.transaction_time = Histogram(
            "streamer_transaction_seconds", "Each committed exactly-once transaction's time, by phase: open (from its "
            "first records to its commit's start; at most transaction_ms while more work is at hand), deliver (the "
            "commit's wait for its records' and offsets' acknowledgement), end (EndTxn, the coordinator's answer)",
            (*labels, "phase"), buckets=_TRANSACTION_BUCKETS, registry=r)
        self.transaction_items = Histogram("streamer_transaction_items", "Items (results, stage outputs, dead "
                                           "letters) per committed exactly-once transaction", labels,
                                           buckets=_ITEMS_BUCKETS, registry=r)
        # Series that count rare events exist (at 0) from the start, so that rate() and increase() see the first one.
        self.labels(self.dropped)
        for code in get_args(ErrorCode):
            self.labels(self.dead_letters, code)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._assigned: set[tuple[str, int]] = set()

    def labels(self, metric: Any, *extra: Any) -> Any:
        return metric.labels(self.model, self.stage, *extra)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the exporter; returns the port it listens on."""
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.port = int(self._server.server_address[1])
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Per-partition lag of the partitions assigned now; partitions no longer assigned are dropped."""
        for gone in self._assigned - set(lags):
            self.lag.remove(self.model, self.stage, gone[0], str(gone[1]))
        for (topic, partition), value in lags.items():
            self.lag.labels(self.model, self.stage, topic, str(partition)).set(value)
        self._assigned = set(lags)
