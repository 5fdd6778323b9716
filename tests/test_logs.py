"""Log hygiene: a broker outage's repeated client errors collapse to one line per cause per interval."""

from __future__ import annotations

import logging

import pytest

from streamer.logs import RepeatFilter


def _record(name: str, msg: str, level: int = logging.ERROR, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeats_of_one_cause_collapse_with_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("streamer.logs.time.monotonic", lambda: now[0])
    f = RepeatFilter(interval_s=10)
    passed = [f.filter(_record("aiokafka", "Unable connect to node with id %s: %s", logging.ERROR, 1, "refused"))
              for _ in range(500)]
    assert passed == [True] + [False] * 499
    assert f.filter(_record("aiokafka.fetcher", "Failed fetch messages from %s"))  # another cause: its own line
    assert f.filter(_record("streamer", "partitions assigned: %s", logging.INFO))  # info is never held back
    now[0] += 11
    again = _record("aiokafka", "Unable connect to node with id %s: %s", logging.ERROR, 1, "refused")
    assert f.filter(again)
    assert "[499 more like this in the last 11 s]" in again.getMessage()
