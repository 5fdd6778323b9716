"""A complete user model: run it with `streamer worker --model examples.custom_model:build`."""

from typing import Any

import numpy as np
import torch

from streamer.errors import BadInput
from streamer.models import Model


class MeanCenter(Model):
    """Takes a float32 vector of any length; returns it minus its mean, and its norm."""

    name = "mean-center"  # clients send model="mean-center"
    version = "1"

    def validate(self, inputs: Any) -> np.ndarray:
        # Called once per request, on the event loop: reject bad items one by one.
        arr = np.asarray(inputs, dtype=np.float32)
        if arr.ndim != 1 or arr.size == 0:
            raise BadInput(f"expected a non-empty vector, got shape {list(arr.shape)}")
        return arr

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        # CPU work: pad the batch to its longest vector, with a mask of the real values.
        lengths = [len(x) for x in items]
        batch = torch.zeros(len(items), max(lengths))
        mask = torch.zeros(len(items), max(lengths))
        for i, x in enumerate(items):
            batch[i, : len(x)] = torch.from_numpy(x)
            mask[i, : len(x)] = 1
        return batch.to(self.device), mask.to(self.device), lengths

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, list[int]]) -> Any:
        # Device work, on the worker's model thread under torch.inference_mode().
        x, mask, lengths = batch
        mean = (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        centered = (x - mean) * mask
        return centered, centered.norm(dim=1), lengths

    def split(self, output: Any, n: int) -> list[Any]:
        # One msgpack-able output per request, in order: numpy arrays travel as tensors.
        centered, norms, lengths = output
        centered, norms = centered.cpu().numpy(), norms.cpu().numpy()
        return [{"centered": centered[i, : lengths[i]], "norm": float(norms[i])} for i in range(n)]

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(int(rng.integers(2, 9))).astype(np.float32) for _ in range(n)]


def build(device: torch.device) -> Model:
    """The factory streamer calls: `--model examples.custom_model:build`."""
    return MeanCenter(device)
