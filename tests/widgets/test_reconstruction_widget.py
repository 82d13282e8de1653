"""Reconstruction widget in a real viewer, with tiny untrained models (fast on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from widget_helpers import errors, small_nuclei_2d, wait_done

from napari_mae.widgets._model_picker import CHECKPOINT_TEXT
from napari_mae.widgets._reconstruction import viewer_grid
from napari_mae.widgets._registry import registry


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Checkpoints of untrained tiny-2d and tiny-3d models."""
    import torch

    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models.mae import build_model

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {}
    for preset in ("tiny-2d", "tiny-3d"):
        paths[preset] = folder / f"{preset}.pt"
        save_checkpoint(paths[preset], build_model(preset))
    return paths


def _use_checkpoint(widget, path):
    widget.model.combo.setCurrentText(CHECKPOINT_TEXT)
    widget.model.path.setText(str(path))
    widget.device.setCurrentText("cpu")


def test_reconstruction_after_masking_2d(viewer, add_widget, qtbot, notifications, tiny_checkpoints):
    image, kwargs = small_nuclei_2d(128)
    layer = viewer.add_image(image, **kwargs)
    masking = add_widget("Masking")
    masking.patch_size.set_value((16, 16))  # not the model's 8 x 8: resampled
    masking.run()
    wait_done(qtbot, masking)
    widget = add_widget("Reconstruction")
    widget.image.set_value(layer)
    assert widget.mask.currentText() == f"{layer.name} mask"  # the Masking widget's mask is offered
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    recon = viewer.layers[f"{layer.name} reconstruction"]
    error = viewer.layers[f"{layer.name} error"]
    assert recon.data.shape == error.data.shape == image.shape
    np.testing.assert_allclose(recon.scale, layer.scale)
    # Visible pixels are kept; the error is zero there and positive somewhere.
    visible = viewer.layers[f"{layer.name} mask"].data == 0
    np.testing.assert_allclose(recon.data[visible], image[visible], atol=1e-3)
    assert error.data[visible].max() == 0 and error.data.max() > 0
    assert widget.progress_bar.format().startswith("done")


def test_reconstruction_3d_anisotropic_new_mask(viewer, add_widget, qtbot, notifications, tiny_checkpoints):
    viewer.open_sample("napari-mae", "nuclei_3d")
    layer = viewer.layers["nuclei 3D"]
    layer.data = layer.data[:32, :64, :64]
    widget = add_widget("Reconstruction")
    widget.image.set_value(layer)
    _use_checkpoint(widget, tiny_checkpoints["tiny-3d"])
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    recon = viewer.layers["nuclei 3D reconstruction"]
    assert recon.data.shape == (32, 64, 64)
    np.testing.assert_allclose(recon.scale, layer.scale)


def test_reconstruction_rgb_with_registry_model(viewer, add_widget, qtbot, notifications):
    from napari_mae.models.mae import build_model

    rgb = (np.random.default_rng(0).random((64, 72, 3)) * 255).astype(np.uint8)
    layer = viewer.add_image(rgb, rgb=True, name="rgb")
    widget = add_widget("Reconstruction")
    name = registry.add_model("trained: tiny", build_model("tiny-2d"))
    assert widget.model.combo.currentText() == name  # a newly trained model is offered and chosen
    widget.image.set_value(layer)
    widget.device.setCurrentText("cpu")
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    recon = viewer.layers["rgb reconstruction"]
    assert recon.rgb and recon.data.shape == rgb.shape
    assert viewer.layers["rgb error"].data.shape == rgb.shape[:2]


def test_reconstruction_errors_are_notified(
    viewer, add_widget, qtbot, notifications, tiny_checkpoints, tmp_path
):
    image, _ = small_nuclei_2d(64)
    viewer.add_image(image, name="img")
    widget = add_widget("Reconstruction")
    widget.device.setCurrentText("cpu")
    # A missing checkpoint: the error reaches the user, the widget is usable again.
    _use_checkpoint(widget, tmp_path / "missing.pt")
    widget.run()
    wait_done(qtbot, widget)
    assert "missing.pt" in errors(notifications)[-1]
    assert widget.run_button.isEnabled()
    # A 3D model on a 2D image: the core's message is shown.
    _use_checkpoint(widget, tiny_checkpoints["tiny-3d"])
    widget.run()
    wait_done(qtbot, widget)
    assert len(errors(notifications)) == 2
    assert widget.run_button.isEnabled() and not widget.busy


def test_reconstruction_channels_and_time(viewer, add_widget, qtbot, notifications, tiny_checkpoints):
    """Channels-first data keeps its layout; all time points of a 4D stack are reconstructed."""
    image, _ = small_nuclei_2d(64)
    two = viewer.add_image(np.stack([image, image[::-1]]), name="two channels", scale=(1, 0.5, 0.5))
    movie = viewer.add_image(np.stack([np.stack([image] * 8)] * 2), name="movie", scale=(5, 2, 1, 1))
    widget = add_widget("Reconstruction")
    widget.image.set_value(two)
    widget.channel.setCurrentText("0")
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    out = viewer.layers["two channels reconstruction"]
    assert out.data.shape == (2, 64, 64)
    np.testing.assert_allclose(out.scale, (1, 0.5, 0.5))
    widget.image.set_value(movie)
    widget.channel.setCurrentText("none")
    widget.time_mode.setCurrentText("all time points")
    _use_checkpoint(widget, tiny_checkpoints["tiny-3d"])
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    out = viewer.layers["movie reconstruction"]
    assert out.data.shape == (2, 8, 64, 64)
    np.testing.assert_allclose(out.scale, (5, 2, 1, 1))
    assert viewer.layers["movie error"].data.shape == (2, 8, 64, 64)


