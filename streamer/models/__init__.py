"""Model loading: built-ins by name, or a user's ``package.module:factory``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..errors import ModelNotFound
from ._base import Model, default_device
from ._tiny_mlp import TinyMLP, tiny_mlp_weights

__all__ = ["BUILTINS", "Model", "TinyMLP", "default_device", "load_model", "tiny_mlp_weights"]


def _minilm(device: torch.device) -> Model:
    from ._minilm import MiniLM

    return MiniLM(device)


BUILTINS: dict[str, Callable[[torch.device], Model]] = {
    "tiny-mlp": TinyMLP,
    "minilm": _minilm,
}


def load_model(spec: str, device: str | None = None) -> Model:
    """Load ``spec``: a built-in name, or ``package.module:factory`` where ``factory(device)`` returns a Model."""
    dev = default_device(device)
    if spec in BUILTINS:
        return BUILTINS[spec](dev)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelNotFound(
            f"unknown model {spec!r}: use a built-in ({', '.join(sorted(BUILTINS))}) "
            "or 'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFound(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelNotFound(f"{module_name!r} has no callable {attr!r}")
    model = factory(dev)
    if not isinstance(model, Model):
        raise ModelNotFound(f"{spec} returned {type(model).__name__}, not a streamer.models.Model")
    if not model.name or model.name == "model":
        model.name = spec
    return model
