"""Connecting to a cluster: the client keyword arguments every client shares (TLS, SASL), and starting clients
with aiokafka's connection failures turned into one error that says what to fix (a refused password, an untrusted
certificate, or a cluster that does not answer), every client closed if one fails."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context

from .config import KafkaSettings
from .errors import AuthenticationFailed, BrokerError, TlsFailed

__all__ = ["METADATA_BACKOFF_S", "client_kwargs", "space_metadata_refreshes", "start", "started", "translated_errors"]


@contextlib.asynccontextmanager
async def translated_errors(settings: KafkaSettings) -> AsyncIterator[None]:
    """Turn aiokafka's connection failures into streamer errors that say what to fix.

    aiokafka reports any bootstrap failure as "Unable to bootstrap"; with SASL configured, one
    direct connection to the first bootstrap server tells a refused password from a dead host.
    """
    try:
        yield
    except KafkaConnectionError as exc:
        if settings.security_protocol.endswith("SSL"):
            why = await _tls_refused(settings)
            if why is not None:
                raise TlsFailed(
                    f"TLS to the cluster at {settings.bootstrap_servers} failed: {why}. If the brokers' certificates "
                    "are signed by a private CA, set ssl_cafile (STREAMER_SSL_CAFILE) to that CA's PEM file."
                ) from exc
        if settings.security_protocol.startswith("SASL") and await _credentials_refused(settings):
            raise AuthenticationFailed(
                f"the cluster at {settings.bootstrap_servers} refused user {settings.sasl_username!r} "
                f"({settings.sasl_mechanism}): invalid credentials. Check sasl_username / sasl_password "
                "(STREAMER_SASL_USERNAME / STREAMER_SASL_PASSWORD)."
            ) from exc
        raise BrokerError(f"cannot reach the cluster at {settings.bootstrap_servers} ({exc}); check bootstrap_servers "
                          "(--bootstrap-servers or STREAMER_BOOTSTRAP_SERVERS)") from exc


async def start(settings: KafkaSettings, *clients: Any) -> None:
    """Start ``clients`` (producers, consumers) under :func:`translated_errors`; if one fails, stop them all
    before raising (aiokafka otherwise warns of unclosed clients at exit)."""
    try:
        async with translated_errors(settings):
            for client in clients:
                await client.start()
    except BaseException:
        await _stop(clients)
        raise


@contextlib.asynccontextmanager
async def started(settings: KafkaSettings, *clients: Any) -> AsyncIterator[None]:
    """:func:`start` ``clients``, and stop them all on the way out."""
    await start(settings, *clients)
    try:
        yield
    finally:
        await _stop(clients)


async def _stop(clients: Iterable[Any]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()


def _first_bootstrap(settings: KafkaSettings) -> tuple[str, str]:
    """Host and port of the first bootstrap server, which the probes below connect to directly."""
    host, _, port = settings.bootstrap_servers.split(",")[0].strip().rpartition(":")
    return host, port


async def _tls_refused(settings: KafkaSettings) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails (an untrusted certificate, say); None if it
    does not, or the server cannot be reached at all."""
    import ssl

    host, port = _first_bootstrap(settings)
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=client_kwargs(settings)["ssl_context"],
                                    server_hostname=host), 10)
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed: {exc.verify_message}"
    except ssl.SSLError as exc:
        return str(exc.reason or exc)
    except (OSError, TimeoutError, ValueError):
        return None
    writer.close()
    return None


async def _credentials_refused(settings: KafkaSettings) -> bool:
    from aiokafka.conn import create_conn
    from aiokafka.errors import SaslAuthenticationFailed

    host, port = _first_bootstrap(settings)
    kw = client_kwargs(settings)
    kw.pop("bootstrap_servers")
    try:
        conn = await create_conn(host, int(port), request_timeout_ms=10_000, **kw)
    except SaslAuthenticationFailed:
        return True
    except (KafkaError, OSError, ValueError):
        return False
    conn.close()
    return False


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security keyword arguments shared by producers, consumers and admin clients."""
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_password is not None  # checked by the settings validator
        kw["sasl_mechanism"] = settings.sasl_mechanism
        kw["sasl_plain_username"] = settings.sasl_username
        kw["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kw


METADATA_BACKOFF_S = 0.1  # the Java client's retry.backoff.ms


def space_metadata_refreshes(client: Any, backoff_s: float = METADATA_BACKOFF_S) -> None:
    """Spaces a producer's or consumer's metadata refreshes ``backoff_s`` apart while the topics it tracks stay
    the same (``client``: its aiokafka client).

    aiokafka's producer asks for metadata again the moment an answer comes for as long as a partition it holds
    records for has no leader (a topic deleted under it, a leader election), with no pause, and its consumer's
    fetcher does the same for an assigned partition without a leader: a worker whose client closed its reply
    topic sent thousands of Metadata requests a second to the broker until the records expired. The Java client
    waits retry.backoff.ms between such refreshes; so does this. A refresh for a topic the client has not
    tracked before goes at once, and one already under way is shared. Reads aiokafka's client (``_topics``,
    ``_md_update_fut``)."""
    force = client.force_metadata_update
    last: list[Any] = [-math.inf, frozenset()]  # when the last refresh was asked for, and for which topics

    def spaced() -> Any:
        now, topics = time.monotonic(), frozenset(client._topics)
        if client._md_update_fut is not None:
            return force()  # one is under way: wait for it
        wait = last[0] + backoff_s - now
        if wait <= 0 or topics != last[1]:
            last[0], last[1] = now, topics
            return force()
        loop = asyncio.get_running_loop()
        later: asyncio.Future[bool] = loop.create_future()
        loop.call_later(wait, _resolve, later)
        return later

    client.force_metadata_update = spaced


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)
