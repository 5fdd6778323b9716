"""Small stage callables for pipeline tests: cheap, deterministic, and with a poison input."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from streamer.errors import BadInput
from streamer.models import Model

POISON = 13.0


class Double(Model):
    """Stage 1: a float32 vector -> twice it."""

    name = "double"

    def validate(self, inputs: Any) -> np.ndarray[Any, Any]:
        arr = np.asarray(inputs, dtype=np.float32) if isinstance(inputs, list) else inputs
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != (4,):
            raise BadInput("double takes 4 numbers")
        return arr

    def prepare(self, items: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * 2

    def split(self, output: torch.Tensor, n: int) -> list[Any]:
        return list(output.numpy())

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        return [np.full(4, i, dtype=np.float32) for i in range(n)]


class Total(Model):
    """Stage 2: a vector -> its sum; raises on a batch holding the poison value; can be slowed down."""

    name = "total"

    def __init__(self, device: torch.device, delay_ms: float = 0.0) -> None:
        super().__init__(device)
        self.delay_s = delay_ms / 1000

    def validate(self, inputs: Any) -> Any:
        if not isinstance(inputs, np.ndarray):
            raise BadInput("total takes a tensor")
        return inputs

    def prepare(self, items: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        if bool((batch == POISON).any()):
            raise RuntimeError("poison value in the batch")
        return batch.sum(dim=1)

    def split(self, output: torch.Tensor, n: int) -> list[Any]:
        return [float(x) for x in output]

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        return [np.full(4, 2 * i, dtype=np.float32) for i in range(n)]


def double(device: torch.device) -> Model:
    return Double(device)


def total(device: torch.device, delay_ms: float = 0.0) -> Model:
    return Total(device, delay_ms)
