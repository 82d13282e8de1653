"""Training widget in a real viewer: a tiny run on the bundled 2D images, Stop/Resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from widget_helpers import crop_folder, errors, setup_training, small_nuclei_2d, wait_done

from napari_mae.widgets._registry import registry
from napari_mae.widgets._training import TASK_MAE, TASK_SEGMENTATION


@pytest.fixture
def nuclei_folder(tmp_path, sample_data_dir) -> Path:
    """128 x 128 crops of four bundled 2D nuclei images (a run takes ~1 s)."""
    return crop_folder(sample_data_dir, tmp_path / "images")


def test_training_offers_model(viewer, add_widget, qtbot, notifications, nuclei_folder, tmp_path):
    widget = add_widget("Training")
    recon = add_widget("Reconstruction")
    seg = add_widget("Segmentation")
    setup_training(widget, nuclei_folder, tmp_path / "run")
    widget.run()
    wait_done(qtbot, widget, timeout=120_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "finished"
    assert widget.epoch_bar.value() == 2
    assert len(widget.plot.train[0]) > 0 and len(widget.plot.val[0]) == 2
    assert "ETA" in widget.eta.text() or "finished" in widget.eta.text()
    # The trained model is offered (and chosen) in the other widgets.
    assert widget.model_name in registry.models
    assert registry.patch_sizes[widget.model_name] == (8, 8)  # read in the worker from the checkpoint
    assert recon.model.combo.currentText() == widget.model_name
    assert seg.model.combo.findText(widget.model_name) >= 0
    # ... and it reconstructs an image.
    image, kwargs = small_nuclei_2d(96)
    viewer.add_image(image, **kwargs)
    recon.device.setCurrentText("cpu")
    recon.run()
    wait_done(qtbot, recon)
    assert not errors(notifications), notifications
    assert viewer.layers["nuclei 2D reconstruction"].data.shape == image.shape


def test_training_starts_from_the_bundled_model_like_the_cli(
    viewer, add_widget, qtbot, nuclei_folder, sample_data_dir, tmp_path
):
    from napari_mae.training import default_model

    widget = add_widget("Training")
    items = [widget.start_from.itemText(i) for i in range(widget.start_from.count())]
    assert (widget.dims.currentText(), widget.start_from.currentText()) == ("2D", "default-2d (fine-tune)")
    assert "tiny-2d (from scratch)" in items  # training from scratch stays one choice away
    widget.folder.setText(str(nuclei_folder))
    config = widget.build_config()
    assert config.model == default_model(2) and config.patch_size is None
    # A folder of volumes: 3D and default-3d, as `napari-mae train` chooses (read in a worker).
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    (volumes / "vol.tif").write_bytes((sample_data_dir / "nuclei_3d" / "image.tif").read_bytes())
    widget.folder.setText(str(volumes))
    widget.folder.editingFinished.emit()
    qtbot.waitUntil(lambda: widget.dims.currentText() == "3D", timeout=30_000)
    assert widget.start_from.currentText() == "default-3d (fine-tune)"
    assert widget.build_config().model == default_model(3)
    # Once the user chose, another folder leaves the choice alone.
    widget.start_from.setCurrentText("tiny-3d (from scratch)")
    widget.start_from.activated.emit(widget.start_from.currentIndex())  # as a click does
    worker = widget._dims_worker
    widget.folder.setText(str(nuclei_folder))
    widget.folder.editingFinished.emit()
    assert widget._dims_worker is worker  # no new guess started
    assert (widget.dims.currentText(), widget.build_config().model) == ("3D", "tiny-3d")


def test_training_without_bundled_weights_starts_from_scratch(viewer, add_widget, monkeypatch):
    from napari_mae import training

    monkeypatch.setattr(training, "bundled_model_available", lambda name: False)
    widget = add_widget("Training")
    assert widget.start_from.currentText() == "tiny-2d (from scratch)"
    widget.dims.setCurrentText("3D")
    assert widget.start_from.currentText() == "tiny-3d (from scratch)"


def test_training_bad_folder_and_resume_without_run(viewer, add_widget, notifications, tmp_path):
    widget = add_widget("Training")
    widget.run()
    assert "folder" in errors(notifications)[-1]
    setup_training(widget, tmp_path, tmp_path / "run")
    widget.resume()
    assert "Nothing to resume" in errors(notifications)[-1]
    assert widget.run_button.isEnabled() and not widget.busy


def test_training_no_images_is_notified(viewer, add_widget, qtbot, notifications, tmp_path):
    widget = add_widget("Training")
    setup_training(widget, tmp_path, tmp_path / "run")
    widget.run()
    if widget.job is not None:
        wait_done(qtbot, widget)
    assert errors(notifications)
    assert widget.run_button.isEnabled()


def test_training_stop_then_resume(viewer, add_widget, qtbot, notifications, nuclei_folder, tmp_path):
    widget = add_widget("Training")
    setup_training(widget, nuclei_folder, tmp_path / "run", epochs=4)
    widget.run()
    qtbot.waitUntil(
        lambda: widget.last_update is not None and widget.last_update.kind == "step", timeout=60_000
    )
    widget.stop_button.click()
    wait_done(qtbot, widget, timeout=10_000)
    assert widget.last_update.kind == "stopped"
    # Issue 12.16: the bar says "stopped", and the epoch bar and the label agree.
    assert widget.progress_bar.format().startswith("stopped")
    epoch = widget.last_update.epoch
    assert widget.epoch_bar.value() == epoch - 1
    assert f"epoch {epoch}/4 ({epoch - 1} complete)" in widget.eta.text()
    assert (tmp_path / "run" / "last.pt").is_file()
    assert widget.model_name in registry.models  # a stopped run's model is offered too
    n_train = len(widget.plot.train[0])
    widget.resume_button.click()
    wait_done(qtbot, widget, timeout=120_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "finished"
    assert widget.epoch_bar.value() == 4
    assert len(widget.plot.train[0]) > n_train
    assert np.isfinite(widget.plot.train[1]).all()


def test_training_again_on_a_folder_with_a_run(
    viewer, add_widget, qtbot, notifications, nuclei_folder, tmp_path
):
    """Issue 12.7: Start on a folder that holds a run offers overwrite / new folder / resume
    (no '--overwrite' error, no 'done in 0.1 s', the loss plot kept)."""
    widget = add_widget("Training")
    out = tmp_path / "run"
    setup_training(widget, nuclei_folder, out, epochs=1)
    widget.run()
    wait_done(qtbot, widget, timeout=120_000)
    first_job, n_points = widget.job, len(widget.plot.train[0])
    bar_text = widget.progress_bar.format()
    widget.run()  # again, same folder
    assert widget.existing_run.isVisibleTo(widget) and widget.job is first_job
    assert not errors(notifications), notifications
    assert "--overwrite" not in widget.status.text() and widget.progress_bar.format() == bar_text
    assert len(widget.plot.train[0]) == n_points
    widget.new_folder_button.click()
    wait_done(qtbot, widget, timeout=120_000)
    assert widget.job is not first_job and not errors(notifications), notifications
    assert widget.output.text() == str(tmp_path / "run-2") and (tmp_path / "run-2" / "last.pt").is_file()
    before = (out / "last.pt").stat().st_mtime_ns
    widget.output.setText(str(out))
    widget.run()
    widget.overwrite_button.click()
    wait_done(qtbot, widget, timeout=120_000)
    assert not errors(notifications), notifications
    assert widget.last_update.kind == "finished" and (out / "last.pt").stat().st_mtime_ns != before


@pytest.mark.parametrize("task", [TASK_MAE, TASK_SEGMENTATION])
def test_training_defaults_are_the_cli_defaults(viewer, add_widget, nuclei_folder, tmp_path, task):
    """Issue 12.16: one set of defaults per task (its config's, which napari-mae train uses too)."""
    import argparse

    from napari_mae.cli import train as cli_train
    from napari_mae.training import TrainConfig
    from napari_mae.training.segmentation import SegmentationConfig

    widget = add_widget("Training")
    widget.task.setCurrentText(task)
    widget.folder.setText(str(nuclei_folder))
    cli = ["train", str(nuclei_folder), "--out", "x"]
    if task == TASK_SEGMENTATION:
        (tmp_path / "labels").mkdir()
        widget.labels.setText(str(tmp_path / "labels"))
        reference = SegmentationConfig(str(nuclei_folder), str(tmp_path / "labels"), "x")
        keys = ["frozen_epochs", "crop_size", "model"]  # a new decoder on the bundled MAE encoder
        cli += ["--labels", str(tmp_path / "labels")]
    else:
        reference = TrainConfig(data_dir=str(nuclei_folder), output_dir="x")
        keys = ["mask_ratio", "patterns", "adversarial_weight"]
    config = widget.build_config()
    assert type(config) is type(reference)
    for key in ("epochs", "samples_per_image", "batch_size", "lr", "val_fraction", *keys):
        assert getattr(config, key) == getattr(reference, key), key
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    args = parser.parse_args(cli)
    # An option the user leaves out is None and the config's default applies (cli.train._given).
    for arg, key in [
        ("epochs", "epochs"),
        ("samples_per_image", "samples_per_image"),
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("val_fraction", "val_fraction"),
        ("frozen_epochs" if task == TASK_SEGMENTATION else "mask_ratio",) * 2,
        ("pattern", "patterns"),
    ]:
        if arg == "pattern" and task == TASK_SEGMENTATION:
            continue
        value = getattr(args, arg)
        assert (getattr(reference, key) if value is None else value) == getattr(config, key), key


def test_loss_plot_legend_is_outside_the_curves(viewer, add_widget):
    """Issue 12.16: the legend sits above the axes, not over the curves."""
    widget = add_widget("Training")
    plot = widget.plot
    for i in range(20):
        plot.add("train", i / 10, 2.0 - i / 20)
    plot.redraw(force=True)
    plot.canvas.draw()
    renderer = plot.canvas.get_renderer()
    legend_box = plot.axes.get_legend().get_window_extent(renderer)
    axes_box = plot.axes.get_window_extent(renderer)
    assert legend_box.y0 >= axes_box.y1 - 1
