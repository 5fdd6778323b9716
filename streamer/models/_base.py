"""The model contract: validate each item, prepare a batch, run it on the device, split per item."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["Model", "default_device"]


def default_device(device: str | None = None) -> torch.device:
    """``device`` when given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Model(ABC):
    """A servable model. Workers call ``validate`` per item, then ``run`` per batch on one thread.

    ``validate`` raises :class:`streamer.errors.BadInput` for an item the model cannot take; only
    that item fails. ``prepare`` builds the batch (CPU work), ``forward`` runs it on ``device``,
    ``split`` returns one output per item, in order, as numpy arrays or plain msgpack values.
    """

    name: str = "model"
    version: str = "0"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def validate(self, inputs: Any) -> Any:
        """Check and normalise one item's inputs; returns what ``prepare`` receives."""
        return inputs

    @abstractmethod
    def prepare(self, items: list[Any]) -> Any: ...

    @abstractmethod
    def forward(self, batch: Any) -> Any: ...

    @abstractmethod
    def split(self, output: Any, n: int) -> list[Any]: ...

    def run(self, items: list[Any]) -> list[Any]:
        """prepare -> forward -> split under ``torch.inference_mode``; checks the output count."""
        with torch.inference_mode():
            outputs = self.split(self.forward(self.prepare(items)), len(items))
        if len(outputs) != len(items):
            raise RuntimeError(f"{self.name} returned {len(outputs)} outputs for {len(items)} inputs")
        return outputs

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        """Deterministic valid inputs, for the demo, benchmarks and warm-up."""
        raise NotImplementedError
