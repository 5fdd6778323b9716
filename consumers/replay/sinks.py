"""Where a replay job writes its results: a JSON Lines file, a Parquet file, or a Kafka topic.

Every sink has a checkpoint: the job commits its source offsets only after the sink's
checkpoint, and records the checkpoint with them, so a stopped job resumes where it committed.

- ``JsonLinesSink``: one result per line (``streamer results`` format). Its checkpoint is the
  file's length after an fsync; on resume the file is cut back to it, so a resumed job writes
  each result exactly once.
- ``ParquetSink``: the same JSON Lines journal next to the target (``FILE.parquet.jsonl``),
  turned into Parquet (pyarrow) when the job is done.
- ``TopicSink``: results keyed by request id to a topic, checkpointed when the broker has
  acknowledged them (``acks=all``). A job killed between the two may write a result twice on
  resume; readers de-duplicate by id, as the client library does.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Protocol

from schemas import Codec, InferenceResult, RoutingHeaders
from streamer import kafka
from streamer.config import KafkaSettings
from streamer.jsonl import result_to_json

__all__ = ["JsonLinesSink", "ParquetSink", "Sink", "TopicSink", "open_sink"]


class Sink(Protocol):
    description: str

    async def open(self, checkpoint: int | None) -> None:
        """Start fresh (``None``) or resume at a checkpoint this sink returned before."""

    async def write(self, results: list[InferenceResult]) -> None: ...

    async def checkpoint(self) -> int:
        """Make what was written durable; returns a position to resume at."""

    async def close(self, done: bool) -> None:
        """``done``: the whole range was written (a Parquet sink converts then)."""


class JsonLinesSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._file: Any = None

    async def open(self, checkpoint: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if checkpoint is None or not self.path.exists():
            self._file = self.path.open("wb")
        else:
            self._file = self.path.open("r+b")
            self._file.truncate(checkpoint)
            self._file.seek(checkpoint)

    async def write(self, results: list[InferenceResult]) -> None:
        self._file.write("".join(result_to_json(r) + "\n" for r in results).encode())

    async def checkpoint(self) -> int:
        self._file.flush()
        await asyncio.to_thread(os.fsync, self._file.fileno())
        return int(self._file.tell())

    async def close(self, done: bool) -> None:
        if self._file is not None:
            await self.checkpoint()
            self._file.close()
            self._file = None


class ParquetSink(JsonLinesSink):
    def __init__(self, path: Path) -> None:
        super().__init__(path.with_name(path.name + ".jsonl"))
        self.target = path
        self.description = f"{path} (Parquet)"

    async def close(self, done: bool) -> None:
        await super().close(done)
        if done:
            await asyncio.to_thread(_jsonl_to_parquet, self.path, self.target)
            self.path.unlink()


def _jsonl_to_parquet(src: Path, dst: Path) -> None:
    try:
        import pyarrow.json as pj
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("a Parquet sink needs pyarrow: pip install 'streamer[parquet]'") from None
    table = pj.read_json(src) if src.stat().st_size else None
    if table is None:
        import pyarrow as pa

        table = pa.table({"id": pa.array([], pa.string())})
    tmp = dst.with_name(dst.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(dst)


class TopicSink:
    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.description = f"topic {topic}"
        self._codec = Codec()
        self._producer = kafka.producer(settings, max_batch_size=256 * 1024, linger_ms=5)
        self._pending: list[asyncio.Future[Any]] = []

    async def open(self, checkpoint: int | None) -> None:
        await kafka.start(self.settings, self._producer)

    async def write(self, results: list[InferenceResult]) -> None:
        for r in results:
            headers = RoutingHeaders(r.id, None).build()
            self._pending.append(await self._producer.send(self.topic, self._codec.encode_result(r), key=r.id.encode(),
                                                           headers=headers))

    async def checkpoint(self) -> int:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
        return 0

    async def close(self, done: bool) -> None:
        try:
            await self.checkpoint()
        finally:
            await self._producer.stop()


def open_sink(target: str, settings: KafkaSettings) -> Sink:
    """``topic:NAME`` -> a topic; ``*.parquet`` -> Parquet; any other path -> JSON Lines."""
    if target.startswith("topic:"):
        return TopicSink(settings, target.removeprefix("topic:"))
    path = Path(target)
    return ParquetSink(path) if path.suffix == ".parquet" else JsonLinesSink(path)
