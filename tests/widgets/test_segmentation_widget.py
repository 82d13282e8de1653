"""Segmentation widget in a real viewer: samples, scribbles, live mode, overrides."""

from __future__ import annotations

import numpy as np
import pytest
from widget_helpers import errors, small_nuclei_2d, wait_done


@pytest.mark.parametrize("sample", ["nuclei_2d", "nuclei_3d", "ct_abdomen"])
def test_segmentation_samples(viewer, add_widget, qtbot, notifications, sample):
    viewer.open_sample("napari-mae", sample)
    image = next(ly for ly in viewer.layers if ly._type_string == "image")
    widget = add_widget("Segmentation")
    widget.image.set_value(image)
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{image.name} labels"]
    assert labels._type_string == "labels"
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    n = int(labels.data.max())
    assert n > 0
    size = "area" if image.ndim == 2 else "volume"
    assert len(labels.features) == len(np.unique(labels.data)) - 1
    # Sizes are physical: pixels times the voxel size (no separate pixel column where uncalibrated).
    pixels = np.bincount(labels.data.ravel())[labels.features["label"]]
    np.testing.assert_allclose(labels.features[size], pixels * np.prod(image.scale), rtol=1e-6)
    assert ("pixels" in labels.features) == bool(np.any(np.asarray(image.scale) != 1))
    assert {"centroid_y", "centroid_x", "mean_intensity"} <= set(labels.features)
    assert tuple(map(str, labels.units)) == tuple(map(str, image.units))  # issue 12.4
    assert widget.table.rowCount() == min(len(labels.features), 500)
    assert "objects" in widget.status.text() and "radius" in widget.status.text()
    # Issue 12.15: automatic objects covering most of the image (CT: the body) are called out.
    covers = np.count_nonzero(labels.data) / labels.data.size > 0.4
    assert ("scribbles" in widget.status.text()) == covers
    if sample == "ct_abdomen":
        assert covers and "bright or dark" in widget.status.text()
    # The estimates can be kept and overridden.
    widget.use_estimates.click()
    assert widget.radius.value() == pytest.approx(widget.info["radius"], rel=1e-2)


def _paint_scribbles(layer, image):
    """Background strokes on dark pixels, object strokes on bright ones."""
    data = np.zeros(layer.data.shape, np.uint8)
    lo, hi = np.percentile(image, [20, 99])
    data[::7, ::7][image[::7, ::7] <= lo] = 1
    data[::5, ::5][image[::5, ::5] >= hi] = 2
    return data


def test_segmentation_scribbles_and_live_mode(viewer, add_widget, qtbot, notifications):
    image, kwargs = small_nuclei_2d(200)
    layer = viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    scribbles = widget.add_scribbles_layer()
    assert scribbles.data.shape == image.shape and scribbles.selected_label == 2
    assert widget.scribbles.value() == scribbles
    # Only one class painted: a clear message, no job.
    scribbles.data = np.where(_paint_scribbles(scribbles, image) == 2, 2, 0).astype(np.uint8)
    widget.run()
    assert "background" in errors(notifications)[-1]
    # Live mode: painting both classes triggers a (debounced) run.
    widget.live.setChecked(True)
    scribbles.data = _paint_scribbles(scribbles, image)
    qtbot.waitUntil(lambda: f"{layer.name} labels" in viewer.layers and not widget.busy, timeout=30_000)
    assert widget.info["mode"] == "scribbles"
    assert viewer.layers[f"{layer.name} labels"].data.max() > 0
    widget.live.setChecked(False)


def test_segmentation_override_radius(viewer, add_widget, qtbot, notifications):
    image, kwargs = small_nuclei_2d(160)
    viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    widget.radius.setValue(6.0)
    widget.threshold.setValue(0.05)
    widget.run()
    wait_done(qtbot, widget)
    assert widget.info["radius"] == pytest.approx(6.0)
    assert widget.info["threshold"] == pytest.approx(0.05)


def test_segmentation_large_objects_on_a_shrunk_grid(viewer, add_widget, qtbot, notifications):
    """Large nuclei are segmented on a shrunk grid; the status says so and the labels are
    full size."""
    yy, xx = np.mgrid[:240, :240]
    image = np.zeros((240, 240), np.float32)
    for cy, cx in [(60, 60), (60, 170), (170, 60), (170, 170), (115, 115)]:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 30**2] = 1.0
    layer = viewer.add_image(image + 0.05 * np.random.default_rng(0).random(image.shape, np.float32))
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{layer.name} labels"].data
    assert labels.shape == image.shape and labels.max() == 5
    assert tuple(widget.info["working_shape"]) != image.shape
    assert "segmented on a" in widget.status.text()


