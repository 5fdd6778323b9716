"""Kafka wiring: every client streamer creates is built here, so TLS/SASL reach all of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from . import _records
from ._connect import METADATA_BACKOFF_S, client_kwargs, space_metadata_refreshes, start, started, translated_errors
from ._produce import KeyPartitions, append_open, append_record, fail_pending, pending_topics, send_request
from .config import KafkaSettings
from .errors import AuthenticationFailed, BrokerError, ConfigError, TlsFailed
from .logs import quiet
from .partitioners import make_partitioner

_records.install()  # records whose header keys are not UTF-8 are read, not raised on (see _records)

__all__ = [
    "METADATA_BACKOFF_S",
    "REQUEST_TOPIC",
    "KeyPartitions",
    "TopicSource",
    "TopicSpec",
    "admin",
    "admin_client",
    "append_open",
    "append_record",
    "client_kwargs",
    "committed_offsets",
    "consumer",
    "delete_topics",
    "describe_group",
    "ensure_topics",
    "fail_pending",
    "offset_bounds",
    "partition_leaders",
    "pending_topics",
    "preflight",
    "producer",
    "require_topic",
    "send_request",
    "start",
    "started",
    "topic_partitions",
    "translated_errors",
    "wait_for_cluster",
    "wait_for_group",
]


def producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A durable producer: idempotent, ``acks=all``, so per-partition order survives retries.

    ``settings.idempotence = False`` is for brokers without idempotent producers (Tansu); order
    then still holds without retries, as aiokafka sends one batch per partition at a time.
    """
    kw: dict[str, Any] = {
        **client_kwargs(settings), "acks": "all", "enable_idempotence": settings.idempotence, "linger_ms": 0,
        "partitioner": make_partitioner(settings.partitioner),
    }
    kw.update(overrides)
    made = AIOKafkaProducer(**kw)
    space_metadata_refreshes(made.client)
    return made


