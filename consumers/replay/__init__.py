"""Replay: a fixed range of a request topic, for offline batch inference or fed again to live workers.

- ``ranges``: the range, per partition ``[start, end)``, by offsets or times, fixed when a job starts.
- ``plan``: a job's plan and progress in its consumer group's commits, its summary, the lock that keeps two
  runs of one job apart, and the error result of a record with no id of its own (``TOPIC:PARTITION:OFFSET``).
- ``reader``: the range read partition by partition, progress committed with the plan.
- ``sinks``: JSON Lines, Parquet or a topic, each with a checkpoint.
- ``engine``: the offline engine (the workers' own batch runner, through a model or a pipeline's stages)
  and the job around it (:func:`replay_offline`); ``parallel`` splits a job over processes.
- ``republish``: the range re-sent to the live workers' input, answered on the job's own reply topic.

``streamer replay`` (``streamer.app.replay``) is the command around them.
"""

from __future__ import annotations

from .engine import Engine, ReplayJob, replay_codec, replay_offline
from .parallel import replay_in_processes
from .plan import Plan, ReplaySummary, anonymous_error, forget, job_group, job_running, read_plan
from .ranges import Span, parse_offsets, parse_time_ms, resolve_range
from .republish import forget_replies, reply_topic, republish
from .sinks import Sink, open_sink

__all__ = [
    "Engine",
    "Plan",
    "ReplayJob",
    "ReplaySummary",
    "Sink",
    "Span",
    "anonymous_error",
    "forget",
    "forget_replies",
    "job_group",
    "job_running",
    "open_sink",
    "parse_offsets",
    "parse_time_ms",
    "read_plan",
    "replay_codec",
    "replay_in_processes",
    "replay_offline",
    "reply_topic",
    "republish",
    "resolve_range",
]
