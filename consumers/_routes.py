"""Where a worker may write a result: the reply-route policy, and what the cluster says of each route.

A client names its reply route, so a client could otherwise make workers write anywhere they can
(the request topic, a topic of another team). Results go only to the results topic, topics under
``<results_topic>.`` (private reply topics, replay jobs) and the ``reply_topics`` allow-list; never
to the worker's own input or dead-letter topic, nor to an internal topic.

Whether a route exists is asked of the cluster once per topic, in one metadata request per batch
that never creates a topic; an absent topic is remembered for ``ttl_s``, so requests that name a
deleted reply topic (a client closed with requests in flight) cost nothing more, and the results the
producer still holds for it are failed when it is found gone (they become dead letters) instead of waiting
``produce_timeout_ms`` for a leader.

A route is also found gone by the producer's own metadata refreshes: one that the last refresh had and the next
(which asked about it) has not. The record batches for a gone route that were in flight when it was found gone
come back to the producer to be retried, and would be retried for ever, each retry a refresh that asks again
about every topic the producer tracks; they are failed at the next refresh.

A private reply topic (one under a wildcard route, such as ``<results_topic>.*``) is deleted whenever its client
closes: the worker says so in one INFO line, and aiokafka's ERROR "Topic ... not found in cluster metadata" for it
(and its WARNINGs of the produce requests in flight to it, retried until it is found gone) are held back. The
results topic and the routes named in ``reply_topics`` keep them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import UnknownTopicOrPartitionError

from schemas import valid_topic_name
from streamer import kafka
from streamer.config import WorkerSettings

__all__ = ["ReplyRoutes"]

log = logging.getLogger("streamer.worker")


class ReplyRoutes:
    def __init__(self, settings: WorkerSettings, ttl_s: float = 5.0) -> None:
        results = settings.results_topic
        allowed = [results, f"{results}.*", *settings.reply_topics]
        self._names = frozenset(a for a in allowed if not a.endswith("*"))
        self._prefixes = tuple(a[:-1] for a in allowed if a.endswith("*"))
        self._forbidden = frozenset({settings.request_topic, settings.dead_letter_topic})
        self._ttl_s = ttl_s
        self._allowed: dict[str, bool] = {}  # the policy's answer per topic, once worked out
        self._absent: dict[str, float] = {}  # topic -> monotonic time it was last found absent
        self._counts: dict[str, int] = {}  # partition counts found by resolve, until the producer knows them
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()  # the producers' cluster metadata listened to
        self._quieted = False  # aiokafka's log of a gone private reply topic held back

    def private(self, topic: str) -> bool:
        """Whether ``topic`` is a client's own reply topic (allowed by a wildcard route, not by name): one that is
        deleted when its client closes."""
        return topic not in self._names and self.allowed(topic)

    def allowed(self, topic: str) -> bool:
        known = self._allowed.get(topic)
        if known is None:
            known = (topic not in self._forbidden and not topic.startswith("__") and valid_topic_name(topic)
                     and (topic in self._names or topic.startswith(self._prefixes)))
            if len(self._allowed) < 10_000:
                self._allowed[topic] = known
        return known

    def refuse(self, client: Any, topic: str, partition: int | None) -> str | None:
        """Why a result may not go to ``topic``/``partition`` (None: as far as is known, it may).

        ``client`` is the producer's client, whose metadata knows the topics it wrote to.
        """
        if not self.allowed(topic):
            return f"reply topic {topic[:300]!r} is not an allowed reply route (see the reply_topics setting)"
        if self._absent_now(topic):
            return f"reply topic {topic!r} does not exist"
        known = client.cluster.partitions_for_topic(topic)
        partitions = len(known) if known is not None else self._counts.get(topic)
        if partition is not None and partitions is not None and partition >= partitions:
            return f"reply partition {partition} does not exist: {topic!r} has {partitions} partition(s)"
        return None

    def _absent_now(self, topic: str) -> bool:
        seen = self._absent.get(topic)
        if seen is None:
            return False
        if time.monotonic() - seen > self._ttl_s:
            del self._absent[topic]
            return False
        return True

    def mark_absent(self, topic: str, producer: AIOKafkaProducer, deleted: bool = False) -> None:
        """Remembers ``topic`` as absent, and fails the record batches the producer still holds for it (a deleted
        reply topic's results would otherwise wait ``produce_timeout_ms`` for a leader; they become dead letters
        now, as the results after them do). ``deleted``: it was there before (said in the log even if no result
        was waiting)."""
        self._absent[topic] = time.monotonic()
        self._counts.pop(topic, None)
        failed = kafka.fail_pending(producer, topic, UnknownTopicOrPartitionError(f"{topic!r} does not exist"))
        if deleted:  # a client's own reply topic is deleted as it closes; another route should not be
            log.log(logging.INFO if self.private(topic) else logging.WARNING,
                    "reply topic %r was deleted: results for it go to the dead-letter topic (%d record batch(es) "
                    "were waiting)", topic, failed)
        elif failed:
            log.info("reply topic %r is gone: the results still waiting for it go to the dead-letter topic", topic)

    async def confirm_absent(self, producer: AIOKafkaProducer, topic: str) -> bool:
        """Whether the cluster says ``topic`` does not exist (one metadata request); remembered if so.

        For an error that a deleted topic gives and a broker failover gives too."""
        if (await kafka.topic_partitions(producer.client, [topic])).get(topic) == 0:
            self.mark_absent(topic, producer)
            return True
        return False

    def watch(self, producer: AIOKafkaProducer) -> None:
        """Listens to ``producer``'s metadata refreshes (once per producer): a route that one refresh had and the
        next has not, though the producer still asked about it, is gone (deleted); record batches for a route
        found gone that came back to the producer from a failed produce request are failed."""
        cluster = producer.client.cluster
        if cluster in self._watched:
            return
        self._watched.add(cluster)
        if not self._quieted:
            _GoneReplyTopics.install(self)
            self._quieted = True
        present: set[str] = set()

        def refreshed(now: Any) -> None:
            nonlocal present
            known, tracked = now.topics(), producer.client._topics
            for topic in present - known:
                if topic in tracked:
                    self.mark_absent(topic, producer, deleted=True)
            for topic in kafka.pending_topics(producer):
                if self._absent_now(topic):
                    self.mark_absent(topic, producer)
            present = {t for t in known if self.allowed(t)}

        cluster.add_listener(refreshed)

    async def resolve(self, producer: AIOKafkaProducer, topics: Iterable[str]) -> None:
        """Ask the cluster about allowed topics the producer does not know yet (one request)."""
        self.watch(producer)
        client = producer.client
        unknown = {t for t in topics if self.allowed(t) and not self._absent_now(t)
                   and client.cluster.partitions_for_topic(t) is None}
        if not unknown:
            return
        for topic, count in (await kafka.topic_partitions(client, unknown)).items():
            if count == 0:
                self.mark_absent(topic, producer)
            elif len(self._counts) < 10_000:
                self._counts[topic] = count


class _GoneReplyTopics(logging.Filter):
    """Holds back what aiokafka logs of a private reply topic deleted by its closing client (the worker says it
    itself, at INFO): the ERROR of the metadata refresh that misses it, the first time for each topic (the
    producer stops asking about the topic then, so a second line would say that it did not), and the WARNINGs
    of the produce requests that were in flight to it (retried until it is found gone)."""

    MISSING = ("aiokafka.cluster", "Topic %s not found in cluster metadata")
    RETRY = ("aiokafka.producer.sender", "Got error produce response on topic-partition %s, retrying. Error: %s")

    def __init__(self, routes: ReplyRoutes) -> None:
        super().__init__()
        self._routes = weakref.ref(routes)
        self._held: set[str] = set()  # the topics whose missing line was held back

    @classmethod
    def install(cls, routes: ReplyRoutes) -> None:
        for name, _ in (cls.MISSING, cls.RETRY):
            logger = logging.getLogger(name)
            for old in [f for f in logger.filters if isinstance(f, cls) and f._routes() is None]:
                logger.removeFilter(old)  # of a worker that has gone
            logger.addFilter(cls(routes))

    def filter(self, record: logging.LogRecord) -> bool:
        routes = self._routes()
        args = record.args
        if routes is None or not isinstance(args, tuple) or not args:
            return True
        said = (record.name, record.msg)
        if said == self.RETRY:
            topic, error = getattr(args[0], "topic", None), args[-1]
            return not (error is UnknownTopicOrPartitionError and isinstance(topic, str) and routes.private(topic))
        if said != self.MISSING:
            return True
        topic = args[0]
        if not isinstance(topic, str) or topic in self._held or not routes.private(topic):
            return True
        if len(self._held) >= 10_000:
            self._held.clear()
        self._held.add(topic)
        return False
