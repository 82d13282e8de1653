"""Issue 12.10-11: every control has a tooltip; every documented shortcut is bound and acts."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractSlider,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QScrollBar,
)
from widget_helpers import small_nuclei_2d, wait_done

from napari_mae.widgets._shortcuts import SHORTCUTS

WIDGETS = ["Masking", "Reconstruction", "Segmentation", "Training"]
CONTROLS = (QAbstractButton, QAbstractSlider, QAbstractSpinBox, QComboBox, QLineEdit)


def _tooltip(control, top) -> str:
    """The control's tooltip, or that of the field it is part of (a slider's read-out box)."""
    widget = control
    while widget is not None and widget is not top:
        if widget.toolTip():
            return widget.toolTip()
        widget = widget.parentWidget()
    return ""


@pytest.mark.parametrize("name", WIDGETS)
def test_every_control_has_a_tooltip(viewer, add_widget, name):
    viewer.add_image(np.zeros((16, 32, 32), np.float32), scale=(2, 1, 1))
    widget = add_widget(name)
    controls = [
        c
        for c in widget.findChildren(CONTROLS)
        if not isinstance(c, QScrollBar) and not isinstance(c.parentWidget(), QComboBox)
    ]
    assert len(controls) >= 8
    missing = [
        f"{type(c).__name__} {getattr(c, 'text', lambda: '')() or c.objectName()!r}"
        for c in controls
        if not _tooltip(c, widget)
    ]
    assert not missing, missing


def test_every_shortcut_is_bound_and_documented(viewer, add_widget):
    from pathlib import Path

    from napari.utils.key_bindings import KeyBinding

    for name in WIDGETS:
        add_widget(name)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key, (_kind, _action, doc) in SHORTCUTS.items():
        assert KeyBinding.from_str(key) in viewer.keymap, key
        assert f"`{key}`" in readme and doc in readme, key


def test_shortcuts_act(viewer, add_widget, qtbot, notifications):
    from napari.utils.key_bindings import KeyBinding

    def press(key):
        viewer.keymap[KeyBinding.from_str(key)](viewer)

    image, kwargs = small_nuclei_2d(96)
    viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    scribbles = widget.add_scribbles_layer()
    assert scribbles.selected_label == 2
    press("Shift-N")
    assert scribbles.selected_label == 1
    press("Shift-N")
    assert scribbles.selected_label == 2
    widget.scribbles.setCurrentIndex(0)  # automatic
    press("Shift-S")
    assert widget.busy
    press("Shift-X")
    assert not widget.busy and widget.job.cancelled
    qtbot.waitUntil(lambda: not widget.job.thread_running, timeout=20_000)
    masking = add_widget("Masking")
    press("Shift-M")
    wait_done(qtbot, masking)
    assert "nuclei 2D mask" in viewer.layers
