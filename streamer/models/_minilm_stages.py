"""all-MiniLM-L6-v2 cut into pipeline stages.

- ``minilm-tokenize`` (CPU): a sentence -> its token ids (int32 [L], unpadded); token ids a client sent pass.
- ``minilm-encode``: token ids (a 1-D tensor, or the ``input_ids``/``attention_mask`` pair a client's
  tokenizer returns: see ``_minilm.token_ids``) -> the sentence embedding (encoder, mean pooling, L2 norm).
- ``minilm-layers`` with options ``start``/``end``: encoder layers [start, end). The first
  such stage takes token ids (or, with ``tokenize = true``, sentences) and embeds them; a
  stage that does not end at the last layer outputs, per sentence,
  ``{"hidden": float32 [L, 384], "attention_mask": uint8 [L]}``; the stage that ends at the
  last layer pools and normalises, so its output is the embedding.

Each item's tensors are trimmed to its own length, so a stage pads only to its own batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInput
from ._base import Model
from ._minilm import MAX_SEQ_LEN, MiniLM, attend, check_text, load_tokenizer, pad_ids, token_ids, token_rows

__all__ = ["MiniLMEncode", "MiniLMLayers", "MiniLMTokenize"]


class MiniLMTokenize(Model):
    """A sentence -> int32 token ids. CPU only; loads no weights. Token ids a client sent (it tokenized) pass
    through as they are, checked, so a pipeline takes both."""

    name = "minilm-tokenize"
    version = "all-MiniLM-L6-v2"

    def __init__(self, device: torch.device) -> None:
        super().__init__(torch.device("cpu"))
        self.tokenizer = load_tokenizer()
        self.tokenizer.no_padding()
        self.vocab_size = int(self.tokenizer.get_vocab_size())

    def validate(self, inputs: Any) -> Any:
        return check_text(inputs) if isinstance(inputs, str) else token_ids(inputs, self.vocab_size)

    def prepare(self, items: list[Any]) -> Any:
        return token_rows(self.tokenizer, items, np.int32)

    def forward(self, batch: Any) -> Any:
        return batch

    def split(self, output: Any, n: int) -> list[Any]:
        return list(output)

    example_inputs = MiniLM.example_inputs


class MiniLMEncode(MiniLM):
    """Token ids -> the 384-d unit embedding: the encoder half of ``minilm``."""

    name = "minilm-encode"

    def validate(self, inputs: Any) -> np.ndarray[Any, Any]:
        return token_ids(inputs, self.vocab_size)

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_ids(items, self.device)

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(super().example_inputs(n, seed))]


class MiniLMLayers(MiniLM):
    """Encoder layers [start, end): the model-parallel split of ``minilm``."""

    name = "minilm-layers"

    def __init__(
        self, device: torch.device, start: int = 0, end: int | None = None, tokenize: bool = False,
        dtype: str | torch.dtype = torch.float32,
    ) -> None:
        super().__init__(device, dtype)
        if tokenize and start != 0:
            raise ValueError("minilm-layers: only a stage that starts at layer 0 can tokenize")
        self.tokenize = tokenize
        layers = len(self.encoder.encoder.layer)
        self.start, self.end = start, layers if end is None else end
        if not 0 <= self.start < self.end <= layers:
            raise ValueError(f"minilm-layers needs 0 <= start < end <= {layers}, got [{start}, {end})")
        self.pool = self.end == layers
        self.name = f"minilm-layers-{self.start}-{self.end}"

    def validate(self, inputs: Any) -> Any:
        if self.tokenize:
            return MiniLM.validate(self, inputs)
        if self.start == 0:
            return token_ids(inputs, self.vocab_size)
        if not isinstance(inputs, dict) or set(inputs) != {"hidden", "attention_mask"}:
            raise BadInput("expected {'hidden': float32 [L, 384], 'attention_mask': [L]}")
        hidden, mask = inputs["hidden"], inputs["attention_mask"]
        width = self.encoder.config.hidden_size
        if (not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32 or hidden.ndim != 2
                or hidden.shape[1] != width or not 1 <= hidden.shape[0] <= MAX_SEQ_LEN):
            raise BadInput(f"hidden must be float32 [L, {width}] with 1 <= L <= {MAX_SEQ_LEN}")
        if not isinstance(mask, np.ndarray) or mask.shape != hidden.shape[:1] or not mask.all():
            raise BadInput("attention_mask must be [L] of ones (each item is trimmed to its length)")
        if not np.isfinite(hidden).all():
            raise BadInput("hidden states must be finite")
        return hidden

    def prepare(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenize:
            return MiniLM.prepare(self, items)
        return pad_ids(items, self.device)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x, mask = batch
        bert = self.encoder
        if self.start == 0:
            hidden = bert.embeddings(input_ids=x, token_type_ids=torch.zeros_like(x))
        else:
            hidden = x.to(self.dtype)
        mask4 = attend(mask)
        for layer in bert.encoder.layer[self.start:self.end]:
            hidden = layer(hidden, mask4)
        if not self.pool:
            return hidden, mask
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), p=2, dim=1)

    def split(self, output: Any, n: int) -> list[Any]:
        if self.pool:
            return super().split(output, n)
        hidden, mask = output
        lengths = mask.sum(1).tolist()
        h = hidden.float().cpu().numpy()
        return [{"hidden": h[i, : lengths[i]], "attention_mask": np.ones(lengths[i], dtype=np.uint8)}
                for i in range(n)]

    def example_inputs(self, n: int, seed: int = 0) -> list[Any]:
        sentences = super().example_inputs(n, seed)
        if self.tokenize:
            return sentences
        ids = [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(sentences)]
        if self.start == 0:
            return ids
        head = MiniLMLayers.__new__(MiniLMLayers)
        head.__dict__.update(self.__dict__)
        head.start, head.end, head.pool, head.tokenize = 0, self.start, False, False
        return head.run([head.validate(x) for x in ids])
