"""Training dock widget: pre-train or fine-tune an MAE on a folder of images.

Builds a :class:`napari_mae.training.TrainConfig` from the form and iterates
:func:`napari_mae.training.train` in a superqt generator worker; each yielded
update drives the epoch/step progress bars, the ETA and the live loss curve
(train and validation). Stop sets the flag ``train`` checks between steps;
Resume continues from the last checkpoint in the output folder. When training
ends the model is offered in the Reconstruction and Segmentation widgets and
cached CUDA memory is released.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from ._common import JobWidget
from ._masking import PatchSizeEdit
from ._model_picker import CHECKPOINT_TEXT, device_combo
from ._reconstruction import release_gpu_memory
from ._registry import registry

#: Starting points: a fresh model of a preset, or the bundled default weights.
SCRATCH = "from scratch"


def _path_row(placeholder: str, directory: bool = True) -> tuple[QWidget, QLineEdit]:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    button = QPushButton("...")
    button.setMaximumWidth(30)

    def browse() -> None:
        if directory:
            path = QFileDialog.getExistingDirectory(row, placeholder, edit.text())
        else:
            path, _ = QFileDialog.getOpenFileName(row, placeholder, edit.text(), "Checkpoints (*.pt *.pth)")
        if path:
            edit.setText(path)

    button.clicked.connect(browse)
    lay.addWidget(edit, 1)
    lay.addWidget(button)
    return row, edit


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainingWidget(JobWidget):
    """Train an MAE on a folder of 2D or 3D images, with a live loss curve.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Start")
        from ._loss_plot import LossPlot  # matplotlib only when the widget opens

        form = QFormLayout()
        folder_row, self.folder = _path_row("folder of training images")
        self.pattern = QLineEdit("*.tif")
        self.pattern.setToolTip("Glob pattern(s), comma separated, e.g. '*.tif, *.nii.gz'")
        self.dims = QComboBox()
        self.dims.addItems(["2D", "3D"])
        self.dims.currentTextChanged.connect(self._dims_changed)
        self.start_from = QComboBox()
        self.start_from.addItems([f"{SCRATCH} (tiny)", "default-2d", "default-3d", CHECKPOINT_TEXT])
        self.start_from.setToolTip(
            "Preset to train from scratch, bundled weights or a checkpoint to fine-tune"
        )
        ckpt_row, self.checkpoint = _path_row("checkpoint to fine-tune", directory=False)
        self._ckpt_row = ckpt_row
        self.start_from.currentTextChanged.connect(lambda t: ckpt_row.setVisible(t == CHECKPOINT_TEXT))
        ckpt_row.setVisible(False)
        self.patch_size = PatchSizeEdit(16)
        self.mask_ratio = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.mask_ratio.setRange(0.0, 0.95)
        self.mask_ratio.setDecimals(2)
        self.mask_ratio.setValue(0.75)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100000)
        self.epochs.setValue(20)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.batch_size.setValue(8)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1.5e-4)
        self.device = device_combo()
        out_row, self.output = _path_row("output folder for checkpoints")
        for label, widget in [
            ("images", folder_row),
            ("pattern", self.pattern),
            ("dimensions", self.dims),
            ("start from", self.start_from),
            ("", ckpt_row),
            ("patch size", self.patch_size),
            ("mask ratio", self.mask_ratio),
            ("epochs", self.epochs),
            ("batch size", self.batch_size),
            ("learning rate", self.lr),
            ("device", self.device),
            ("output", out_row),
        ]:
            form.addRow(label, widget)
        self.form_layout.addLayout(form)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue from the last checkpoint in the output folder")
        self.resume_button.clicked.connect(self.resume)
        self.button_layout.addWidget(self.resume_button)
        self.epoch_bar = QProgressBar()
        self.epoch_bar.setFormat("epoch %v/%m")
        self.epoch_bar.setValue(0)
        self.results_layout.addWidget(self.epoch_bar)
        self.eta = QLabel("")
        self.results_layout.addWidget(self.eta)
        self.plot = LossPlot()
        self.results_layout.addWidget(self.plot)
        self.stop_flag = threading.Event()
        self.last_update = None
        self.checkpoint_path: Path | None = None
        self.model_name: str | None = None
        self._dims_changed(self.dims.currentText())

    def _dims_changed(self, text: str) -> None:
        self.patch_size.set_dims(3 if text == "3D" else 2)
        if self.start_from.currentText().startswith("default-"):
            self.start_from.setCurrentText(f"default-{text[0]}d")

    # ----------------------------------------------------------------- config
    def build_config(self, resume: bool = False):
        """The :class:`~napari_mae.training.TrainConfig` the form describes.

        Raises
        ------
        ValueError
            If a folder is missing or the core rejects a value.
        """
        from napari_mae.training import TrainConfig

        folder = self.folder.text().strip()
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"Choose a folder of training images (got '{folder}').")
        output = self.output.text().strip() or str(Path(folder) / "napari-mae-training")
        start = self.start_from.currentText()
        init = None
        if start == CHECKPOINT_TEXT:
            init = self.checkpoint.text().strip()
            if not init:
                raise ValueError("Choose a checkpoint to fine-tune.")
        elif start.startswith("default-"):
            init = start
        patterns = tuple(p.strip() for p in self.pattern.text().split(",") if p.strip()) or ("*",)
        return TrainConfig(
            data_dir=folder,
            patterns=patterns,
            spatial_dims=3 if self.dims.currentText() == "3D" else 2,
            init=init,
            patch_size=self.patch_size.value(),
            mask_ratio=float(self.mask_ratio.value()),
            epochs=self.epochs.value(),
            batch_size=self.batch_size.value(),
            lr=float(self.lr.value()),
            device=self.device.currentText(),
            output_dir=output,
            resume=resume,
        )

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False) -> None:
        """Start (or resume) training in a worker thread."""
        try:
            config = self.build_config(resume=bool(resume))
        except (ValueError, TypeError, FileNotFoundError) as exc:
            self.notify_error(str(exc))
            return
        self.stop_flag.clear()
        stop_flag = self.stop_flag
        if not resume:
            self.plot.clear()
        self.epoch_bar.setRange(0, config.epochs)
        self._t_start = time.monotonic()
        self._n_start = None

        def work(progress):
            from napari_mae.training import train

            try:
                for update in train(config, stop=stop_flag.is_set):
                    yield update
                    progress(0, 0, "")  # raises Cancelled after Stop: the loop ends promptly
            finally:
                release_gpu_memory()

        self.start_job(work, description="Training", on_returned=self._trained, on_yielded=self.on_update)

    def resume(self) -> None:
        """Continue training from the last checkpoint in the output folder."""
        self.run(resume=True)

    def stop(self) -> None:
        """Ask training to stop after the current step."""
        self.stop_flag.set()
        super().stop()

    def _on_finished(self, job) -> None:
        super()._on_finished(job)
        if job is not self.job:
            return
        self.resume_button.setEnabled(True)
        if job.cancelled:
            self._offer_model("stopped")

    def on_update(self, update) -> None:
        """Show one training update (GUI thread)."""
        self.last_update = update
        epoch = getattr(update, "epoch", None)
        n_epochs = getattr(update, "n_epochs", None) or self.epoch_bar.maximum()
        step, n_steps = getattr(update, "step", None), getattr(update, "n_steps", None)
        if n_steps and step is not None:
            self.progress_bar.setRange(0, int(n_steps))
            self.progress_bar.setValue(int(step))
            self.progress_bar.setFormat("step %v/%m")
        if epoch is not None:
            self.epoch_bar.setRange(0, int(n_epochs))
            self.epoch_bar.setValue(int(epoch))
        x = (epoch or 0) + ((step or 0) / n_steps if n_steps else 0.0)
        loss = getattr(update, "loss", None)
        if loss is not None:
            self.plot.add("train", x, loss)
        val = getattr(update, "val_loss", None)
        if val is not None:
            self.plot.add("val", epoch + 1 if epoch is not None else x, val)
        ckpt = getattr(update, "checkpoint", None)
        if ckpt:
            self.checkpoint_path = Path(ckpt)
        # ETA from progress in epochs since this run started.
        if self._n_start is None:
            self._n_start, self._t_start = x, time.monotonic()
        elif x > self._n_start and n_epochs:
            rate = (time.monotonic() - self._t_start) / (x - self._n_start)
            self.eta.setText(f"epoch {x:.2f}/{n_epochs}, ETA {_fmt_seconds(rate * (n_epochs - x))}")

    def _trained(self, _result=None) -> None:
        self._offer_model("done")

    def _offer_model(self, how: str) -> None:
        path = self.checkpoint_path
        if path is None or not Path(path).exists():
            if how == "done":
                self.notify_error("Training ended without writing a checkpoint.")
            return
        self.model_name = registry.add_model(
            f"trained: {Path(path).parent.name}/{Path(path).name}", str(path)
        )
        self.notify_info(
            f"Training {how}; model '{self.model_name}' is offered in Reconstruction and Segmentation."
        )
