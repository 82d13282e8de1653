"""The Segmentation widget's Fine-tune: scribbles and corrected objects teach the model, in a worker."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk
from widget_helpers import errors, small_nuclei_2d, wait_done

#: A few steps of small crops (the seconds box still bounds the time).
TINY = {"eval_every": 2, "batch_size": 2, "crop_size": 64, "steps": 4, "live_every_s": 1e-6, "device": "cpu"}


def _strokes(image):
    s = np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(image, [20, 99])
    s[::7, ::7][image[::7, ::7] <= lo] = 1
    s[::5, ::5][image[::5, ::5] >= hi] = 2
    return s


def _setup(viewer, add_widget, tiny_model, size=128):
    image, kwargs = small_nuclei_2d(size)
    layer = viewer.add_image(image, **kwargs)
    widget = add_widget("Segmentation")
    widget.image.set_value(layer)
    widget.segmenter.value = str(tiny_model)
    widget.finetune_seconds.setValue(120)
    widget.finetune_options = dict(TINY)
    return widget, layer, image


def test_finetune_from_scribbles_and_corrections(
    viewer, add_widget, qtbot, notifications, tiny_model, config_dir
):
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.widgets._registry import SegmenterRegistry, segmenters

    widget, layer, image = _setup(viewer, add_widget, tiny_model)
    widget.method.value = "classical"
    widget.run()  # a first result to correct (the classical pipeline finds these nuclei)
    wait_done(qtbot, widget)
    assert not errors(notifications), notifications
    labels = viewer.layers[f"{layer.name} labels"]
    assert widget.corrected_objects(widget_prep(widget)) == (None, None)
    # the user paints one object whole with a new id, and erases another pixel's object
    data = np.array(labels.data)
    data[disk((40, 40), 6, shape=data.shape)] = 999
    erased_at = tuple(np.argwhere((data > 0) & (data != 999))[0])
    data[data == data[erased_at]] = 0
    labels.data = data
    corrected, erased = widget.corrected_objects(widget_prep(widget))
    assert set(np.unique(corrected)) == {0, 999} and (corrected == 999).sum() == (data == 999).sum()
    assert erased[erased_at] and not erased[40, 40]
    scribbles = widget.add_scribbles_layer()
    scribbles.data = _strokes(image)
    before = widget.segmenter.native.count()
    widget.finetune()
    assert widget.busy and not widget.finetune_button.isEnabled()
    wait_done(qtbot, widget, timeout=120_000)
    assert not errors(notifications), notifications
    final = widget.finetune_result
    assert final.kind == "finished" and final.checkpoint.parent == config_dir / "models"
    load_segmenter(final.checkpoint)  # a normal segmentation checkpoint
    # listed, selected, across restarts; the previous choices stay
    name = widget.segmenter.value
    assert name.startswith("fine-tuned:") and segmenters.models[name] == str(final.checkpoint)
    assert (
        widget.segmenter.native.count() == before + 1 and widget.segmenter.native.findText("default-2d") >= 0
    )
    assert name in SegmenterRegistry().model_names()
    assert widget.segmenter.spec() == str(final.checkpoint)
    # the image was segmented with the new model; the result layer holds it
    assert viewer.layers[f"{layer.name} labels"].data.shape == image.shape
    assert "previous model stays" in widget.status.text()
    assert widget.finetune_button.isEnabled() and widget.run_button.isEnabled()


def widget_prep(widget):
    from napari_mae.widgets._common import parse_channel_axis
    from napari_mae.widgets._layers import prepare_image

    return prepare_image(widget.image.value(), widget.viewer, channel_axis=parse_channel_axis("auto"))


def test_finetune_keeps_the_radius_the_user_set(viewer, add_widget, qtbot, notifications, tiny_model):
    """The object-radius box reaches the fine-tuning, and the fine-tuned model keeps it."""
    from napari_mae.models.decoder import load_segmenter

    widget, layer, image = _setup(viewer, add_widget, tiny_model)
    widget.add_scribbles_layer().data = _strokes(image)
    widget.radius.setValue(5.5)
    widget.pseudo_source.setCurrentIndex(widget.pseudo_source.findData("agreement"))
    widget.finetune()
    wait_done(qtbot, widget, timeout=120_000)
    assert not errors(notifications), notifications
    assert load_segmenter(widget.finetune_result.checkpoint).fitted_radius == pytest.approx(5.5)
    from napari_mae.io.checkpoint import load_checkpoint

    extra = load_checkpoint(widget.finetune_result.checkpoint)["extra"]
    assert extra["finetune"]["pseudo_source"] == "agreement"  # the box reaches the fine-tuning


def test_finetune_bad_input_is_a_notification(
    viewer, add_widget, qtbot, notifications, tiny_model, config_dir
):
    from napari_mae.widgets._registry import segmenters

    widget, layer, image = _setup(viewer, add_widget, tiny_model)
    widget.finetune()  # no scribbles layer
    assert "scribbles" in errors(notifications)[-1] and widget.job is None
    scribbles = widget.add_scribbles_layer()
    scribbles.data = np.where(_strokes(image) == 2, 2, 0).astype(np.uint8)
    widget.finetune()
    wait_done(qtbot, widget)
    assert "no background stroke" in errors(notifications)[-1]
    odd = viewer.add_labels(np.zeros((10, 10), np.uint8), name="odd")
    widget.scribbles.set_value(odd)
    widget.finetune()
    assert "shape" in errors(notifications)[-1]
    assert not segmenters.models and not (config_dir / "models").exists()
    assert widget.finetune_button.isEnabled()


def test_finetune_stop_at_once_saves_nothing(
    viewer, add_widget, qtbot, notifications, tiny_model, config_dir
):
    from napari_mae.widgets._registry import segmenters

    widget, layer, image = _setup(viewer, add_widget, tiny_model)
    widget.add_scribbles_layer().data = _strokes(image)
    widget.finetune()
    widget.stop_button.click()
    assert widget.busy  # Stop waits for the best model so far (none yet)
    wait_done(qtbot, widget)
    assert widget.finetune_result.kind == "stopped" and widget.finetune_result.checkpoint is None
    assert "nothing was saved" in widget.status.text()
    assert not segmenters.models and not list((config_dir / "models").glob("*.pt"))
    assert not errors(notifications)


def test_gui_stays_responsive_while_finetuning(viewer, add_widget, qtbot, notifications, tiny_model):
    """The longest gap of a 50 ms GUI-thread heartbeat stays under 0.5 s (issue 14's target).

    The user's flow: segment, correct, fine-tune; so the labels layer exists and torch,
    MONAI and ``torch._dynamo`` (which the first AdamW imports) are imported before the
    heartbeat starts. Those first imports hold the GIL for up to ~1 s each on a loaded
    2-core machine, once per session; the fine-tuning itself is what is measured here.
    """
    import torch._dynamo  # noqa: F401
    from test_responsiveness import Heartbeat

    widget, layer, image = _setup(viewer, add_widget, tiny_model, size=160)
    widget.method.value = "learned"
    widget.run()
    wait_done(qtbot, widget)
    widget.add_scribbles_layer().data = _strokes(image)
    widget.finetune_options = {**TINY, "steps": 12}
    beat = Heartbeat().start()
    widget.finetune()
    wait_done(qtbot, widget, timeout=120_000)
    gap = beat.stop()
    gaps = [
        (round(b - a, 2), round(a - beat.beats[0], 2))
        for a, b in zip(beat.beats, beat.beats[1:], strict=False)
        if b - a > 0.25
    ]
    print(f"fine-tuning: longest GUI gap {gap:.2f} s over {len(beat.beats)} beats; gaps > 0.25 s: {gaps}")
    assert not errors(notifications), notifications
    assert widget.finetune_result.kind == "finished"
    assert len(beat.beats) > 20
    assert gap < 0.5, f"GUI thread blocked for {gap:.2f} s"
