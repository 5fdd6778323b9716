"""Stage workers: one worker of one stage of a pipeline, in the stage's own consumer group."""

from __future__ import annotations

from typing import Any

from streamer.config import KafkaSettings
from streamer.models import load_model
from streamer.pipeline import PipelineSpec

from ._batch import Route
from .worker import Worker

__all__ = ["stage_route", "stage_worker"]


def stage_route(spec: PipelineSpec, stage: str) -> Route:
    """What a worker of ``stage`` serves: where its input comes from, where its output goes."""
    names = [s.name for s in spec.order]
    i = names.index(spec.stage(stage).name)
    nxt = names[i + 1] if i + 1 < len(names) else None
    return Route(model=spec.name, stage=names[i], first=i == 0, next_topic=spec.next_topic(names[i]), next_stage=nxt)


def stage_worker(spec: PipelineSpec, stage: str, settings: KafkaSettings, **overrides: Any) -> Worker:
    st = spec.stage(stage)
    ws = spec.worker_settings(stage, settings, **overrides)
    model = load_model(st.callable, ws.device, **st.options)
    return Worker(ws, model=model, route=stage_route(spec, st.name), source=spec.input_source(st.name))
