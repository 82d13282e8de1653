"""Training widget, segmentation task, in a real viewer: tiny runs on synthetic images + labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from synthetic import random_nuclei
from widget_helpers import errors, setup_training, wait_done

from napari_mae.widgets._registry import registry, segmenters
from napari_mae.widgets._training import TASK_MAE, TASK_SEGMENTATION


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    """Four 64 x 64 synthetic images and their labels, same file names."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for k in range(4):
        img, lab = random_nuclei(k, shape=(64, 64), n=8, radius=(4, 7))
        tifffile.imwrite(images / f"n{k}.tif", img)
        tifffile.imwrite(labels / f"n{k}.tif", lab)
    return images, labels


def setup_segmentation(widget, images, labels, out, epochs: int = 2) -> None:
    """Fill the Training widget for a tiny CPU segmentation run (random tiny encoder, 32 px crops)."""
    widget.task.setCurrentText(TASK_SEGMENTATION)
    widget.folder.setText(str(images))
    widget.labels.setText(str(labels))
    widget.output.setText(str(out))
    widget.start_from.setCurrentText("tiny-2d (random encoder)")
    widget.crop_size.value = 32
    widget.frozen_epochs.value = 1
    widget.epochs.value = epochs
    widget.crops_per_image.value = 2
    widget.batch_size.value = 4
    widget.device.setCurrentText("cpu")


