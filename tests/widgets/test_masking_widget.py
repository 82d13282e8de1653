"""Masking widget in a real viewer, on the samples and on awkward inputs."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from widget_helpers import errors, small_nuclei_2d, wait_done

from napari_mae.widgets._registry import MASK_KEY, registry


def _mask(qtbot, widget, layer=None):
    if layer is not None:
        widget.image.set_value(layer)
    widget.run()
    wait_done(qtbot, widget)


@pytest.mark.parametrize("sample", ["nuclei_2d", "nuclei_3d", "ct_abdomen"])
def test_masking_samples(viewer, add_widget, qtbot, notifications, sample):
    viewer.open_sample("napari-mae", sample)
    image = next(ly for ly in viewer.layers if ly._type_string == "image")
    widget = add_widget("Masking")
    widget.image.set_value(image)
    widget.patch_size.set_value((8, 16, 16) if image.ndim == 3 else (16, 16))
    _mask(qtbot, widget)
    assert not errors(notifications)
    masked = viewer.layers[f"{image.name} masked"]
    mask = viewer.layers[f"{image.name} mask"]
    assert masked._type_string == "image" and mask._type_string == "labels"
    assert masked.data.shape == image.data.shape == mask.data.shape
    np.testing.assert_allclose(masked.scale, image.scale)
    np.testing.assert_allclose(mask.scale, image.scale)
    record = mask.metadata[MASK_KEY]
    assert 0.6 < record["mask"].mean() < 0.9
    assert registry.last_mask is not None and registry.last_mask.source == image.name
    # The physical patch size is shown in the layer's units.
    assert "=" in widget.patch_size.physical.text()


# (name, data, layer kwargs, widget settings, expected output shape, expected scale)
CASES = [
    ("anisotropic", np.random.default_rng(0).random((12, 48, 40)), {"scale": (4.0, 0.5, 0.5)}, {}, (12, 48, 40), (4, 0.5, 0.5)),
    ("singleton", np.random.default_rng(0).random((1, 48, 40)), {"scale": (7.0, 2.0, 2.0)}, {}, (48, 40), (2, 2)),
    ("rgb", (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8), {"rgb": True}, {}, (48, 40, 3), (1, 1)),
    ("channels-first", np.random.default_rng(0).random((2, 48, 40)), {"scale": (1, 0.3, 0.3)}, {"channel": "0"}, (2, 48, 40), (1, 0.3, 0.3)),
    ("4d-current", np.random.default_rng(0).random((3, 8, 32, 32)), {"scale": (10, 2, 1, 1)}, {}, (1, 8, 32, 32), (10, 2, 1, 1)),
    ("4d-all", np.random.default_rng(0).random((3, 8, 32, 32)), {"scale": (10, 2, 1, 1)}, {"time": "all time points"}, (3, 8, 32, 32), (10, 2, 1, 1)),
    ("dask", da.from_array(np.random.default_rng(0).random((48, 40)), chunks=16), {}, {}, (48, 40), (1, 1)),
]  # fmt: skip


@pytest.mark.parametrize("name,data,kwargs,settings,shape,scale", CASES, ids=[c[0] for c in CASES])
def test_masking_inputs(viewer, add_widget, qtbot, notifications, name, data, kwargs, settings, shape, scale):
    layer = viewer.add_image(data, name=name, **kwargs)
    widget = add_widget("Masking")
    widget.image.set_value(layer)
    if "channel" in settings:
        widget.channel.setCurrentText(settings["channel"])
    if "time" in settings:
        widget.time_mode.setCurrentText(settings["time"])
    widget.patch_size.set_value((4, 8, 8))
    if name == "4d-current":
        viewer.dims.set_current_step(0, 2)  # the time point shown is the one masked
    _mask(qtbot, widget)
    assert not errors(notifications), notifications
    out = viewer.layers[f"{name} masked"]
    assert out.data.shape == shape
    np.testing.assert_allclose(out.scale, scale)
    assert viewer.layers[f"{name} mask"].data.max() == 1
    if name == "4d-current":
        # Issue 12.5: drawn at the time point masked (t = 2, 20 s), not over every time point.
        assert any("time point 2" in text for _, text in notifications)
        for layer in (out, viewer.layers[f"{name} mask"]):
            assert layer.data.shape[0] == 1
            np.testing.assert_allclose(layer.translate, (20, 0, 0, 0))


def test_masking_outputs_keep_units(viewer, add_widget, qtbot, notifications):
    """Issue 12.4: outputs keep the input's scale and units; a scaled layer without units says
    'scale units', not 'px'."""
    layer = viewer.add_image(np.random.default_rng(0).random((3, 8, 32, 32)), scale=(5, 2, 1, 1),
                             units=("s", "um", "um", "um"), name="timed")  # fmt: skip
    widget = add_widget("Masking")
    widget.image.set_value(layer)
    widget.time_mode.setCurrentText("all time points")
    widget.patch_size.set_value((4, 8, 8))
    _mask(qtbot, widget)
    assert not errors(notifications), notifications
    for name in ("timed masked", "timed mask"):
        out = viewer.layers[name]
        assert tuple(map(str, out.units))[-3:] == ("micrometer",) * 3, name
    assert tuple(map(str, viewer.layers["timed masked"].units)) == tuple(map(str, layer.units))
    viewer.add_image(np.zeros((32, 32)), scale=(0.5, 0.5), name="scaled")
    widget.image.set_value("scaled")
    assert widget.patch_size.physical.text().endswith("scale units")


def test_masking_multiscale_and_nan(viewer, add_widget, qtbot, notifications):
    base, kwargs = small_nuclei_2d(128)
    pyramid = [base.astype(np.float32), base[::2, ::2].astype(np.float32)]
    viewer.add_image(pyramid, name="pyramid", multiscale=True)
    with_nan = base.astype(np.float32)
    with_nan[:10] = np.nan
    viewer.add_image(with_nan, name="nan")
    widget = add_widget("Masking")
    _mask(qtbot, widget, viewer.layers["pyramid"])
    assert viewer.layers["pyramid masked"].data.shape == base.shape
    _mask(qtbot, widget, viewer.layers["nan"])
    out = viewer.layers["nan masked"].data
    assert np.isfinite(out).all()
    assert any("NaN" in text for _, text in notifications)
    assert not errors(notifications)


def test_masking_empty_viewer_and_bad_input(viewer, add_widget, qtbot, notifications):
    widget = add_widget("Masking")
    widget.run()  # no layer at all
    assert errors(notifications) and "No image layer" in errors(notifications)[-1]
    assert widget.run_button.isEnabled()
    viewer.add_image(np.full((32, 32), np.nan, np.float32), name="all nan")
    widget.image.set_value("all nan")
    widget.patch_size.set_value((8, 8))
    _mask(qtbot, widget)
    assert "no finite values" in errors(notifications)[-1]
    assert widget.run_button.isEnabled() and not widget.stop_button.isEnabled()
