"""Evaluation results on disk: one JSON writer for every evaluation, the command line and the callbacks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["jsonable", "save_results"]


def jsonable(v: Any) -> Any:
    """``v`` with tensors and arrays as lists, mapping keys as ``str`` and NaN / inf as ``None`` (JSON null)."""
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy
        return jsonable(v.tolist())
    return v


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` (made :func:`jsonable`) as indented JSON, atomically, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(results), indent=1, default=str))
    tmp.replace(path)
    return path
