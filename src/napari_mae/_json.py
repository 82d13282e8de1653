"""JSON-safe conversion shared by the CLI and the demo."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON types, for ``json.dumps(..., allow_nan=False)``.

    Dicts keep their structure (keys as ``str``); tuples, lists and arrays become lists;
    numpy scalars become Python numbers; paths become strings; NaN and infinities become
    ``None`` (``null``), which strict JSON parsers such as ``jq`` accept.
    """
    if isinstance(value, Mapping):  # dicts and records such as SegmentationInfo
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
