"""A model for load-balancing benchmarks: tiny-mlp that sleeps THROTTLE_ITEM_MS per item.

Sleeping, not spinning, so that several such workers on a small machine run at exactly their
set speeds: 1000 / THROTTLE_ITEM_MS items/s each, whatever the batch size.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from streamer.models import Model, TinyMLP


class ThrottledTinyMLP(TinyMLP):
    name = "throttled-tiny"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.item_s = float(os.environ.get("THROTTLE_ITEM_MS", "2")) / 1000

    def forward(self, batch: torch.Tensor) -> Any:
        time.sleep(self.item_s * batch.shape[0])
        return super().forward(batch)


def throttled(device: torch.device) -> Model:
    return ThrottledTinyMLP(device)
