"""Screenshots of the four dock widgets with real results, for the README.

Run in a real window (an X server; under CI ``xvfb-run -a``)::

    xvfb-run -a python scripts/make_screenshots.py [--out docs/images] [--only masking,training]

Each scene opens a bundled sample in a napari viewer, docks a widget through the
plugin manifest, runs it to completion and saves the whole window as
``docs/images/widget_<name>.png`` (the segmentation task of the Training widget:
``docs/images/training_segmentation.png``). The Reconstruction scene uses the bundled
``default-2d`` model when it exists, else the model the Training scene (or a
short run made here) produced.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE = (1800, 1000)


def _wait(app, widget, timeout: float = 600.0) -> None:
    """Process events until the widget's job has finished."""
    t0 = time.monotonic()
    while widget.job is None or widget.busy:
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{type(widget).__name__} did not finish in {timeout} s")
    for _ in range(20):
        app.processEvents()
    if widget.status.text().startswith("Error"):
        raise RuntimeError(widget.status.text())


def _viewer(title: str):
    import napari

    viewer = napari.Viewer(title=title)
    viewer.window._qt_window.resize(*SIZE)
    return viewer


def _open_nuclei_2d(viewer):
    """Open the 2D sample with a display range that shows the dim nuclei."""
    viewer.open_sample("napari-mae", "nuclei_2d")
    image = viewer.layers["nuclei 2D"]
    image.contrast_limits = (0, float(np.percentile(image.data, 99.8)))
    return image


def _save(app, viewer, path: Path) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # toasts would cover the canvas
    for _ in range(10):
        app.processEvents()
    viewer.reset_view()
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")


