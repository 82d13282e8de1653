"""Batch dock widget: segment a whole folder (or glob) of images, off the GUI thread.

The same core as ``napari-mae segment DIR --out OUTDIR``:
:func:`napari_mae.batch.segment_folder`, a generator of one update per file, run in
napari's ``thread_worker``. Each update moves the progress bar and adds a line to the
log (failures in it, the run goes on); Stop quits the generator before the next file
(the file in progress finishes), and ``objects.csv`` is written either way. With
"resume", files done by an earlier run into the same folder are skipped.
"""

from __future__ import annotations

import threading
from pathlib import Path

from napari.qt.threading import thread_worker
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)


def _folder_row(placeholder: str) -> tuple[QWidget, QLineEdit]:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    button = QPushButton("...")
    button.setMaximumWidth(30)

    def browse() -> None:
        path = QFileDialog.getExistingDirectory(row, placeholder, edit.text())
        if path:
            edit.setText(path)

    button.clicked.connect(browse)
    lay.addWidget(edit, 1)
    lay.addWidget(button)
    return row, edit


class BatchWidget(QWidget):
    """Segment every image of a folder: labels per file and one ``objects.csv``."""

    def __init__(self, napari_viewer=None, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.updates: list = []
        self.error: str = ""
        self._stop = threading.Event()
        self._out = Path()
        self._running = False

        form = QFormLayout()
        row, self.source = _folder_row("folder of images, or a glob like data/*.tif")
        form.addRow("Images", row)
        row, self.output = _folder_row("output folder (labels + objects.csv)")
        form.addRow("Output", row)
        self.objects = QComboBox()
        self.objects.addItems(["auto", "bright", "dark"])
        self.objects.setToolTip("objects brighter or darker than the background (auto: detected per image)")
        form.addRow("Objects", self.objects)
        self.radius = QDoubleSpinBox()
        self.radius.setRange(0.0, 1e6)
        self.radius.setDecimals(3)
        self.radius.setSpecialValueText("auto")
        self.radius.setToolTip("object radius in the images' physical units; auto: estimated per image")
        form.addRow("Radius", self.radius)
        self.method = QComboBox()
        self.method.addItems(["auto", "classical", "learned"])
        self.method.setToolTip(
            "auto (as napari-mae segment): the model below if named, else the bundled nuclei decoder on "
            "single-channel 2D images, falling back to classical where it is unsure of an image, and classical "
            "on volumes; classical: the filter-bank pipeline; learned: the MAE encoder's instance decoder "
            "(the model below)"
        )
        form.addRow("Method", self.method)
        self.model = QLineEdit()
        self.model.setPlaceholderText("default-2d (bundled), or a checkpoint of napari-mae train --labels")
        self.model.setToolTip("segmentation model of the learned method; loaded once for the whole folder")
        form.addRow("Model", self.model)
        self.resume = QCheckBox("skip files already done in the output folder")
        self.resume.setChecked(True)
        form.addRow("Resume", self.resume)
        self.overwrite = QCheckBox("segment every file again")
        form.addRow("Overwrite", self.overwrite)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.stop_button.clicked.connect(self.stop)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m files")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.log, 1)

    # ----------------------------------------------------------------- state

    @property
    def busy(self) -> bool:
        """True from Run until the worker thread has ended."""
        return self._running

    def _set_running(self, running: bool) -> None:
        self._running = running
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    # ----------------------------------------------------------------- run

    def run(self) -> None:
        """Start segmenting the folder (worker thread)."""
        from napari_mae.batch import check_batch_output, list_images

        source, out = self.source.text().strip(), self.output.text().strip()
        self.error = ""
        try:
            if not source or not out:
                raise ValueError("choose the images and an output folder")
            resume = self.resume.isChecked() and not self.overwrite.isChecked()
            check_batch_output(out, overwrite=self.overwrite.isChecked(), resume=resume)
            n = len(list_images(source, exclude=out))
            if n == 0:
                from napari_mae.io.readers import FORMAT_NAMES

                raise ValueError(f"{source}: no image ({FORMAT_NAMES}) or OME-Zarr found")
            method = self.method.currentText()
            model = self.model.text().strip() or None
            if (
                method != "classical"
                and model is not None
                and model != "default-2d"
                and not Path(model).is_file()
            ):
                raise ValueError(f"model {model}: no such file (a checkpoint path, or empty for default-2d)")
        except (ValueError, OSError) as exc:
            self._fail(str(exc))
            return
        self.updates = []
        self.log.clear()
        self.progress.setRange(0, n)
        self.progress.setValue(0)
        self.status.setText(f"segmenting {n} files ...")
        kwargs = {
            "object_radius": self.radius.value() or None,
            "bright_objects": None
            if self.objects.currentText() == "auto"
            else self.objects.currentText() == "bright",
            "resume": resume,
            "overwrite": self.overwrite.isChecked(),
            "method": method,
            "model": model if method != "classical" else None,
        }
        self._stop = threading.Event()
        worker = _batch_worker(source, out, kwargs, self._stop)
        worker.yielded.connect(self._on_update)
        worker.errored.connect(lambda exc: self._fail(f"{type(exc).__name__}: {exc}"))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._out = Path(out)
        self._set_running(True)
        worker.start()

    def stop(self) -> None:
        """Stop after the file in progress (objects.csv is still written)."""
        if self.busy:
            self.status.setText("stopping after the current file ...")
            self._stop.set()

    def _on_update(self, up) -> None:
        self.updates.append(up)
        self.progress.setValue(up.index + 1)
        if up.status == "failed":
            line = f"{up.path.name}: FAILED: {up.error}"
        elif up.status == "skipped":
            line = f"{up.path.name}: done earlier ({up.n_objects} objects)"
        else:
            line = f"{up.path.name}: {up.n_objects} objects in {up.seconds:.1f} s"
        self.log.appendPlainText(line)

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.error = message
        self.status.setText(message)
        show_error(message)

    def _on_finished(self) -> None:
        self._set_running(False)
        done = sum(u.status == "done" for u in self.updates)
        skipped = sum(u.status == "skipped" for u in self.updates)
        failed = sum(u.status == "failed" for u in self.updates)
        stopped = self._stop.is_set()
        if not self.error:
            verb = "stopped" if stopped else "finished"
            self.status.setText(
                f"{verb}: {done} segmented, {skipped} skipped, {failed} failed; "
                f"table: {self._out / 'objects.csv'}"
            )


@thread_worker
def _batch_worker(source: str, out: str, kwargs: dict, stop: threading.Event):
    from napari_mae.batch import segment_folder

    files = segment_folder(source, out, **kwargs)
    try:
        for update in files:
            yield update
            if stop.is_set():
                break
    finally:
        files.close()  # writes objects.csv, here in the worker, before `finished`
