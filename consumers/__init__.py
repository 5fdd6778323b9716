"""The worker side: consume requests, batch them, run the model, publish results.

Replay (``consumers.replay``; ``Engine``, ``ReplayJob``, ``ReplaySummary`` here) is imported on first use, so a
worker does not load replay's range reader and sinks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._batch import Route, RunStats
from ._commit import Committer, ConsumerCommitter
from .stage import stage_worker
from .worker import Worker

if TYPE_CHECKING:
    from .replay import Engine, ReplayJob, ReplaySummary

__all__ = [
    "Committer",
    "ConsumerCommitter",
    "Engine",
    "ReplayJob",
    "ReplaySummary",
    "Route",
    "RunStats",
    "Worker",
    "stage_worker",
]

_REPLAY = {"Engine", "ReplayJob", "ReplaySummary"}


def __getattr__(name: str) -> Any:
    if name in _REPLAY:
        from . import replay

        return getattr(replay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