def masking(app, out: Path, state: dict) -> None:
    viewer = _viewer("napari-mae: Masking")
    _open_nuclei_2d(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Masking")
    widget.image.set_value("nuclei 2D")
    widget.patch_size.set_value((32, 32))
    widget.run()
    _wait(app, widget)
    # Masked input above the input (the canvas is taller than wide).
    viewer.layers["nuclei 2D mask"].visible = False
    viewer.grid.enabled = True
    viewer.grid.shape = (2, 1)
    _save(app, viewer, out / "widget_masking.png")
    viewer.close()


def training(app, out: Path, state: dict) -> None:
    viewer = _viewer("napari-mae: Training")
    _open_nuclei_2d(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Training")
    run_dir = Path(tempfile.mkdtemp(prefix="napari-mae-shots-"))
    widget.folder.setText(str(REPO / "sample_data" / "nuclei_2d" / "images"))
    widget.output.setText(str(run_dir / "run"))
    widget.dims.setCurrentText("2D")
    widget.start_from.setCurrentText("tiny-2d (from scratch)")
    widget.epochs.value = state.get("epochs", 40)
    widget.batch_size.value = 8
    widget.device.setCurrentText("auto")
    widget.run()
    _wait(app, widget, timeout=1800)
    state["trained"] = widget.model_name
    state["checkpoint"] = str(run_dir / "run" / "best.pt")
    _save(app, viewer, out / "widget_training.png")
    viewer.close()


def training_segmentation(app, out: Path, state: dict) -> None:
    """The Training widget's segmentation task after a short run on the bundled 2D images + labels."""
    from napari_mae.widgets._training import TASK_SEGMENTATION

    viewer = _viewer("napari-mae: Training (segmentation)")
    _open_nuclei_2d(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Training")
    run_dir = Path(tempfile.mkdtemp(prefix="napari-mae-shots-"))
    widget.task.setCurrentText(TASK_SEGMENTATION)
    widget.folder.setText(str(REPO / "sample_data" / "nuclei_2d" / "images"))
    widget.labels.setText(str(REPO / "sample_data" / "nuclei_2d" / "labels"))
    widget.output.setText(str(run_dir / "segmentation"))
    widget.start_from.setCurrentText("default-2d (MAE encoder)")
    widget.epochs.value = state.get("segmentation_epochs", 8)
    widget.device.setCurrentText("auto")
    widget.run()
    _wait(app, widget, timeout=1800)
    assert widget.plot.metric[0], "no validation acc@0.5 was plotted"
    # The ground truth the model learnt from, over the image.
    viewer.layers["nuclei 2D ground truth"].visible = True
    viewer.layers.selection.active = viewer.layers["nuclei 2D"]
    _save(app, viewer, out / "training_segmentation.png")
    viewer.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def reconstruction(app, out: Path, state: dict) -> None:
    from napari_mae._names import bundled_weights_path

    viewer = _viewer("napari-mae: Reconstruction")
    image = _open_nuclei_2d(viewer)
    viewer.layers.remove("nuclei 2D ground truth")
    _, masking_widget = viewer.window.add_plugin_dock_widget("napari-mae", "Masking")
    masking_widget.run()  # patch size: the model's (8 x 8)
    _wait(app, masking_widget)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Reconstruction")
    # The widget offers the original image with the Masking widget's mask by itself.
    assert widget.image.value() is image, widget.image.currentText()
    assert widget.mask.currentText() == "nuclei 2D mask", widget.mask.currentText()
    if bundled_weights_path("default-2d").is_file():
        widget.model.combo.setCurrentText("default-2d")
    else:
        if "checkpoint" not in state:
            state["epochs"] = 40
            training(app, out / ".tmp", state)
        widget.model.combo.setCurrentText("checkpoint file...")
        widget.model.path.setText(state["checkpoint"])
    # Input, masked input, reconstruction and error map side by side (the widget's grid view).
    widget.grid.setChecked(True)
    viewer.layers.move(viewer.layers.index("nuclei 2D mask"), 0)  # hidden, out of the way
    widget.run()
    _wait(app, widget)
    viewer.window.remove_dock_widget(masking_widget)
    _save(app, viewer, out / "widget_reconstruction.png")
    viewer.close()


def segmentation(app, out: Path, state: dict) -> None:
    viewer = _viewer("napari-mae: Segmentation")
    _open_nuclei_2d(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Segmentation")
    widget.image.set_value("nuclei 2D")
    widget.run()
    _wait(app, widget)
    viewer.layers["nuclei 2D labels"].opacity = 0.5
    _save(app, viewer, out / "widget_segmentation.png")
    viewer.close()


def segmentation_3d(app, out: Path, state: dict) -> None:
    viewer = _viewer("napari-mae: Segmentation (3D)")
    viewer.open_sample("napari-mae", "nuclei_3d")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mae", "Segmentation")
    widget.image.set_value("nuclei 3D")
    widget.run()
    _wait(app, widget)
    # A middle slice of the anisotropic volume; sizes in the table are in um^3.
    image = viewer.layers["nuclei 3D"]
    image.contrast_limits = (0, float(np.percentile(image.data, 99.8)))
    viewer.layers["nuclei 3D labels"].opacity = 0.45
    viewer.dims.set_current_step(0, image.data.shape[0] // 2)
    _save(app, viewer, out / "widget_segmentation_3d.png")
    viewer.close()


SCENES = {
    "masking": masking,
    "training": training,
    "training_segmentation": training_segmentation,
    "reconstruction": reconstruction,
    "segmentation": segmentation,
    "segmentation_3d": segmentation_3d,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--only", default=",".join(SCENES), help="comma-separated scenes")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the Training scene")
    parser.add_argument(
        "--segmentation-epochs", type=int, default=8, help="epochs of the Training scene's segmentation task"
    )
    args = parser.parse_args(argv)
    from napari.qt import get_qapp
    from qtpy.QtWidgets import QApplication

    app = get_qapp()
    assert isinstance(app, QApplication)
    args.out.mkdir(parents=True, exist_ok=True)
    state: dict = {"epochs": args.epochs, "segmentation_epochs": args.segmentation_epochs}
    for name in args.only.split(","):
        SCENES[name.strip()](app, args.out, state)
    shutil.rmtree(args.out / ".tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