def test_segmentation_run_plots_accuracy_and_offers_the_model(
    viewer, add_widget, qtbot, notifications, pairs, tmp_path
):
    images, labels = pairs
    widget = add_widget("Training")
    seg = add_widget("Segmentation")
    setup_segmentation(widget, images, labels, tmp_path / "seg")
    config = widget.build_config()
    assert (config.labels_dir, config.model, config.crop_size) == (str(labels), "tiny-2d", 32)
    widget.run()
    wait_done(qtbot, widget, timeout=180_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "finished"
    assert widget.epoch_bar.value() == 2
    # The loss per step, the validation acc@0.5 per epoch on its own axis (no validation loss here).
    assert len(widget.plot.train[0]) > 0 and widget.plot.val == ([], [])
    assert widget.plot.metric[0] == [1.0, 2.0]
    assert all(0.0 <= a <= 1.0 for a in widget.plot.metric[1])
    assert widget.plot.metric_axes.get_visible()
    assert "val acc@0.5" in widget.eta.text() or "finished" in widget.eta.text()
    # The model joins the segmentation models, not the MAE lists.
    name = widget.model_name
    assert segmenters.models[name] == str(tmp_path / "seg" / "best.pt")
    assert name not in registry.models
    assert seg.segmenter.native.findText(name) >= 0  # the Segmentation widget's segmentation models
    seg.segmenter.value = name
    assert seg.segmenter.spec() == str(tmp_path / "seg" / "best.pt")
    # ... and it is a start choice of the next segmentation run ("continue training").
    assert widget.start_from.findText(name + " (continue training)") >= 0
    widget.start_from.setCurrentText(name + " (continue training)")
    assert widget.build_config().model == str(tmp_path / "seg" / "best.pt")


def test_segmentation_stop_keeps_last_then_resumes(viewer, add_widget, qtbot, notifications, pairs, tmp_path):
    images, labels = pairs
    widget = add_widget("Training")
    setup_segmentation(widget, images, labels, tmp_path / "seg", epochs=5)
    widget.run()
    qtbot.waitUntil(
        lambda: widget.last_update is not None and widget.last_update.kind == "step", timeout=120_000
    )
    widget.stop_button.click()
    wait_done(qtbot, widget, timeout=60_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "stopped"
    assert widget.progress_bar.format().startswith("stopped")
    assert (tmp_path / "seg" / "last.pt").is_file()
    assert segmenters.models[widget.model_name] == str(tmp_path / "seg" / "last.pt")
    n_metric = len(widget.plot.metric[0])
    widget.resume_button.click()
    wait_done(qtbot, widget, timeout=180_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "finished" and widget.epoch_bar.value() == 5
    assert widget.plot.metric[0][-1] == 5.0 and len(widget.plot.metric[0]) > n_metric  # the curve continues
    assert segmenters.models[widget.model_name] == str(tmp_path / "seg" / "best.pt")


def test_bad_labels_folder_is_notified_and_loses_nothing(
    viewer, add_widget, qtbot, notifications, pairs, tmp_path
):
    images, labels = pairs
    (labels / "n3.tif").unlink()  # one image without labels
    tifffile.imwrite(labels / "extra.tif", np.zeros((64, 64), np.uint16))  # labels without an image
    widget = add_widget("Training")
    setup_segmentation(widget, images, labels, tmp_path / "seg")
    widget.plot.add("train", 0.5, 1.0)  # the last run's curve
    widget.run()
    wait_done(qtbot, widget)
    message = errors(notifications)[-1]
    assert "n3.tif" in message and "extra.tif" in message
    assert widget.plot.train == ([0.5], [1.0])  # kept: the run never started
    assert widget.progress_bar.format() == "not started: see the message"
    assert not (tmp_path / "seg").exists() or not any((tmp_path / "seg").iterdir())
    assert widget.run_button.isEnabled() and not segmenters.models


def test_labels_folder_missing_or_the_image_folder(viewer, add_widget, notifications, pairs, tmp_path):
    images, _ = pairs
    widget = add_widget("Training")
    setup_segmentation(widget, images, tmp_path / "nope", tmp_path / "seg")
    widget.run()
    assert "folder of label images" in errors(notifications)[-1]
    widget.labels.setText(str(images))
    widget.run()
    assert "labels folder is the image folder" in errors(notifications)[-1]
    assert widget.job is None


@pytest.mark.parametrize("task", [TASK_MAE, TASK_SEGMENTATION])
def test_a_folder_of_one_image_is_refused_clearly(
    viewer, add_widget, qtbot, notifications, pairs, tmp_path, task
):
    """Issue 14, bad input: "pretrain on my folder" with a folder of a single image."""
    images, labels = pairs
    for k in (1, 2, 3):
        (images / f"n{k}.tif").unlink()
        (labels / f"n{k}.tif").unlink()
    widget = add_widget("Training")
    if task == TASK_SEGMENTATION:
        setup_segmentation(widget, images, labels, tmp_path / "run")
    else:
        setup_training(widget, images, tmp_path / "run")
    widget.run()
    wait_done(qtbot, widget)
    message = errors(notifications)[-1]
    assert "holds one image (n0.tif)" in message and "at least two" in message
    assert not (tmp_path / "run").exists()
    assert widget.run_button.isEnabled()


def test_task_switch_shows_its_fields_and_choices(viewer, add_widget, tmp_path):
    widget = add_widget("Training")
    mae_only = [widget.mask_ratio.native, widget.patch_size, widget.pattern, widget.adversarial_weight.native]
    seg_only = [
        widget.labels,
        widget.frozen_epochs.native,
        widget.crop_size.native,
        widget.crop_size_3d.native,
    ]
    assert widget.task.currentText() == TASK_MAE
    assert all(w.isVisibleTo(widget) for w in mae_only) and not any(w.isVisibleTo(widget) for w in seg_only)
    assert widget.epochs.value == 10 and widget.lr.value == pytest.approx(1e-3)
    widget.dims.setCurrentText("3D")
    # MAEs the user pretrained, 2D and 3D, are offered as the encoder of a segmentation run.
    mae2d, mae3d = tmp_path / "mae2d.pt", tmp_path / "mae3d.pt"
    mae2d.write_bytes(b"x")
    mae3d.write_bytes(b"x")
    name2d = registry.add_model("trained: mine", str(mae2d), patch_size=(8, 8))
    registry.add_model("trained: vol", str(mae3d), patch_size=(4, 8, 8))
    widget.lr.value = 5e-4  # the user's value is kept when the task changes
    widget.task.setCurrentText(TASK_SEGMENTATION)
    assert not any(w.isVisibleTo(widget) for w in mae_only) and all(w.isVisibleTo(widget) for w in seg_only)
    assert widget.dims.currentText() == "2D" and not widget.dims.isEnabled()
    assert widget.crops_per_image.value == 4 and widget.lr.value == pytest.approx(5e-4)
    items = [widget.start_from.itemText(i) for i in range(widget.start_from.count())]
    assert items[0] == widget.start_from.currentText() == "default-2d (MAE encoder)"
    assert f"{name2d} (MAE encoder)" in items and "trained: vol (MAE encoder)" in items
    assert "default-2d (continue training)" in items and "tiny-2d (random encoder)" in items
    widget.start_from.setCurrentText(f"{name2d} (MAE encoder)")
    widget.folder.setText(str(tmp_path))
    widget.labels.setText(str(tmp_path / "labels"))
    (tmp_path / "labels").mkdir()
    assert widget.build_config().model == str(mae2d)
    assert widget.build_config().output_dir == str(tmp_path / "napari-mae-segmentation")
    widget.task.setCurrentText(TASK_MAE)
    assert widget.crops_per_image.value == 1 and widget.dims.isEnabled()
    assert widget.start_from.currentText() == "default-2d (fine-tune)"
    for task in (TASK_SEGMENTATION, TASK_MAE):
        widget.task.setCurrentText(task)
        assert _rows_without_gaps(widget), task
    widget.start_from.setCurrentText("checkpoint file...")
    assert widget.checkpoint.isVisibleTo(widget) and _rows_without_gaps(widget)


def test_3d_crop_size_reaches_the_config(viewer, add_widget, tmp_path):
    widget = add_widget("Training")
    widget.task.setCurrentText(TASK_SEGMENTATION)
    widget.folder.setText(str(tmp_path))
    (tmp_path / "labels").mkdir()
    widget.labels.setText(str(tmp_path / "labels"))
    assert widget.build_config().crop_size_3d == 64  # SegmentationConfig's default
    widget.crop_size_3d.value = 48
    config = widget.build_config()
    assert (config.crop_size_3d, config.crop_size) == (48, 112)


def test_3d_encoders_are_offered_and_only_their_crop_size_applies(viewer, add_widget, tmp_path):
    """The segmentation task listed 2D encoders only (3D ones through "checkpoint file..."), and the
    3D crop size stayed open for a 2D encoder: each encoder now greys out the other's crop size."""
    widget = add_widget("Training")
    widget.task.setCurrentText(TASK_SEGMENTATION)
    widget.folder.setText(str(tmp_path))
    (tmp_path / "labels").mkdir()
    widget.labels.setText(str(tmp_path / "labels"))
    items = [widget.start_from.itemText(i) for i in range(widget.start_from.count())]
    assert "default-3d (MAE encoder)" in items and "tiny-3d (random encoder)" in items
    crop2d, crop3d = widget.crop_size.native, widget.crop_size_3d.native
    assert widget.start_from.currentText() == "default-2d (MAE encoder)"
    assert crop2d.isEnabled() and not crop3d.isEnabled() and widget.dims.currentText() == "2D"
    for start, model in (("default-3d (MAE encoder)", "default-3d"), ("tiny-3d (random encoder)", "tiny-3d")):
        widget.start_from.setCurrentText(start)
        assert crop3d.isEnabled() and not crop2d.isEnabled() and widget.dims.currentText() == "3D"
        widget.crop_size_3d.value = 32
        config = widget.build_config()
        assert (config.model, config.crop_size_3d) == (model, 32)
    widget.start_from.setCurrentText("tiny-2d (random encoder)")
    assert crop2d.isEnabled() and not crop3d.isEnabled() and widget.dims.currentText() == "2D"
    widget.start_from.setCurrentText("default-2d (continue training)")  # the bundled 2D nuclei model
    assert crop2d.isEnabled() and not crop3d.isEnabled()
    widget.start_from.setCurrentText("checkpoint file...")  # 2D or 3D: the widget cannot tell
    assert crop2d.isEnabled() and crop3d.isEnabled()
    assert not widget.dims.isEnabled()


def test_a_folder_of_volumes_starts_segmentation_from_the_3d_encoder(viewer, add_widget, qtbot, tmp_path):
    widget = add_widget("Training")
    widget.task.setCurrentText(TASK_SEGMENTATION)
    folder = tmp_path / "volumes"
    folder.mkdir()
    tifffile.imwrite(folder / "v0.tif", np.zeros((8, 32, 32), np.uint8))
    widget.folder.setText(str(folder))
    widget.guess_dims()  # what choosing the folder (editingFinished, the browse button) does
    qtbot.waitUntil(lambda: widget.start_from.currentText() == "default-3d (MAE encoder)", timeout=10000)
    assert widget.dims.currentText() == "3D" and not widget.crop_size.native.isEnabled()


def _rows_without_gaps(widget) -> bool:
    """Every form row shows its label exactly when it shows its field (a hidden row leaves no gap)."""
    from qtpy.QtWidgets import QFormLayout

    form = widget.form_layout.itemAt(0).layout()
    assert isinstance(form, QFormLayout)
    for row in range(form.rowCount()):
        label = form.itemAt(row, QFormLayout.ItemRole.LabelRole).widget()
        field = form.itemAt(row, QFormLayout.ItemRole.FieldRole).widget()
        if label.isVisibleTo(widget) != field.isVisibleTo(widget):
            return False
    return True


def test_adversarial_weight_reaches_the_config(viewer, add_widget, tmp_path):
    widget = add_widget("Training")
    widget.folder.setText(str(tmp_path))
    assert widget.build_config().adversarial_weight == 0.0
    widget.adversarial_weight.value = 0.05
    assert widget.build_config().adversarial_weight == pytest.approx(0.05)


def test_accuracy_axis_keeps_the_curves_in_view_and_the_legend_above(viewer, add_widget):
    """The second axis shares x with the loss: every point stays in view; the legend sits above both."""
    widget = add_widget("Training")
    plot = widget.plot
    plot.show_metric("validation acc@0.5")
    for i in range(1, 21):
        plot.add("train", i / 4, 2.0 - i / 20)
    for epoch in range(1, 6):
        plot.add("metric", epoch, epoch / 10)
    plot.redraw(force=True)
    plot.canvas.draw()
    x0, x1 = plot.axes.get_xlim()
    assert x0 <= 0.25 and x1 >= 5.0
    y0, y1 = plot.axes.get_ylim()
    assert y0 <= 1.0 and y1 >= 1.95
    assert plot.metric_axes.get_ylim() == (0.0, 1.0)
    renderer = plot.canvas.get_renderer()
    legend = plot.axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train", "validation acc@0.5"]
    assert legend.get_window_extent(renderer).y0 >= plot.axes.get_window_extent(renderer).y1 - 1
    plot.show_metric(None)  # the MAE task: train and validation loss, no second axis
    assert not plot.metric_axes.get_visible()
    assert [t.get_text() for t in plot.axes.get_legend().get_texts()] == ["train", "validation"]
