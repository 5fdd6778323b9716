"""Log set-up for every command: human-readable lines by default, JSON lines on request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "RepeatFilter", "quiet", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, pid, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Warnings and errors of one cause (logger and message template) at most once per ``interval_s``.

    The next line of that cause that does get through says how many were held back. A broker outage
    makes every client log the same few lines many times a second; this keeps one of each.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        cause = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, held = self._seen.get(cause, (-self.interval_s, 0))
        if now - last < self.interval_s:
            self._seen[cause] = (last, held + 1)
            return False
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[cause] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {now - last:.0f} s]"
        return True


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """``fmt``: ``text`` (default) or ``json``; ``STREAMER_LOG_FORMAT`` when not given."""
    fmt = (fmt or os.environ.get("STREAMER_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))


@contextlib.contextmanager
def quiet(name: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Hold back logger ``name``'s records below ``level`` for the block (unless DEBUG is on).

    Used while a process first reaches its cluster: until then streamer says in one line what is wrong, and
    aiokafka's log of each failed connection attempt would only repeat it.
    """
    logger = logging.getLogger(name)
    before = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)
