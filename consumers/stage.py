"""Stage workers: one worker of one stage of a pipeline, in the stage's own consumer group."""

from __future__ import annotations

from typing import Any

from streamer import kafka
from streamer.config import KafkaSettings, WorkerSettings, load_settings
from streamer.models import load_model
from streamer.pipeline import PipelineSpec

from ._batch import Route
from .worker import Worker

__all__ = ["stage_route", "stage_settings", "stage_worker"]


def stage_settings(spec: PipelineSpec, stage: str, settings: KafkaSettings, **overrides: Any) -> WorkerSettings:
    """The worker settings of ``stage``: its topics and group from the spec, connection from ``settings``."""
    st = spec.stage(stage)
    connection = settings.model_dump(include=set(KafkaSettings.model_fields))
    values: dict[str, Any] = {
        **connection,
        "request_topic": spec.input_topic(st.name),
        "dead_letter_topic": spec.dead_letter_topic(st.name),
        "group_id": spec.group_id(st.name),
        "model": st.callable,
        "device": st.device,
        "max_batch_size": st.max_batch_size,
        "max_wait_ms": st.max_wait_ms,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return load_settings(WorkerSettings, **values)


def stage_route(spec: PipelineSpec, stage: str) -> Route:
    """What a worker of ``stage`` serves: where its input comes from, where its output goes."""
    names = [s.name for s in spec.order]
    i = names.index(spec.stage(stage).name)
    nxt = names[i + 1] if i + 1 < len(names) else None
    return Route(model=spec.name, stage=names[i], first=i == 0, next_topic=spec.next_topic(names[i]), next_stage=nxt)


def stage_worker(spec: PipelineSpec, stage: str, settings: KafkaSettings, **overrides: Any) -> Worker:
    st = spec.stage(stage)
    ws = stage_settings(spec, stage, settings, **overrides)
    model = load_model(st.callable, ws.device, **st.options)
    source = kafka.TopicSource(f"the input topic of stage {st.name!r} in pipeline {spec.name!r}",
                               f"streamer pipeline create {spec.name}")
    return Worker(ws, model=model, route=stage_route(spec, st.name), source=source)