def test_segmentation_polarity_override(viewer, add_widget, qtbot, notifications):
    """One bright disk covering most of the image: 'auto' may take it for background;
    'bright' segments it as the object."""
    yy, xx = np.mgrid[:128, :128]
    image = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 55**2, 200.0, 30.0).astype(np.float32)
    layer = viewer.add_image(image)
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.polarity.value = "bright"
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{layer.name} labels"].data
    assert widget.info["bright_objects"] is True
    assert labels.max() == 1 and labels[64, 64] == 1 and labels[2, 2] == 0


def test_segmentation_layer_removed_while_running(viewer, add_widget, qtbot, notifications):
    viewer.open_sample("napari-mae", "nuclei_3d")
    image = viewer.layers["nuclei 3D"]
    widget = add_widget("Segmentation")
    widget.image.set_value(image)
    widget.run()
    assert widget.busy
    viewer.layers.remove(image)
    wait_done(qtbot, widget, timeout=10_000)
    assert "was removed" in errors(notifications)[-1]
    assert widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.job.thread_running, timeout=20_000)  # the worker ends too
    assert "nuclei 3D labels" not in viewer.layers


def test_segmentation_4d_all_time_points(viewer, add_widget, qtbot, notifications):
    image, _ = small_nuclei_2d(96)
    stack = np.stack([np.stack([image] * 3)] * 2)  # (T, Z, Y, X)
    layer = viewer.add_image(stack, scale=(5, 2, 1, 1))
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.time_mode.setCurrentText("all time points")
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{layer.name} labels"]
    assert labels.data.shape == stack.shape
    np.testing.assert_allclose(labels.scale, (5, 2, 1, 1))
    assert set(labels.features["t"]) == {0, 1}


def test_segmentation_awkward_inputs(viewer, add_widget, qtbot, notifications):
    """Multichannel, dask, singleton-axis and NaN images in one viewer."""
    import dask.array as da

    image, _ = small_nuclei_2d(128)
    with_nan = image.astype(np.float32)
    with_nan[:8, :8] = np.nan
    inputs = {
        "two channels": (np.stack([image, image[::-1]]), {"scale": (1, 0.5, 0.5)}, (128, 128), (0.5, 0.5)),
        "dask": (da.from_array(image, chunks=64), {}, (128, 128), (1, 1)),
        "singleton": (image[None], {"scale": (3, 2, 2)}, (128, 128), (2, 2)),
        "nan": (with_nan, {}, (128, 128), (1, 1)),
    }
    widget = add_widget("Segmentation")
    for name, (data, kwargs, shape, scale) in inputs.items():
        viewer.add_image(data, name=name, **kwargs)
        widget.image.set_value(name)
        widget.run()
        wait_done(qtbot, widget)
        assert not errors(notifications), (name, notifications)
        labels = viewer.layers[f"{name} labels"]
        assert labels.data.shape == shape and labels.data.max() > 0, name
        np.testing.assert_allclose(labels.scale, scale)
    assert viewer.layers["nan labels"].data[:8, :8].max() == 0  # NaN pixels are never labelled


def test_segmentation_with_mae_features(viewer, add_widget, qtbot, notifications):
    """Scribbles plus the encoder features of a model offered by the Training widget."""
    import torch

    from napari_mae.models.mae import build_model
    from napari_mae.widgets._registry import registry

    torch.manual_seed(0)
    image, kwargs = small_nuclei_2d(128)
    layer = viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    name = registry.add_model("trained: tiny", build_model("tiny-2d"))
    widget.image.set_value(layer)
    scribbles = widget.add_scribbles_layer()
    scribbles.data = _paint_scribbles(scribbles, image)
    widget.use_model.setChecked(True)
    assert widget.model.combo.currentText() == name
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    assert widget.info["mode"] == "scribbles"
    assert viewer.layers[f"{layer.name} labels"].data.max() > 0


def test_closing_the_widget_stops_its_job(viewer, add_widget, qtbot, notifications):
    viewer.open_sample("napari-mae", "nuclei_3d")
    widget = add_widget("Segmentation")
    widget.image.set_value("nuclei 3D")
    widget.run()
    job = widget.job
    assert job.running
    widget.close()
    assert job.cancelled and not job.running
    qtbot.waitUntil(lambda: not job.thread_running, timeout=20_000)
    assert "nuclei 3D labels" not in viewer.layers


