"""Keyboard shortcuts for the frequent actions, bound on the viewer (as micro-sam does).

:data:`SHORTCUTS` is the one table: the README lists it, the tests check every
entry is bound once a widget is docked. Keys are chosen among those napari
leaves free (its defaults use the plain letters and ``Shift-A/L/P/V``). Each
binding acts on the most recently docked widget of that kind in the viewer
(Stop: on every running job), so several docked widgets never fight over a key.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

#: key -> (widget kind, action name, what it does). Kinds are class names.
SHORTCUTS: dict[str, tuple[str, str, str]] = {
    "Shift-S": ("SegmentationWidget", "run", "Segment the chosen image"),
    "Shift-N": (
        "SegmentationWidget",
        "next_scribble_label",
        "Next scribble label (background 1 / objects 2)",
    ),
    "Shift-M": ("MaskingWidget", "run", "Mask the chosen image"),
    "Shift-R": ("ReconstructionWidget", "run", "Reconstruct the chosen image"),
    "Shift-X": ("*", "stop", "Stop the running job(s)"),
}

# viewer -> docked napari-mae widgets, oldest first (weak: closing either forgets it).
_WIDGETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(viewer, widget) -> None:
    """Bind :data:`SHORTCUTS` on ``viewer`` (once) and let them reach ``widget``."""
    widgets = _WIDGETS.setdefault(viewer, [])
    widgets.append(weakref.ref(widget))
    for key, (kind, action, _doc) in SHORTCUTS.items():
        viewer.bind_key(key, _dispatch(kind, action), overwrite=True)


def _alive(viewer) -> list:
    refs = _WIDGETS.get(viewer, [])
    out = []
    for ref in refs:
        widget = ref()
        if widget is None:
            continue
        try:
            widget.isVisible()  # raises once the Qt object is deleted
        except RuntimeError:
            continue
        out.append(widget)
    return out


def _dispatch(kind: str, action: str) -> Callable:
    def on_key(viewer) -> None:
        widgets = _alive(viewer)
        if kind == "*":
            for widget in widgets:
                getattr(widget, action)()
            return
        matching = [w for w in widgets if type(w).__name__ == kind]
        if matching:
            getattr(matching[-1], action)()

    on_key.__doc__ = f"napari-mae: {kind}.{action}"
    return on_key
