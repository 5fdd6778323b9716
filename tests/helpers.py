"""Fixtures and helpers that start real worker processes and read topics back."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from streamer import config, kafka
from streamer.config import KafkaSettings, WorkerSettings
from streamer.testing import WorkerProcess


def settings_env(settings: KafkaSettings, **extra: Any) -> dict[str, str]:
    """The STREAMER_* environment a user would export for these settings (UPPER-case extras pass as they are)."""
    env = config.settings_env(settings, WorkerSettings.model_fields)
    env.update({k if k.isupper() else f"STREAMER_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class Processes:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[WorkerProcess] = []
        self.stopped: list[WorkerProcess] = []  # stopped on purpose: no longer checked for being alive

    def worker(self, settings: KafkaSettings, *args: str, **extra: Any) -> WorkerProcess:
        log = self.logdir / f"worker-{len(self.started)}.log"
        proc = WorkerProcess(settings_env(settings, **extra), log, *args)
        self.started.append(proc)
        return proc

    def stage(self, settings: KafkaSettings, spec: Path, stage: str, **extra: Any) -> WorkerProcess:
        """``streamer stage SPEC --stage NAME``, one torch thread (several share the test machine's cores)."""
        log = self.logdir / f"stage-{stage}-{len(self.started)}.log"
        env = settings_env(settings, torch_threads=1, stats_interval_s=2, **extra)
        for name in ("REQUEST_TOPIC", "DEAD_LETTER_TOPIC", "GROUP_ID", "MODEL"):
            env.pop(f"STREAMER_{name}", None)  # the spec names these
        proc = WorkerProcess(env, log, str(spec), "--stage", stage, command="stage")
        self.started.append(proc)
        return proc

    async def group(self, settings: WorkerSettings, n: int, *args: str, members: int | None = None,
                    **extra: Any) -> list[WorkerProcess]:
        """Start ``n`` workers and wait until the group is stable with ``members`` (default ``n``) members."""
        started = [self.worker(settings, *args, **extra) for _ in range(n)]
        await self.wait_group(settings, settings.group_id, n if members is None else members)
        return started

    async def wait_group(self, settings: KafkaSettings, group_id: str, members: int, timeout_s: float = 180) -> None:
        """Wait for the group to be stable with ``members`` members; fail at once if a process died."""
        try:
            await kafka.wait_for_group(settings, group_id, members, timeout_s, check=self.check_alive)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()[-4000:]}") from None

    def stop(self, proc: WorkerProcess, timeout_s: float = 30.0) -> int:
        """SIGTERM one process and wait for it; returns its exit code."""
        rc = proc.stop(timeout_s)
        self.started.remove(proc)
        self.stopped.append(proc)
        return rc

    def check_alive(self) -> None:
        dead = [p for p in self.started if p.proc.poll() not in (None, -9)]
        if dead:
            raise AssertionError(f"a process exited with {dead[0].proc.returncode}:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        procs = self.stopped + self.started
        return "\n".join(p.log_path.read_text(errors="replace") for p in procs if p.log_path.exists())

    def stop_all(self) -> None:
        for p in self.started:
            if p.proc.poll() is None:
                p.signal(signal.SIGKILL)
            p.stop(timeout_s=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


async def read_topic(settings: KafkaSettings, topic: str, count: int, timeout_s: float = 60) -> list[ConsumerRecord]:
    """Read ``count`` records of ``topic`` from the beginning (fails on timeout)."""
    consumer = kafka.consumer(settings, topic, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    except TimeoutError:
        raise AssertionError(f"{topic}: got {len(records)} records, expected {count}") from None
    finally:
        await consumer.stop()
    return records
