"""``tiny-mlp``: a small MLP with deterministic seeded weights, stored as safetensors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import BadInput
from ..paths import cache_dir
from ._base import Model

__all__ = ["TinyMLP", "tiny_mlp_weights"]

IN_FEATURES = 16
HIDDEN = 64
OUT_FEATURES = 8
SEED = 20261126


def _generate() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    return {
        "fc1.weight": torch.randn(HIDDEN, IN_FEATURES, generator=gen) / IN_FEATURES**0.5,
        "fc1.bias": torch.randn(HIDDEN, generator=gen) * 0.1,
        "fc2.weight": torch.randn(OUT_FEATURES, HIDDEN, generator=gen) / HIDDEN**0.5,
        "fc2.bias": torch.randn(OUT_FEATURES, generator=gen) * 0.1,
    }


def tiny_mlp_weights(root: Path | None = None) -> Path:
    """The weights file, written once (atomically) from the fixed seed."""
    path = (root or cache_dir() / "models") / f"tiny-mlp-{SEED}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(_generate(), tmp)
        os.replace(tmp, path)
    return path


class TinyMLP(Model):
    """16 float32 inputs -> Linear(64) -> ReLU -> Linear(8)."""

    name = "tiny-mlp"

    def __init__(self, device: torch.device, weights: Path | None = None) -> None:
        super().__init__(device)
        path = weights or tiny_mlp_weights()
        self.version = "1+" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT_FEATURES)
        )
        state = load_file(str(path))
        self.net.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in state.items()})
        self.net.to(device).eval()

    def validate(self, inputs: Any) -> np.ndarray[Any, Any]:
        if isinstance(inputs, np.ndarray):
            if inputs.dtype != np.float32:
                raise BadInput(f"tiny-mlp takes float32 tensors, got {inputs.dtype}")
            arr = inputs
        elif isinstance(inputs, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in inputs
        ):
            with np.errstate(over="ignore"):  # out of float32's range: inf, refused below
                arr = np.asarray(inputs, dtype=np.float32)
        else:
            raise BadInput("tiny-mlp takes a float32 tensor or a list of 16 numbers")
        if arr.shape != (IN_FEATURES,):
            raise BadInput(f"tiny-mlp takes shape [{IN_FEATURES}], got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise BadInput("tiny-mlp inputs must be finite (no NaN or Inf)")
        return arr

    def prepare(self, items: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items)).to(self.device, non_blocking=True)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(batch)
        return out

    def split(self, output: torch.Tensor, n: int) -> list[Any]:
        return list(output.float().cpu().numpy())

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        return list(rng.standard_normal((n, IN_FEATURES), dtype=np.float32))