def consumer(settings: KafkaSettings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    kw: dict[str, Any] = {**client_kwargs(settings), "enable_auto_commit": False, "auto_offset_reset": "earliest"}
    kw.update(overrides)
    made = AIOKafkaConsumer(*topics, **kw)
    space_metadata_refreshes(made._client)
    return made


def admin_client(settings: KafkaSettings) -> AIOKafkaAdminClient:
    kw = client_kwargs(settings)
    kw.pop("client_id")
    return AIOKafkaAdminClient(client_id=f"{settings.client_id}-admin", **kw)


@contextlib.asynccontextmanager
async def admin(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on exit; connection failures come out as streamer errors."""
    client = admin_client(settings)
    async with translated_errors(settings):
        await client.start()
    try:
        yield client
    finally:
        await client.close()


async def wait_for_cluster(settings: KafkaSettings, timeout_s: float) -> None:
    """Wait until the cluster answers, retrying with backoff (0.25 s doubling to 1 s, as the Java client's
    ``reconnect.backoff.max.ms``) for up to ``timeout_s``.

    A process started before its cluster (compose, a restart during an outage) waits, as Kafka's own
    clients do, instead of exiting. Refused credentials fail at once; after ``timeout_s`` the last
    failure comes out as a :class:`BrokerError` naming the bootstrap servers.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay, said = 0.25, False
    while True:
        try:
            async with admin(settings):
                return
        except (AuthenticationFailed, TlsFailed):
            raise  # retrying cannot help
        except BrokerError:
            if loop.time() + delay > deadline:
                raise
            if not said:
                logging.getLogger("streamer").warning(
                    "the cluster at %s does not answer yet; retrying for up to %g s (startup_timeout_s)",
                    settings.bootstrap_servers, timeout_s)
                said = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int = 8
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


async def ensure_topics(settings: KafkaSettings, specs: Iterable[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created."""
    wanted = {s.name: s for s in specs}
    async with admin(settings) as client:
        existing = set(await client.list_topics())
        missing = [s for n, s in wanted.items() if n not in existing]
        if not missing:
            return []
        new = [
            NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)) for s in missing
        ]
        with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won the race
            await client.create_topics(new)
        await _wait_listed(client, [s.name for s in missing])
        return [s.name for s in missing]


async def _wait_listed(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    while True:
        try:
            if set(names) <= set(await admin.list_topics()):
                return
        except KafkaError:
            pass
        await asyncio.sleep(0.1)


async def delete_topics(settings: KafkaSettings, names: Iterable[str]) -> None:
    async with admin(settings) as client:
        await client.delete_topics(list(names))


async def describe_group(settings: KafkaSettings, group_id: str) -> tuple[str, list[str]]:
    """The group's state (``Stable``, ``PreparingRebalance``, ``Empty``, ...) and its member client ids."""
    async with admin(settings) as client:
        response = await client.describe_consumer_groups([group_id])
    _err, _group, state, _ptype, _proto, members = response[0].groups[0]
    return str(state), [str(m[1]) for m in members]


async def wait_for_group(
    settings: KafkaSettings, group_id: str, members: int, timeout_s: float = 60.0,
    check: Callable[[], None] | None = None, *, at_least: bool = False,
) -> None:
    """Wait until ``group_id`` is stable with exactly ``members`` members (``at_least``: that many or more).

    ``check``, called on each try, may raise to give up early (a member process died, say).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen = "nothing yet"  # the last answer, for the error: a group stuck rebalancing reads differently from no answer
    since = loop.time()
    while True:
        if check is not None:
            check()
        try:
            state, ids = await describe_group(settings, group_id)
            if state == "Stable" and (len(ids) >= members if at_least else len(ids) == members):
                return
            now = f"{state} with {len(ids)} member(s)"
        except KafkaError as exc:
            now = f"{type(exc).__name__}: {exc}"
        if now != seen:
            seen, since = now, loop.time()
        if loop.time() > deadline:
            raise TimeoutError(f"group {group_id} did not reach {'at least ' if at_least else ''}{members} stable "
                               f"members in {timeout_s:g} s (last: {seen}, for {loop.time() - since:.0f} s)")
        await asyncio.sleep(0.2)


async def partition_leaders(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """Partition -> the node id that leads it (-1 while none does)."""
    async with admin(settings) as client:
        topics = await client.describe_topics([topic])
    return {int(p["partition"]): int(p["leader"]) for t in topics for p in t["partitions"]}


async def offset_bounds(
    settings: KafkaSettings, partitions: Iterable[TopicPartition], isolation_level: str = "read_uncommitted"
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Each partition's end offset and first offset, fetched once (``read_committed``: the stable end)."""
    tps = list(partitions)
    if not tps:
        return {}, {}
    c = consumer(settings, group_id=None, isolation_level=isolation_level)
    async with translated_errors(settings):
        await c.start()
    try:
        return await c.end_offsets(tps), await c.beginning_offsets(tps)
    finally:
        await c.stop()


async def committed_offsets(
    settings: KafkaSettings, group_id: str, admin_: AIOKafkaAdminClient | None = None, timeout_s: float = 30.0
) -> dict[TopicPartition, Any]:
    """The group's committed offsets (``OffsetAndMetadata``), retried while its coordinator is not ready yet.

    The first group a fresh cluster sees waits for ``__consumer_offsets`` to be created.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            if admin_ is not None:
                return dict(await admin_.list_consumer_group_offsets(group_id))
            async with admin(settings) as client:
                return dict(await client.list_consumer_group_offsets(group_id))
        except KafkaError as exc:
            if not getattr(exc, "retriable", False) or loop.time() > deadline:
                raise
        await asyncio.sleep(0.2)


@dataclass(frozen=True, slots=True)
class TopicSource:
    """Where a topic's name comes from, for a user told that it does not exist: the ``setting`` that names it
    and the command that creates it."""

    setting: str
    create: str = "streamer topics create"


REQUEST_TOPIC = TopicSource("--request-topic or STREAMER_REQUEST_TOPIC")


async def require_topic(settings: KafkaSettings, client: Any, topic: str, source: TopicSource, *,
                        wait_s: float = 0.0) -> None:
    """Raise :class:`ConfigError` naming ``topic``, the setting that names it and the command that creates it
    (``source``) when the cluster says the topic does not exist (or may not be read); ``client``: a started
    producer's or consumer's ``.client``. With ``wait_s``, a topic still missing is waited for that long
    first (a worker started beside the job that creates its topics), said once in the log.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    said = False
    while (await topic_partitions(client, [topic])).get(topic) == 0:
        if loop.time() >= deadline:
            raise ConfigError(f"topic {topic!r} does not exist on the cluster at {settings.bootstrap_servers} (or "
                              f"this client may not use it): create it ({source.create}) or name another "
                              f"({source.setting})")
        if not said:
            logging.getLogger("streamer").warning("topic %r does not exist yet; waiting for up to %g s "
                                                  "(startup_timeout_s)", topic, wait_s)
            said = True
        await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))


async def preflight(settings: KafkaSettings, wait_s: float, topic: str | None = None,
                    source: TopicSource = REQUEST_TOPIC) -> None:
    """What a command checks before it loads a model (seconds of ``import torch`` and building it): the cluster
    answers and, given ``topic``, the topic exists, each waited for up to ``wait_s`` (0: asked once). A command
    pointed at the wrong cluster or topic says so in a second, with the same line a worker's start would give;
    aiokafka's log of each failed connection attempt is held back meanwhile.
    """
    with quiet("aiokafka"):
        await wait_for_cluster(settings, wait_s)
        if topic is not None:
            async with admin(settings) as client:
                await require_topic(settings, client._client, topic, source, wait_s=wait_s)


async def topic_partitions(client: Any, topics: Iterable[str], timeout_s: float = 5.0) -> dict[str, int]:
    """Partition counts of ``topics`` in one metadata request: 0 for a topic that does not exist, is not
    a legal name or is not authorised. A topic the answer leaves in doubt (no leader yet) is left out,
    and so is every topic when no broker answered within ``timeout_s``. The request never asks the
    broker to create a topic. ``client`` is a started producer's or consumer's ``.client``.
    """
    from aiokafka import errors
    from aiokafka.protocol.metadata import MetadataRequest

    names = sorted(set(topics))
    node = client.get_random_node()
    if not names or node is None:
        return {}
    try:
        response = await asyncio.wait_for(
            client.send(node, MetadataRequest(names, allow_auto_topic_creation=False)), timeout_s)
    except (KafkaError, TimeoutError, OSError):
        return {}
    absent = {errors.UnknownTopicOrPartitionError, errors.InvalidTopicError, errors.TopicAuthorizationFailedError}
    found: dict[str, int] = {}
    for topic_data in response.topics:
        code, topic, partitions = topic_data[0], topic_data[1], topic_data[-1]
        kind = errors.for_code(code)
        if kind is errors.NoError:
            found[topic] = len(partitions)
        elif kind in absent:
            found[topic] = 0
    return found
