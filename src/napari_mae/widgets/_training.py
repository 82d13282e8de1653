"""Training dock widget: pre-train or fine-tune an MAE on a folder of images.

Builds a :class:`napari_mae.training.TrainConfig` from the form and iterates
:func:`napari_mae.training.train` in a superqt generator worker; each yielded
update drives the epoch/step progress bars, the ETA and the live loss curve
(train and validation). Stop sets the flag ``train`` checks between steps;
Resume continues from the last checkpoint in the output folder. When training
ends the model is offered in the Reconstruction and Segmentation widgets and
cached CUDA memory is released.

As ``napari-mae train``, it starts by default from the bundled model for the
data's dimensionality (:func:`napari_mae.training.default_model`): choosing a
folder reads its first image in a worker thread
(:func:`napari_mae.training.guess_spatial_dims`) and sets 2D/3D, unless the
user already chose the dimensions or the start model. Its defaults (all image
formats, epochs, crops, batch size, learning rate, mask ratio) are
:class:`~napari_mae.training.TrainConfig`'s, the CLI's too.

Start on an output folder that holds a run offers "overwrite", "new folder" or
"resume" instead of failing. The number fields are magicgui widgets; the
folder rows stay Qt (a line edit with a browse button that also guesses 2D/3D).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from napari_mae._names import LAST

from ._common import JobWidget, magic_field, torch_threads_leaving_a_core
from ._masking import PatchSizeEdit
from ._model_picker import CHECKPOINT_TEXT, device_combo
from ._reconstruction import release_gpu_memory
from ._registry import registry

#: Presets trained from scratch, per number of spatial dimensions (napari_mae.model.PRESETS).
PRESETS = {2: ("tiny-2d", "small-2d"), 3: ("tiny-3d", "small-3d")}
SCRATCH_SUFFIX = " (from scratch)"
FINETUNE_SUFFIX = " (fine-tune)"


def _path_row(placeholder: str, directory: bool = True) -> tuple[QWidget, QLineEdit]:
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    edit.setToolTip(placeholder[0].upper() + placeholder[1:])
    button = QPushButton("...")
    button.setMaximumWidth(30)
    button.setToolTip("Browse")

    def browse() -> None:
        if directory:
            path = QFileDialog.getExistingDirectory(row, placeholder, edit.text())
        else:
            path, _ = QFileDialog.getOpenFileName(row, placeholder, edit.text(), "Checkpoints (*.pt *.pth)")
        if path:
            edit.setText(path)
            edit.editingFinished.emit()  # as if typed: the Training widget looks at the folder

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

    def _epochs_changed(self, value: int) -> None:
        """Keep the idle epoch bar's total in step with the epochs box."""
        if not self.busy:
            self.epoch_bar.setRange(0, int(value))

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Start")
        from napari_mae.training import TrainConfig  # torch-free

        from ._loss_plot import LossPlot  # matplotlib only when the widget opens

        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        self.run_button.setToolTip("Start training a new model on the folder's images")
        self.stop_button.setToolTip(
            "Stop after the current step (shortcut Shift-X); the last checkpoint is kept for Resume"
        )
        form = QFormLayout()
        folder_row, self.folder = _path_row("folder of training images")
        self.folder.setToolTip("Folder with your images (its subfolders are searched too)")
        self.pattern = QLineEdit("")
        self.pattern.setPlaceholderText("all image formats")
        self.pattern.setToolTip(
            "Which files to use, e.g. '*.tif, *.nii.gz' (comma separated); empty = every image file "
            "(tif, png, jpg, nii, nii.gz, nrrd), as napari-mae train"
        )
        self.dims = QComboBox()
        self.dims.addItems(["2D", "3D"])
        self.dims.setToolTip("Set from the first image of the folder until you choose")
        self.dims.currentTextChanged.connect(self._dims_changed)
        self.start_from = QComboBox()
        self.start_from.setToolTip(
            "Bundled weights to fine-tune (the default, as napari-mae train), "
            "a preset to train from scratch, or a checkpoint to fine-tune"
        )
        # ``activated`` is emitted only for the user's choices, never for setCurrentText.
        self.user_chose_start = False
        self.dims.activated.connect(self._user_chose)
        self.start_from.activated.connect(self._user_chose)
        self._dims_worker = None
        self.folder.editingFinished.connect(self.guess_dims)
        self.pattern.editingFinished.connect(self.guess_dims)
        ckpt_row, self.checkpoint = _path_row("checkpoint to fine-tune", directory=False)
        self._ckpt_row = ckpt_row
        self.start_from.currentTextChanged.connect(self._start_from_changed)
        ckpt_row.setVisible(False)
        self.patch_size = PatchSizeEdit(8)
        self.patch_size.setToolTip(
            "Patch size of a preset trained from scratch (a trained model keeps its own)"
        )
        self.mask_ratio = magic_field(
            float(defaults["mask_ratio"]),
            "FloatSlider",
            min=0.0,
            max=0.95,
            step=0.01,
            tooltip="Share of each image's patches hidden while the model learns to fill them in "
            "(0.75 as in the MAE paper)",
        )
        self.epochs = magic_field(
            int(defaults["epochs"]),
            min=1,
            max=100000,
            tooltip="How many times training goes through all the images (more: better model, longer)",
        )
        self.crops_per_image = magic_field(
            int(defaults["samples_per_image"]),
            min=1,
            max=1000,
            tooltip="Random crops taken from each image per epoch (more for small folders)",
        )
        self.batch_size = magic_field(
            int(defaults["batch_size"]),
            min=1,
            max=4096,
            tooltip="Crops the model learns from at once: larger is faster on a GPU but needs more memory",
        )
        self.lr = magic_field(
            float(defaults["lr"]),
            "FloatSpinBox",
            min=1e-6,
            max=1.0,
            step=1e-4,
            tooltip="Learning rate: how big each learning step is (1e-3 suits most runs; lower it to "
            "fine-tune gently)",
        )
        self.lr.native.setDecimals(6)
        self.device = device_combo()
        out_row, self.output = _path_row("output folder for checkpoints")
        self.output.setToolTip(
            "Where checkpoints (last.pt, best.pt) and the loss log go; default: a folder "
            "'napari-mae-training' inside the image folder"
        )
        for label, widget in [
            ("images", folder_row),
            ("pattern", self.pattern),
            ("dimensions", self.dims),
            ("start from", self.start_from),
            ("", ckpt_row),
            ("patch size", self.patch_size),
            ("mask ratio", self.mask_ratio.native),
            ("epochs", self.epochs.native),
            ("crops per image", self.crops_per_image.native),
            ("batch size", self.batch_size.native),
            ("learning rate", self.lr.native),
            ("device", self.device),
            ("output", out_row),
        ]:
            form.addRow(label, widget)
        self.form_layout.addLayout(form)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue from the last checkpoint in the output folder")
        self.resume_button.clicked.connect(self.resume)
        self.button_layout.addWidget(self.resume_button)
        self.existing_run = self._existing_run_row()
        self.results_layout.addWidget(self.existing_run)
        self.epoch_bar = QProgressBar()
        self.epoch_bar.setFormat("epoch %v/%m")
        self.epoch_bar.setToolTip("Epochs completed")
        self.epoch_bar.setRange(0, self.epochs.value)
        self.epoch_bar.setValue(0)
        self.epochs.changed.connect(self._epochs_changed)
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

    def _existing_run_row(self) -> QWidget:
        """Hidden until Start meets a folder that holds a run: overwrite / new folder / resume."""
        row = QWidget()
        lay = QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        self.existing_label = QLabel("")
        self.existing_label.setWordWrap(True)
        lay.addWidget(self.existing_label, 1)
        self.overwrite_button = QPushButton("Overwrite")
        self.overwrite_button.setToolTip("Start afresh in this folder; its checkpoints are replaced")
        self.overwrite_button.clicked.connect(lambda: self._answer_existing("overwrite"))
        self.new_folder_button = QPushButton("New folder")
        self.new_folder_button.setToolTip("Start afresh in a new folder beside it (name-2, name-3, ...)")
        self.new_folder_button.clicked.connect(lambda: self._answer_existing("new folder"))
        self.resume_existing_button = QPushButton("Resume")
        self.resume_existing_button.setToolTip("Continue the run in this folder from its last checkpoint")
        self.resume_existing_button.clicked.connect(lambda: self._answer_existing("resume"))
        for button in (self.overwrite_button, self.new_folder_button, self.resume_existing_button):
            lay.addWidget(button)
        row.setVisible(False)
        return row

    def _answer_existing(self, choice: str) -> None:
        """Act on the existing-run question: ``"overwrite"``, ``"new folder"`` or ``"resume"``."""
        self.existing_run.setVisible(False)
        if choice == "resume":
            self.run(resume=True)
            return
        if choice == "new folder":
            self.output.setText(str(_free_folder(Path(self._pending_output))))
            self.run()
            return
        self.run(overwrite=True)

    def _dims_changed(self, text: str) -> None:
        from napari_mae.training import bundled_model_available, default_model

        ndim = 3 if text == "3D" else 2
        self.patch_size.set_dims(ndim)
        self.patch_size.set_value((4, 8, 8) if ndim == 3 else (8, 8))
        default = default_model(ndim)
        self.start_from.blockSignals(True)
        self.start_from.clear()
        self.start_from.addItems(
            [p + SCRATCH_SUFFIX for p in PRESETS[ndim]] + [default + FINETUNE_SUFFIX, CHECKPOINT_TEXT]
        )
        # The CLI's default; a scratch preset only where the bundled weights are missing.
        if bundled_model_available(default):
            self.start_from.setCurrentText(default + FINETUNE_SUFFIX)
        self.start_from.blockSignals(False)
        self._start_from_changed(self.start_from.currentText())

    def _user_chose(self, _index: int = 0) -> None:
        self.user_chose_start = True

    def guess_dims(self) -> None:
        """Set 2D/3D from the folder's first image (in a worker), unless the user chose already."""
        from superqt.utils import create_worker

        from napari_mae.training import guess_spatial_dims

        folder = self.folder.text().strip()
        if self.user_chose_start or not folder or not Path(folder).is_dir():
            return
        patterns = self._patterns()
        worker = create_worker(guess_spatial_dims, folder, patterns, _start_thread=False)
        worker.returned.connect(lambda guess: self._dims_guessed(guess, folder, patterns))
        self._dims_worker = worker
        worker.start()

    def _dims_guessed(self, guess, folder: str, patterns) -> None:
        with contextlib.suppress(RuntimeError):  # the widget was closed meanwhile
            if self.user_chose_start or (folder, patterns) != (self.folder.text().strip(), self._patterns()):
                return  # the user chose meanwhile, or the folder changed (its own guess follows)
            if guess is not None:
                self.dims.setCurrentText(f"{guess[0]}D")

    def _patterns(self) -> tuple[str, ...] | None:
        return tuple(p.strip() for p in self.pattern.text().split(",") if p.strip()) or None

    def _start_from_changed(self, text: str) -> None:
        self._ckpt_row.setVisible(text == CHECKPOINT_TEXT)
        self.patch_size.setEnabled(text.endswith(SCRATCH_SUFFIX))

    # ----------------------------------------------------------------- config
    def build_config(self, resume: bool = False, overwrite: bool = False):
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
        patch_size = None
        if start == CHECKPOINT_TEXT:
            model = self.checkpoint.text().strip()
            if not model:
                raise ValueError("Choose a checkpoint to fine-tune.")
        elif start.endswith(SCRATCH_SUFFIX):
            model = start.removesuffix(SCRATCH_SUFFIX)
            patch_size = self.patch_size.value()
        else:
            model = start.removesuffix(FINETUNE_SUFFIX)
        patterns = self._patterns()
        return TrainConfig(
            data_dir=folder,
            output_dir=output,
            model=model,
            spatial_dims=3 if self.dims.currentText() == "3D" else 2,
            patch_size=patch_size,
            patterns=patterns,
            mask_ratio=float(self.mask_ratio.value),
            epochs=int(self.epochs.value),
            samples_per_image=int(self.crops_per_image.value),
            batch_size=int(self.batch_size.value),
            lr=float(self.lr.value),
            device=self.device.currentText(),
            resume=resume,
            overwrite=overwrite,
        )

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False, overwrite: bool = False) -> None:
        """Start (or resume) training in a worker thread.

        An output folder that already holds a run is not an error: the widget
        asks (overwrite / new folder / resume) and nothing else changes.
        """
        if self.busy:
            self.notify_error("Training is running; press Stop first.")
            return
        self.existing_run.setVisible(False)
        try:
            config = self.build_config(resume=bool(resume), overwrite=bool(overwrite))
            config.validate()
            last = Path(config.output_dir) / LAST
            if resume and not last.is_file():
                raise ValueError(f"Nothing to resume: no {LAST} in {config.output_dir}.")
        except (ValueError, TypeError, FileNotFoundError) as exc:
            self.notify_error(str(exc))
            return
        if not resume and not overwrite and last.is_file():
            self._pending_output = str(config.output_dir)
            self.existing_label.setText(f"{config.output_dir} already holds a training run.")
            self.existing_run.setVisible(True)
            self.status.setText(
                f"{config.output_dir} already holds a run: overwrite it, start in a new folder, or resume it."
            )
            return
        self.stop_flag.clear()
        stop_flag = self.stop_flag
        if not resume:
            self.plot.clear()
        self.epoch_bar.setRange(0, config.epochs)
        self.epoch_bar.setValue(0)
        self.eta.setText("")
        self.checkpoint_path = None
        self.output_dir = Path(config.output_dir)

        def work(progress):
            from napari_mae.training import train

            try:
                with torch_threads_leaving_a_core():
                    yield from train(config, stop=stop_flag)
            finally:
                release_gpu_memory()
            return _checkpoint_patch_size(Path(config.output_dir))  # read here, not on the GUI thread

        if self.start_job(work, description="Training", on_returned=self._trained, on_yielded=self.on_update):
            self.resume_button.setEnabled(False)

    def resume(self) -> None:
        """Continue training from the last checkpoint in the output folder."""
        self.run(resume=True)

    def stop(self) -> None:
        """Ask training to stop before its next step; it writes ``last.pt`` for Resume."""
        if self.busy:
            self.stop_flag.set()
            self.status.setText("Stopping after this step...")

    def _on_finished(self, job) -> None:
        super()._on_finished(job)
        if job is not self.job:
            return
        self.resume_button.setEnabled(True)
        update = self.last_update
        if update is not None and update.kind in ("stopped", "failed"):
            # The run ended early by the stop flag (or a failure), not "done".
            self.progress_bar.setRange(0, max(int(update.n_steps), 1))
            self.progress_bar.setValue(int(update.step))
            self.progress_bar.setFormat(f"{update.kind} at step %v/%m")

    def on_update(self, update) -> None:
        """Show one :class:`~napari_mae.training.TrainUpdate` (GUI thread)."""
        self.last_update = update
        kind = update.kind
        if update.n_steps:
            self.progress_bar.setRange(0, int(update.n_steps))
            self.progress_bar.setValue(int(update.step))
            self.progress_bar.setFormat("step %v/%m")
        self.epoch_bar.setRange(0, int(update.n_epochs))
        self.epoch_bar.setValue(
            int(update.epoch if kind in ("epoch", "finished") else max(update.epoch - 1, 0))
        )
        steps_per_epoch = update.n_steps / max(update.n_epochs, 1)
        x = update.step / steps_per_epoch if steps_per_epoch else 0.0
        if kind == "step" and update.loss is not None:
            self.plot.add("train", x, update.loss)
        if kind == "epoch" and update.val_loss is not None:
            self.plot.add("val", update.epoch, update.val_loss)
        if update.checkpoint:
            self.checkpoint_path = Path(update.checkpoint)
        if kind in ("step", "epoch"):
            self.eta.setText(
                f"epoch {update.epoch}/{update.n_epochs}, {update.images_per_s:.1f} crops/s, "
                f"ETA {_fmt_seconds(update.eta_s)}"
            )
        if kind in ("start", "stopped", "failed", "finished") and update.message:
            self.status.setText(update.message)
        if kind == "failed":
            self.notify_error(update.message)
        if kind == "finished":
            self.eta.setText(f"finished: {update.n_epochs}/{update.n_epochs} epochs, step {update.step}")
        if kind == "stopped":
            # The bar counts completed epochs; say which one was under way, so both agree.
            done = max(update.epoch - 1, 0)
            self.eta.setText(
                f"stopped during epoch {update.epoch}/{update.n_epochs} ({done} complete), step {update.step}; "
                "Resume continues from here"
            )

    def _trained(self, _result=None) -> None:
        kind = getattr(self.last_update, "kind", "finished")
        best = self.output_dir / "best.pt"
        path = best if kind == "finished" and best.is_file() else self.checkpoint_path
        if path is None or not Path(path).is_file():
            last = self.output_dir / "last.pt"
            path = last if last.is_file() else None
        if path is None:
            self.notify_error("Training ended without writing a checkpoint.")
            return
        patch_size = _result if isinstance(_result, tuple) else None
        self.model_name = registry.add_model(
            f"trained: {self.output_dir.name}/{Path(path).name}", str(path), patch_size=patch_size
        )
        self.notify_info(
            f"Training {kind}; model '{self.model_name}' is offered in the Reconstruction and Segmentation widgets."
        )


def _free_folder(path: Path) -> Path:
    """``path-2``, ``path-3``, ...: the first that holds no training run."""
    i = 2
    while (candidate := path.with_name(f"{path.name}-{i}")).exists() and (candidate / LAST).is_file():
        i += 1
    return candidate


def _checkpoint_patch_size(folder: Path) -> tuple[int, ...] | None:
    """Patch size of the run's checkpoint (best.pt, else last.pt), or None (worker thread)."""
    from napari_mae._names import BEST

    for name in (BEST, LAST):
        with contextlib.suppress(Exception):  # the list works without it (Masking then uses the default)
            from napari_mae.io.checkpoint import load_checkpoint

            return tuple(int(p) for p in load_checkpoint(folder / name)["config"]["patch_size"])
    return None
