"""Models for fault tests: tiny-mlp slowed down, so a kill lands mid-batch."""

from __future__ import annotations

import time
from typing import Any

import torch

from streamer.models import Model, TinyMLP


class SlowTinyMLP(TinyMLP):
    name = "slow-tiny"

    def __init__(self, device: torch.device, delay_ms: float = 40.0) -> None:
        super().__init__(device)
        self.delay_s = delay_ms / 1000

    def forward(self, batch: torch.Tensor) -> Any:
        time.sleep(self.delay_s)
        return super().forward(batch)


def slow_tiny(device: torch.device) -> Model:
    return SlowTinyMLP(device)
