"""Pipeline specs: a model cut into stages chained by intermediate topics.

A spec is a TOML file::

    name = "minilm-2stage"            # clients send model="minilm-2stage"
    request_topic = "..."             # optional; default "<name>.requests"

    [[stages]]
    name = "tokenize"
    callable = "minilm-tokenize"      # a built-in stage, or package.module:factory
    device = "cpu"                    # optional; default cuda if present, else cpu
    max_batch_size = 64               # optional batch policy
    max_wait_ms = 5
    parallelism = 2                   # a hint: how many worker processes to run
    options = { }                     # keyword arguments for the callable's factory
    # next = "encode"                 # optional; default: the following stage in the file

    [[stages]]
    name = "encode"
    callable = "minilm-encode"

Stage ``i`` reads ``input_topic`` (the request topic for the first stage, else
``<name>.<stage>.in``), joins consumer group ``<name>.<stage>`` and rejects bad messages
to ``<name>.<stage>.dlq``; any of these can be given explicitly.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import KafkaSettings, WorkerSettings, load_settings
from .errors import ConfigError, ModelNotFound

if TYPE_CHECKING:
    from .kafka import TopicSource

__all__ = ["BUILTIN_PIPELINES", "PipelineSpec", "StageSpec", "load_pipeline"]

_TOPIC = Field(default=None, min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
_NAME = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = _NAME
    callable: str = Field(min_length=1)
    device: str | None = None
    max_batch_size: int = Field(default=32, ge=1, le=65536)
    max_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    parallelism: int = Field(default=1, ge=1, le=1024)
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    next: str | None = None
    input_topic: str | None = _TOPIC
    dead_letter_topic: str | None = _TOPIC
    group_id: str | None = None


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = _NAME
    request_topic: str | None = _TOPIC
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate stage names: {', '.join(dupes)}")
        by_name = {s.name: s for s in self.stages}
        for s in self.stages:
            if s.next is not None and s.next not in by_name:
                raise ValueError(f"stage {s.name!r}: next names an unknown stage {s.next!r}")
        order = self._chain(by_name)
        unreached = [n for n in names if n not in order]
        if unreached:
            raise ValueError(f"stages not reachable from the first stage {names[0]!r}: {', '.join(unreached)}")
        topics: dict[str, str] = {}
        for role, topic in [*((f"stage {s.name!r} input", self.input_topic(s.name)) for s in self.stages),
                            *((f"stage {s.name!r} dead letters", self.dead_letter_topic(s.name))
                              for s in self.stages)]:
            if topic in topics:
                raise ValueError(f"topic clash: {topic!r} is both the {topics[topic]} and the {role}")
            topics[topic] = role
        return self

    def _chain(self, by_name: dict[str, StageSpec]) -> list[str]:
        """Stage names in order: each stage's ``next``, else the following stage in the file."""
        order: list[str] = []
        current: StageSpec | None = self.stages[0]
        while current is not None:
            if current.name in order:
                raise ValueError(f"cycle: {' -> '.join([*order, current.name])}")
            order.append(current.name)
            if current.next is not None:
                current = by_name[current.next]
            else:
                i = self.stages.index(current)
                current = self.stages[i + 1] if i + 1 < len(self.stages) else None
        return order

    @property
    def order(self) -> list[StageSpec]:
        by_name = {s.name: s for s in self.stages}
        return [by_name[n] for n in self._chain(by_name)]

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"pipeline {self.name!r} has no stage {name!r}; stages: "
                          f"{', '.join(s.name for s in self.order)}")

    def input_topic(self, stage: str) -> str:
        spec = self.stage(stage)
        if spec.input_topic:
            return spec.input_topic
        if self.order[0].name == stage:
            return self.request_topic or f"{self.name}.requests"
        return f"{self.name}.{stage}.in"

    def next_topic(self, stage: str) -> str | None:
        """Where ``stage`` sends its outputs; None for the last stage (it publishes results)."""
        names = [s.name for s in self.order]
        i = names.index(self.stage(stage).name)
        return self.input_topic(names[i + 1]) if i + 1 < len(names) else None

    def dead_letter_topic(self, stage: str) -> str:
        return self.stage(stage).dead_letter_topic or f"{self.name}.{stage}.dlq"

    def group_id(self, stage: str) -> str:
        return self.stage(stage).group_id or f"{self.name}.{stage}"

    def input_source(self, stage: str) -> TopicSource:
        """Where the input topic of ``stage`` comes from, for a user told that it does not exist."""
        from .kafka import TopicSource

        return TopicSource(f"the input topic of stage {stage!r} in pipeline {self.name!r}",
                           f"streamer pipeline create {self.name}")

    def worker_settings(self, stage: str, settings: KafkaSettings, **overrides: Any) -> WorkerSettings:
        """The settings of a worker of ``stage``: its topics, group and batch policy from the spec, the connection
        from ``settings``, then ``overrides`` that are not None (command-line flags)."""
        st = self.stage(stage)
        values: dict[str, Any] = {
            **settings.model_dump(include=set(KafkaSettings.model_fields)),
            "request_topic": self.input_topic(st.name),
            "dead_letter_topic": self.dead_letter_topic(st.name),
            "group_id": self.group_id(st.name),
            "model": st.callable,
            "device": st.device,
            "max_batch_size": st.max_batch_size,
            "max_wait_ms": st.max_wait_ms,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return load_settings(WorkerSettings, **values)


BUILTIN_PIPELINES = Path(__file__).parent / "pipelines"


def load_pipeline(path: str | Path, *, check_callables: bool = True) -> PipelineSpec:
    """Read and check a spec: a TOML file, or the name of a built-in (``minilm-2stage``).

    Every problem is a :class:`ConfigError` naming it: bad TOML, an unknown or duplicate stage,
    a cycle, a topic clash, and (with ``check_callables``) a callable that cannot be found.
    """
    builtin = BUILTIN_PIPELINES / f"{path}.toml"
    if not Path(path).exists() and builtin.exists():
        path = builtin
    try:
        data: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline spec {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    if check_callables:
        from .models import find_factory

        for stage in spec.stages:
            try:
                find_factory(stage.callable)
            except ModelNotFound as exc:
                raise ConfigError(f"{path}: stage {stage.name!r}: missing callable: {exc}") from None
    return spec
