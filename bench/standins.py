"""Stand-in models for benchmarks (``bench.standins:NAME`` as a worker's model, with ROOT on PYTHONPATH).

- ``embed384``: tiny-mlp's inputs (16 float32) to a 384-d float32 per item, the size of a MiniLM
  embedding: what a framework must carry when outputs are large.
- ``hop16``: tiny-mlp's inputs passed on: the first stage of a two-stage hop (bench_overhead's ``-hop``).
- ``ids384``: token ids in (a 1-D int32 tensor of 10-45 ids, as a client that tokenizes sends them, WIRE.md
  section 5, checked and padded as ``minilm-encode`` does), a 384-d float32 per item out (a mean of embedding
  rows, normalised): the encode stage of ``minilm-2stage`` without the encoder, so what a stage costs per
  item outside the model can be measured on a machine without a GPU.
- ``sleep20`` / ``sleep50``: a fixed 20 / 50 ms per batch (a GPU call that leaves the CPU free), 8 float32
  per item: how busy a framework keeps a model that costs a known time.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from streamer.models import Model, TinyMLP
from streamer.models._minilm import pad_ids, token_ids


class Embed384(TinyMLP):
    name = "embed384"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        gen = torch.Generator().manual_seed(384)
        self.proj = torch.randn(8, 384, generator=gen).to(device)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(super().forward(batch) @ self.proj, dim=1)


class Ids384(Model):
    name = "ids384"
    version = "1"
    vocab = 30522  # all-MiniLM-L6-v2's

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        gen = torch.Generator().manual_seed(384)
        self.table = torch.randn(self.vocab, 384, generator=gen).to(device)

    def validate(self, inputs: Any) -> Any:
        return token_ids(inputs, self.vocab)

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_ids(items, self.device)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        weights = mask.to(self.table.dtype)
        pooled = torch.nn.functional.embedding_bag(ids, self.table, mode="sum", per_sample_weights=weights)
        return torch.nn.functional.normalize(pooled / weights.sum(1, keepdim=True), dim=1)

    def split(self, output: torch.Tensor, n: int) -> list[Any]:
        return list(output.cpu().numpy())

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        return [np.concatenate(([101], rng.integers(1000, 30000, size=int(rng.integers(8, 44))), [102]))
                .astype(np.int32) for _ in range(n)]


class Hop16(TinyMLP):
    """The first stage of a two-stage hop: tiny-mlp's 16 inputs, passed on (16 float32 per item)."""

    name = "hop16"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * 1.0


class Sleep(TinyMLP):
    """tiny-mlp that takes ``ms`` milliseconds per batch, whatever its size, without using the CPU."""

    def __init__(self, device: torch.device, ms: float) -> None:
        super().__init__(device)
        self.ms = ms
        self.name = f"sleep{ms:g}"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.ms / 1000)
        return super().forward(batch)


def embed384(device: torch.device, **_: Any) -> Model:
    return Embed384(device)


def ids384(device: torch.device, **_: Any) -> Model:
    return Ids384(device)


def hop16(device: torch.device, **_: Any) -> Model:
    return Hop16(device)


def sleep20(device: torch.device, **_: Any) -> Model:
    return Sleep(device, 20)


def sleep50(device: torch.device, **_: Any) -> Model:
    return Sleep(device, 50)


def inputs(n: int) -> list[np.ndarray[Any, Any]]:
    return TinyMLP(torch.device("cpu")).example_inputs(n, seed=1)


class Affine(TinyMLP):
    """tiny-mlp that takes ``base_ms + per_item_ms * n`` per batch of ``n`` without using the CPU: a model whose
    cost per batch is known (a GPU's fixed launch cost and its time per item)."""

    def __init__(self, device: torch.device, base_ms: float = 5.0, per_item_ms: float = 0.5) -> None:
        super().__init__(device)
        self.base_ms, self.per_item_ms = base_ms, per_item_ms
        self.name = "affine"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep((self.base_ms + self.per_item_ms * len(batch)) / 1000)
        return super().forward(batch)


def affine(device: torch.device, **options: Any) -> Model:
    """``bench.standins:affine``: 5 ms + 0.5 ms per item (``base_ms``, ``per_item_ms`` options)."""
    return Affine(device, **options)


def affine_per_item(device: torch.device, **_: Any) -> Model:
    """``bench.standins:affine_per_item``: 2 ms + 1 ms per item, a model paid mostly per item (served as
    ``affine``). A worker under load measures a few ms more per batch than the model takes (its model thread
    waits for the GIL and the cores), which makes a 5 ms + 0.5 ms model look paid per batch."""
    return Affine(device, base_ms=2.0, per_item_ms=1.0)
