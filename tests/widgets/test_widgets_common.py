"""What every widget shares: manifest, lazy torch, empty viewer, layer pickers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from widget_helpers import errors

WIDGETS = ["Masking", "Reconstruction", "Segmentation", "Training"]


def test_widgets_import_without_torch():
    code = (
        "import sys, napari_mae.widgets as w; "
        "assert all(m not in sys.modules for m in ('torch', 'monai', 'matplotlib')), "
        "[m for m in ('torch', 'monai', 'matplotlib') if m in sys.modules]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", WIDGETS)
def test_empty_viewer_is_notified(viewer, add_widget, notifications, name):
    widget = add_widget(name)
    assert any(w is widget for w in viewer.window.dock_widgets.values())
    widget.run()
    assert errors(notifications), notifications
    assert widget.run_button.isEnabled() and not widget.busy


def test_layer_pickers_follow_the_viewer(viewer, add_widget):
    widget = add_widget("Segmentation")
    assert widget.image.value() is None
    layer = viewer.add_image(np.zeros((32, 32)), name="first")
    assert widget.image.currentText() == "first"
    layer.name = "renamed"
    assert widget.image.currentText() == "renamed"
    viewer.add_labels(np.zeros((32, 32), np.uint8), name="strokes")
    assert widget.scribbles.findText("strokes") >= 0
    assert widget.scribbles.currentText().startswith("none")  # never picked silently
    viewer.layers.remove("renamed")
    assert widget.image.value() is None


def test_gpu_memory_released(monkeypatch):
    """``release_gpu_memory`` empties the CUDA cache when torch has CUDA (run after training/reconstruction)."""
    import types

    from napari_mae.widgets._reconstruction import release_gpu_memory

    calls = []
    cuda = types.SimpleNamespace(is_available=lambda: True, empty_cache=lambda: calls.append("empty"))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    release_gpu_memory()
    assert calls == ["empty"]
    monkeypatch.delitem(sys.modules, "torch")
    release_gpu_memory()  # no torch imported: nothing to do


def test_masking_follows_the_first_image(viewer, add_widget):
    """Adding a 3D image to an empty viewer shows its Z patch size and physical units."""
    widget = add_widget("Masking")
    assert widget.patch_size.ndim == 2
    viewer.add_image(np.zeros((10, 64, 64)), scale=(2.0, 0.5, 0.5), units="um")
    assert widget.patch_size.ndim == 3
    assert widget.patch_size.value() == (4, 8, 8)  # the bundled default-3d's patches
    assert widget.patch_size.physical.text() == "= 8 x 4 x 4 µm"


@pytest.mark.parametrize("name", ["Masking", "Reconstruction", "Segmentation"])
def test_image_widgets_prepare_with_their_choices(viewer, add_widget, name):
    """One reader of the form: the widget's channel and 4D choices reach the prepared frames."""
    widget = add_widget(name)
    viewer.add_image(np.zeros((3, 16, 32, 32), np.float32), name="movie")
    widget.image.set_value(viewer.layers["movie"])
    widget.channel.setCurrentText("none")
    widget.time_mode.setCurrentText("all time points")
    assert len(widget.prepared_image().frames) == 3  # a run takes every time point
    assert len(widget.prepared_image(for_run=False).frames) == 1  # a form update, one frame
    assert widget.prepared_image().spatial_dims == 3
