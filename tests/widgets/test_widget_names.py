"""Issue 11, drift and copied constants: the widgets name modules that exist and use the shared names."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import napari_mae

WIDGETS = sorted((Path(napari_mae.__file__).parent / "widgets").glob("*.py"))
DOTTED = re.compile(r"napari_mae(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("path", WIDGETS, ids=lambda p: p.name)
def test_names_in_widget_modules_exist(path):
    text = path.read_text(encoding="utf-8")
    missing = sorted({m.rstrip(".") for m in DOTTED.findall(text) if not _resolves(m.rstrip("."))})
    assert not missing, missing


@pytest.mark.parametrize("path", WIDGETS, ids=lambda p: p.name)
def test_no_copied_constants(path):
    """Checkpoint file names and preset names come from ``napari_mae._names``."""
    from napari_mae._names import BEST, LAST, PRESET_NAMES

    copied = {LAST, BEST, *(p for names in PRESET_NAMES.values() for p in names)}
    literals = [
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value in copied
    ]
    assert not literals, literals
