"""JSON Lines in and out for the CLI: requests from JSON, results to JSON (tensors as nested lists)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from schemas import InferenceResult

__all__ = ["result_to_json", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "iub" or (obj.dtype.kind == "f" and bool(np.isfinite(obj).all())):
            return obj.tolist()  # plain numbers all the way down: no walk needed
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    return obj


def result_to_json(result: InferenceResult) -> str:
    return json.dumps(to_jsonable(result.model_dump(exclude_none=True)), separators=(",", ":"))
