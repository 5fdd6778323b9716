"""The model a worker serves, and its weights reloaded while it serves (SIGHUP, or the file changing)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.config import WorkerSettings
from streamer.errors import ConfigError
from streamer.models import Model, find_factory, load_model

from ._inference import BatchRunner

__all__ = ["Reloader", "load_served_model"]

log = logging.getLogger("streamer.worker")


def load_served_model(settings: WorkerSettings) -> Model:
    """The model a worker serves: ``settings.model`` with its ``weights`` file, if any, named
    ``settings.model_version`` if given."""
    options: dict[str, Any] = {}
    if settings.weights:
        factory = find_factory(settings.model)
        params = inspect.signature(factory).parameters
        if "weights" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"model {settings.model!r} takes no weights file: leave out weights (--weights or "
                              "STREAMER_WEIGHTS)")
        if not Path(settings.weights).is_file():
            raise ConfigError(f"weights file {settings.weights!r} does not exist (--weights or STREAMER_WEIGHTS)")
        options["weights"] = Path(settings.weights)
    model = load_model(settings.model, settings.device, **options)
    if settings.model_version:
        model.version = settings.model_version
    return model


def _loaded_and_tried(settings: WorkerSettings) -> Model:
    """Load the model and run it on its example inputs: reloaded weights that cannot serve are refused here."""
    model = load_served_model(settings)
    with contextlib.suppress(NotImplementedError):
        model.run([model.validate(x) for x in model.example_inputs(2)])
    return model


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class Reloader:
    """Loads the weights file off the event loop and hands the model to the runner, served from its next batch on;
    weights that fail to load or to run their example inputs are refused and the served ones stay."""

    def __init__(self, settings: WorkerSettings, runner: BatchRunner, on_served: Callable[[Model], None]) -> None:
        self.settings = settings
        self.runner = runner
        self.on_served = on_served
        self._asked = asyncio.Event()

    def request(self) -> None:
        """Reload now (SIGHUP)."""
        self._asked.set()

    async def run(self, path: Path) -> None:
        """Reload the weights on :meth:`request` or when the file changes (checked every ``reload_poll_s``)."""
        seen = _file_stamp(path)
        poll = self.settings.reload_poll_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._asked.wait(), poll)
            asked = self._asked.is_set()
            self._asked.clear()
            stamp = _file_stamp(path)
            if asked or stamp != seen:
                seen = stamp
                await self._reload(path, "SIGHUP" if asked else "the file changed")

    async def _reload(self, path: Path, why: str) -> None:
        serving = self.runner.model.version
        settings = self.settings.model_copy(update={"model_version": None})  # the new weights name their version
        try:
            model = await asyncio.get_running_loop().run_in_executor(None, _loaded_and_tried, settings)
        except Exception as exc:  # noqa: BLE001 - whatever a bad file does, the served weights stay
            log.warning("reloading weights from %s (%s) failed; still serving version %s: %s: %s", path, why,
                        serving, type(exc).__name__, exc)
            return
        self.runner.replace(model)
        self.on_served(model)
        log.info("weights reloaded from %s (%s): version %s -> %s from the next batch on", path, why, serving,
                 model.version)