def test_reconstruction_awkward_inputs(viewer, add_widget, qtbot, notifications, tiny_checkpoints):
    """NaN, singleton-axis, dask and multiscale images in one viewer."""
    import dask.array as da

    image, _ = small_nuclei_2d(64)
    with_nan = image.astype(np.float32)
    with_nan[:4, :4] = np.nan
    inputs = {
        "nan": (with_nan, {}),
        "singleton": (image[None], {"scale": (3, 2, 2)}),
        "dask": (da.from_array(image, chunks=32), {}),
        "pyramid": ([image, image[::2, ::2]], {"multiscale": True}),
    }
    widget = add_widget("Reconstruction")
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    for name, (data, kwargs) in inputs.items():
        viewer.add_image(data, name=name, **kwargs)
        widget.image.set_value(name)
        widget.run()
        wait_done(qtbot, widget)
        assert not errors(notifications), (name, notifications)
        assert viewer.layers[f"{name} reconstruction"].data.shape == (64, 64), name
    assert np.isnan(viewer.layers["nan error"].data[:4, :4]).all()  # unknown where the input is
    np.testing.assert_allclose(viewer.layers["singleton reconstruction"].scale, (2, 2))


def test_reconstruction_defaults_to_the_original_after_masking(
    viewer, add_widget, qtbot, notifications, tiny_checkpoints
):
    """Issue 12.2: after Masking, the original image with its mask is offered (not '<name> masked'
    with a new random mask), the mask made later is followed, and choosing the masked output warns."""
    image, kwargs = small_nuclei_2d(64)
    layer = viewer.add_image(image, **kwargs)
    widget_first = add_widget("Reconstruction")  # opened before masking: follows the new mask
    masking = add_widget("Masking")
    masking.run()
    wait_done(qtbot, masking)
    assert widget_first.image.currentText() == layer.name
    assert widget_first.mask.currentText() == f"{layer.name} mask"
    viewer.window.remove_dock_widget("all")
    widget = add_widget("Reconstruction")  # opened after masking
    assert widget.image.currentText() == layer.name
    assert widget.mask.currentText() == f"{layer.name} mask"
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    widget.image.set_value(f"{layer.name} masked")
    assert widget.mask.currentText() == f"{layer.name} mask"
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    assert any(level == "warning" and "Masking widget's output" in text for level, text in notifications)


def test_masking_patch_size_follows_the_model(viewer, add_widget, tiny_checkpoints):
    """Issue 12.13: the Masking widget's patch size is the chosen model's (bundled: 8 x 8 / 4 x 8 x 8),
    so the Reconstruction widget does not resample it; a size the user set is kept."""
    image, _ = small_nuclei_2d(128)
    viewer.add_image(image, name="img")
    masking = add_widget("Masking")
    assert masking.patch_size.value() == (8, 8)
    recon = add_widget("Reconstruction")
    registry.add_model("trained: 16 px", str(tiny_checkpoints["tiny-2d"]), patch_size=(16, 16))
    assert recon.model.combo.currentText() == "trained: 16 px"
    assert masking.patch_size.value() == (16, 16)
    recon.model.combo.setCurrentText("default-2d")
    assert masking.patch_size.value() == (8, 8)
    masking.patch_size.set_value((4, 4))  # the user's choice wins from now on
    recon.model.combo.setCurrentText("trained: 16 px")
    assert masking.patch_size.value() == (4, 4)
    viewer.add_image(np.zeros((10, 64, 64), np.float32), name="volume")
    masking.image.set_value("volume")
    assert masking.patch_size.ndim == 3


def test_bundled_patch_sizes_match_the_checkpoints():
    from napari_mae._names import bundled_weights_path
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.widgets._registry import BUNDLED_PATCH_SIZES

    for name, patch_size in BUNDLED_PATCH_SIZES.items():
        path = bundled_weights_path(name)
        if path.is_file():
            assert tuple(load_checkpoint(path)["config"]["patch_size"]) == patch_size


@pytest.mark.parametrize("grid", [False, True])
def test_reconstruction_shows_the_result(viewer, add_widget, qtbot, notifications, tiny_checkpoints, grid):
    """Issue 12.14: only the reconstruction is visible, or the four layers side by side in a grid."""
    image, kwargs = small_nuclei_2d(64)
    layer = viewer.add_image(image, **kwargs)
    masking = add_widget("Masking")
    masking.run()
    wait_done(qtbot, masking)
    widget = add_widget("Reconstruction")
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    widget.grid.setChecked(grid)
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    names = [f"{layer.name}{s}" for s in ("", " masked", " reconstruction", " error")]
    visible = {n: viewer.layers[n].visible for n in names}
    assert not viewer.layers[f"{layer.name} mask"].visible
    if grid:
        assert viewer_grid(viewer).enabled and all(visible.values())
    else:
        assert not viewer_grid(viewer).enabled
        assert visible == {n: n.endswith("reconstruction") for n in names}
    assert viewer.layers.selection.active.name == f"{layer.name} reconstruction"


def test_reconstruction_keeps_units(viewer, add_widget, qtbot, notifications, tiny_checkpoints):
    """Issue 12.4: outputs keep the input's units (no 'Inconsistent units' from napari)."""
    image, _ = small_nuclei_2d(64)
    layer = viewer.add_image(image, name="um", scale=(0.5, 0.5), units=("um", "um"))
    widget = add_widget("Reconstruction")
    _use_checkpoint(widget, tiny_checkpoints["tiny-2d"])
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    for name in ("um reconstruction", "um error"):
        assert tuple(map(str, viewer.layers[name].units)) == tuple(map(str, layer.units)), name