def test_segmentation_4d_current_time_point(viewer, add_widget, qtbot, notifications):
    """Issue 12.5: the result of one time point is drawn at that time point only."""
    image, _ = small_nuclei_2d(64)
    stack = np.stack([np.stack([image] * 3)] * 2)  # (T, Z, Y, X)
    layer = viewer.add_image(stack, scale=(5, 2, 1, 1), translate=(10, 0, 0, 0))
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    viewer.dims.set_current_step(0, 1)
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{layer.name} labels"]
    assert labels.data.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(labels.scale, (5, 2, 1, 1))
    np.testing.assert_allclose(labels.translate, (15, 0, 0, 0))
    assert set(labels.features["t"]) == {1}


def test_segmentation_table_before_a_run_and_export(viewer, add_widget, qtbot, notifications, tmp_path):
    """Issue 12.16: the empty table shows the real columns; 12.8: the table exports as CSV."""
    image, kwargs = small_nuclei_2d(96)
    viewer.add_image(image, name="um", scale=(0.5, 0.5), units=("um", "um"))
    widget = add_widget("Segmentation")
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    assert headers[:3] == ["label", "pixels", "area (µm²)"] and "1" not in headers
    assert not widget.export_button.isEnabled()
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    path = widget.export_table(tmp_path / "objects.csv")
    lines = path.read_text().splitlines()
    features = viewer.layers["um labels"].features
    assert lines[0].split(",") == list(features.columns)
    assert len(lines) == len(features) + 1
    # Uncalibrated 2D: one size column in pixels.
    viewer.add_image(image, name="plain")
    widget.image.set_value("plain")
    widget.run()
    wait_done(qtbot, widget)
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    assert "pixels" not in headers and "area (px²)" in headers


def test_segmentation_learned_method(viewer, add_widget, qtbot, notifications):
    """The learned method with the bundled nuclei model; the status names method and model;
    scribbles with the learned method are a clear notification, nothing added."""
    viewer.open_sample("napari-mae", "nuclei_2d")
    image = next(ly for ly in viewer.layers if ly._type_string == "image")
    widget = add_widget("Segmentation")
    widget.image.set_value(image)
    widget.method.value = "learned"
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    assert widget.info["method"] == "learned" and widget.info["model"] == "default-2d"
    assert "learned, model default-2d" in widget.status.text()
    labels = viewer.layers[f"{image.name} labels"]
    assert int(labels.data.max()) > 10
    n_layers = len(viewer.layers)
    widget.add_scribbles_layer()
    widget.scribbles.value().data[5:9, 5:9] = 1
    widget.scribbles.value().data[100:104, 100:104] = 2
    widget.run()
    assert any("learned method takes no scribbles" in m for m in errors(notifications))
    assert len(viewer.layers) == n_layers + 1  # only the scribbles layer


def test_a_segmentation_model_that_does_not_exist_is_a_notification(
    viewer, add_widget, qtbot, notifications, tmp_path
):
    """A typed model path that is not there: one clear message, no Labels layer (auto used to fall back silently)."""
    image, kwargs = small_nuclei_2d(64)
    layer = viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.method.value = "auto"
    widget.segmenter.value = str(tmp_path / "gone.pt")
    widget.run()
    wait_done(qtbot, widget)
    assert "no such file" in errors(notifications)[-1]
    assert f"{layer.name} labels" not in viewer.layers


def test_the_status_says_when_frames_got_different_methods(
    viewer, add_widget, qtbot, notifications, monkeypatch
):
    import napari_mae.segmentation as seg

    real = seg.segment_instances
    calls = []

    def alternate(frame, **kw):  # auto decides per frame: here learned, then classical
        calls.append(kw["method"])
        return real(frame, **{**kw, "method": "learned" if len(calls) == 1 else "classical"})

    monkeypatch.setattr(seg, "segment_instances", alternate)
    image, _ = small_nuclei_2d(96)
    layer = viewer.add_image(np.stack([np.stack([image] * 3)] * 2))  # (T, Z, Y, X)
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.time_mode.setCurrentText("all time points")
    widget.run()
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    assert calls == ["auto", "auto"]
    assert "classical on 1 frames" in widget.status.text() and "learned on 1 frames" in widget.status.text()
