"""The worker side: consume requests, batch them, run the model, publish results."""

from ._batch import Route
from ._commit import Committer, ConsumerCommitter
from ._inference import RunStats
from .replay import Engine, ReplayJob, ReplaySummary
from .stage import stage_settings, stage_worker
from .worker import Worker

__all__ = [
    "Committer",
    "ConsumerCommitter",
    "Engine",
    "ReplayJob",
    "ReplaySummary",
    "Route",
    "RunStats",
    "Worker",
    "stage_settings",
    "stage_worker",
]
