"""Models for fault tests: tiny-mlp slowed down (so a kill lands mid-batch), or poisoned."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from streamer.models import Model, TinyMLP

POISON = 13.0


class SlowTinyMLP(TinyMLP):
    """tiny-mlp that sleeps ``FAULT_DELAY_MS`` (default 40) per batch; its first ``FAULT_PROMPT_BATCHES``
    (default 0) sleep 20 ms, so a test of long batches spares the worker's two warm-up runs. 20 ms, not 0: a
    model measured under a millisecond runs on the event loop, where a long batch would stop the heartbeats."""

    name = "slow-tiny"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.delay_s = float(os.environ.get("FAULT_DELAY_MS", "40")) / 1000
        self.prompt = int(os.environ.get("FAULT_PROMPT_BATCHES", "0"))

    def forward(self, batch: torch.Tensor) -> Any:
        if self.prompt > 0:
            self.prompt -= 1
            time.sleep(0.02)
        else:
            time.sleep(self.delay_s)
        return super().forward(batch)


class PoisonTinyMLP(TinyMLP):
    """tiny-mlp that raises on any batch holding the value 13.0."""

    name = "poison-tiny"

    def forward(self, batch: torch.Tensor) -> Any:
        if bool((batch == POISON).any()):
            raise RuntimeError("poison item in the batch")
        return super().forward(batch)


def slow_tiny(device: torch.device) -> Model:
    return SlowTinyMLP(device)


def poison_tiny(device: torch.device) -> Model:
    return PoisonTinyMLP(device)
