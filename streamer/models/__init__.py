"""Model loading: built-ins by name, or a user's ``package.module:factory``.

Importing this package does not import torch (seconds): the names here that need it (``Model``, ``TinyMLP``,
...) load on first use, and so does each built-in when it is built. A command can check a model's name, or a
pipeline's callables, before it pays for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFound

if TYPE_CHECKING:
    import torch

    from ._base import Model, default_device
    from ._tiny_mlp import TinyMLP, tiny_mlp_weights

__all__ = ["BUILTINS", "Model", "TinyMLP", "default_device", "find_factory", "load_model", "tiny_mlp_weights"]

_LAZY = {"Model": "._base", "default_device": "._base", "TinyMLP": "._tiny_mlp", "tiny_mlp_weights": "._tiny_mlp"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tiny_mlp(device: torch.device, **options: Any) -> Model:
    from ._tiny_mlp import TinyMLP

    return TinyMLP(device, **options)


def _minilm(device: torch.device, **options: Any) -> Model:
    from ._minilm import MiniLM

    return MiniLM(device, **options)


def _minilm_tokenize(device: torch.device, **options: Any) -> Model:
    from ._minilm_stages import MiniLMTokenize

    return MiniLMTokenize(device, **options)


def _minilm_encode(device: torch.device, **options: Any) -> Model:
    from ._minilm_stages import MiniLMEncode

    return MiniLMEncode(device, **options)


def _minilm_layers(device: torch.device, **options: Any) -> Model:
    from ._minilm_stages import MiniLMLayers

    return MiniLMLayers(device, **options)


BUILTINS: dict[str, Callable[..., Model]] = {
    "tiny-mlp": _tiny_mlp,
    "minilm": _minilm,
    # Pipeline stages (see streamer/pipelines/*.toml).
    "minilm-tokenize": _minilm_tokenize,
    "minilm-encode": _minilm_encode,
    "minilm-layers": _minilm_layers,
}


def load_model(spec: str, device: str | None = None, **options: Any) -> Model:
    """Load ``spec``: a built-in name, or ``package.module:factory`` where ``factory(device, **options)``
    returns a Model."""
    from ._base import Model, default_device

    factory = find_factory(spec)
    model = factory(default_device(device), **options)
    if not isinstance(model, Model):
        raise ModelNotFound(f"{spec} returned {type(model).__name__}, not a streamer.models.Model")
    if not model.name or model.name == "model":
        model.name = spec
    return model


def find_factory(spec: str) -> Callable[..., Model]:
    """The factory for ``spec``, imported but not called; :class:`ModelNotFound` if there is none."""
    if spec in BUILTINS:
        return BUILTINS[spec]
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
    return factory  # type: ignore[no-any-return]
