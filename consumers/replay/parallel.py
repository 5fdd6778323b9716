"""``streamer replay --processes N``: the range split by partition over N replay processes.

Process ``i`` replays the partitions at positions ``i, i + N, ...`` of the range, as its own job
``<job>.<i>of<N>`` (so each resumes on its own), into its own part file
``<sink>.<i>of<N>.jsonl`` (or straight into the topic of a ``topic:`` sink). When every process
has finished, the parts are joined into the sink (process by process), then removed. Run again
with the same N, a stopped job resumes process by process.

Each process runs :func:`replay_offline` (spawned, not forked: the parent may hold threads and a
torch runtime), with ``torch_threads`` set to its share of the cores unless the settings name it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from streamer.config import WorkerSettings

from .plan import ReplaySummary, forget, read_plan
from .ranges import Span
from .sinks import _jsonl_to_parquet

__all__ = ["replay_in_processes"]


def _part(sink: str, i: int, n: int) -> str:
    return sink if sink.startswith("topic:") else f"{sink}.{i}of{n}.jsonl"


def _child(conn: Connection, settings: dict[str, Any], topic: str, job: str, spans: list[Span], sink: str,
           options: dict[str, Any]) -> None:
    """One process's share (the target of a spawned process): its summary goes back through ``conn``."""
    import uvloop

    from .engine import replay_offline

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = uvloop.run(replay_offline(WorkerSettings.model_validate(settings), topic, job, spans, sink, **options))
    facts = {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)}  # (asdict garbles a Counter)
    conn.send_bytes(json.dumps({**facts, "statuses": dict(summary.statuses)}).encode())  # plain data, not a pickle
    conn.close()


async def replay_in_processes(settings: WorkerSettings, topic: str, job: str, spans: list[Span], sink: str,
                              processes: int, *, restart: bool = False,
                              progress: Callable[[int, int], None] | None = None,
                              **options: Any) -> ReplaySummary:
    """``spans`` over ``processes`` processes (``options``: :func:`replay_offline`'s); one summary of them all."""
    n = min(processes, max(1, len(spans)))
    jobs = [f"{job}.{i}of{n}" for i in range(n)]
    if restart:
        for j in jobs:
            await forget(settings, topic, j)
    if not settings.torch_threads:
        settings = settings.model_copy(update={"torch_threads": max(1, (os.cpu_count() or 1) // n)})
    context = multiprocessing.get_context("spawn")
    children: list[tuple[Any, Connection]] = []
    for i in range(n):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_child, name=f"streamer-replay-{i}of{n}", daemon=True,
                                args=(send, settings.model_dump(), topic, jobs[i], spans[i::n], _part(sink, i, n),
                                      options))
        child.start()
        send.close()
        children.append((child, receive))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for child, _ in children:
            if child.exitcode is None:
                child.terminate()  # SIGTERM: it stops after the batch in hand, its progress committed

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    total = sum(s.size for s in spans)
    watcher = asyncio.create_task(_watch(settings, topic, jobs, total, progress))
    try:
        answers = await asyncio.gather(*(asyncio.to_thread(_answer, child, receive) for child, receive in children))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    summary = ReplaySummary(range_size=sum(a.range_size for a in answers),
                            done_before=sum(a.done_before for a in answers),
                            processed=sum(a.processed for a in answers),
                            elapsed_s=max(a.elapsed_s for a in answers),
                            complete=all(a.complete for a in answers))
    for a in answers:
        summary.statuses.update(a.statuses)
    if progress:
        progress(summary.done_before + summary.processed, summary.range_size)
    parts = [Path(_part(sink, i, n)) for i in range(n)]
    if summary.complete and not sink.startswith("topic:") and any(p.exists() for p in parts):
        await asyncio.to_thread(_join, parts, Path(sink))
    return summary


def _answer(child: Any, receive: Connection) -> ReplaySummary:
    """A process's summary, once it has exited."""
    answer: dict[str, Any] | None = None
    with contextlib.suppress(EOFError):  # EOF: it died before answering
        answer = json.loads(receive.recv_bytes())
    child.join()
    if answer is None:
        raise RuntimeError(f"replay process {child.name} exited {child.exitcode} without a summary")
    return ReplaySummary(**{**answer, "statuses": Counter(answer["statuses"])})


def _join(parts: list[Path], sink: Path) -> None:
    joined = sink.with_name(sink.name + ".joined.jsonl")
    with joined.open("wb") as out:
        for part in parts:
            if not part.exists():
                continue  # that child's share had finished in an earlier run that was joined already
            with part.open("rb") as src:
                shutil.copyfileobj(src, out)
    if sink.suffix == ".parquet":
        _jsonl_to_parquet(joined, sink)
        joined.unlink()
    else:
        joined.replace(sink)
    for part in parts:
        part.unlink(missing_ok=True)


async def _watch(settings: WorkerSettings, topic: str, jobs: list[str], total: int,
                 progress: Callable[[int, int], None] | None) -> None:
    """Progress from the children's committed plans, every second."""
    while progress:
        done = 0
        for j in jobs:
            try:
                done += (await read_plan(settings, topic, j, [])).done
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
        progress(done, total)
        await asyncio.sleep(1.0)
