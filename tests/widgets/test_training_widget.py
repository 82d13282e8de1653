"""Training widget in a real viewer: a tiny run on the bundled 2D images, Stop/Resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from widget_helpers import crop_folder, errors, setup_training, small_nuclei_2d, wait_done

from napari_mae.widgets._registry import registry


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
