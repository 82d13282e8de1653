"""Training dock widget: MAE pretraining on a folder of images, or segmentation training from labels.

Two tasks share one form and one worker pattern:

* **MAE pretraining** (unlabelled images): builds a
  :class:`napari_mae.training.TrainConfig` and iterates
  :func:`napari_mae.training.train`; the model is offered in the MAE lists
  (Reconstruction, Segmentation's "MAE features") through
  :data:`~._registry.registry`.
* **Segmentation** (images + a folder of instance labels with the same file
  names): builds a :class:`napari_mae.training.segmentation.SegmentationConfig`
  (encoder to start from: 2D or 3D, bundled, pretrained, random or a checkpoint;
  frozen epochs; the crop size of the encoder's dimensionality, the other greyed out) and iterates
  :func:`~napari_mae.training.segmentation.train_segmentation`; the plot adds
  the validation acc@0.5 per epoch on a second axis, and the model joins the
  segmentation-model list (:data:`~._registry.segmenters`). Bad labels (missing
  or extra names, shapes, float ids, empty images) are refused by the core
  before anything is written, and shown as a notification.

Each yielded update drives the epoch/step progress bars, the ETA and the live
curves. Stop sets the flag the loop checks between steps; Resume continues from
the last checkpoint in the output folder. A folder of a single image is refused
with a message (nothing would be held out for validation). Cached CUDA memory
is released when a run ends.

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

from napari_mae._names import BEST, BUNDLED_SEGMENTERS, LAST, PRESET_NAMES, bundled_segmenter_path

from ._common import JobWidget, magic_field, torch_threads_leaving_a_core
from ._masking import PatchSizeEdit
from ._model_picker import CHECKPOINT_TEXT, device_combo
from ._reconstruction import release_gpu_memory
from ._registry import registry, segmenters

SCRATCH_SUFFIX = " (from scratch)"
FINETUNE_SUFFIX = " (fine-tune)"

#: The two tasks of the "task" combo.
TASK_MAE = "MAE pretraining \N{EM DASH} unlabelled images"
TASK_SEGMENTATION = "Segmentation \N{EM DASH} images + labels folder"

#: Where a segmentation run's encoder (or whole model) comes from: combo text suffixes.
ENCODER_SUFFIX = " (MAE encoder)"
RANDOM_SUFFIX = " (random encoder)"
CONTINUE_SUFFIX = " (continue training)"

#: Default output folder inside the image folder, per task.
DEFAULT_OUTPUT = {TASK_MAE: "napari-mae-training", TASK_SEGMENTATION: "napari-mae-segmentation"}


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
    """Train an MAE on unlabelled images, or a segmentation model on images + labels, with live curves.

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
        from napari_mae.training.segmentation import SegmentationConfig  # torch-free

        from ._loss_plot import LossPlot  # matplotlib only when the widget opens

        #: Each task's defaults: its config's, as ``napari-mae train`` (with or without --labels).
        self.task_defaults = {
            TASK_MAE: {f.name: f.default for f in dataclasses.fields(TrainConfig)},
            TASK_SEGMENTATION: {f.name: f.default for f in dataclasses.fields(SegmentationConfig)},
        }
        defaults = self.task_defaults[TASK_MAE]
        seg_defaults = self.task_defaults[TASK_SEGMENTATION]
        self.run_button.setToolTip("Start training a new model on the folder's images")
        self.stop_button.setToolTip(
            "Stop after the current step (shortcut Shift-X); the last checkpoint is kept for Resume"
        )
        form = QFormLayout()
        self.task = QComboBox()
        self.task.addItems([TASK_MAE, TASK_SEGMENTATION])
        self.task.setToolTip(
            "What to train: an MAE that learns what your images look like (no annotation needed), or a "
            "segmentation model that learns to outline objects from a folder of label images you made"
        )
        folder_row, self.folder = _path_row("folder of training images")
        self.folder.setToolTip("Folder with your images (its subfolders are searched too)")
        labels_row, self.labels = _path_row("folder of label images (same file names as the images)")
        self.labels.setToolTip(
            "Folder of instance label images, one per training image with the same file name "
            "(0 = background, one number per object), e.g. saved from napari Labels layers"
        )
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
        # ``activated`` is emitted only for the user's choices, never for setCurrentText.
        self.user_chose_start = False
        self.dims.activated.connect(self._user_chose)
        self.start_from.activated.connect(self._user_chose)
        self._dims_worker = None
        self.folder.editingFinished.connect(self.guess_dims)
        self.pattern.editingFinished.connect(self.guess_dims)
        ckpt_row, self.checkpoint = _path_row("checkpoint to start from", directory=False)
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
        self.adversarial_weight = magic_field(
            float(defaults["adversarial_weight"]),
            "FloatSpinBox",
            min=0.0,
            max=10.0,
            step=0.01,
            tooltip="Weight of a second network that judges whether the filled-in patches look real: "
            "above 0 the reconstructions come out sharper but training is slower and less stable "
            "(0 = off, the plain MAE; try 0.01 to 0.1)",
        )
        self.adversarial_weight.native.setDecimals(3)
        self.frozen_epochs = magic_field(
            int(seg_defaults["frozen_epochs"]),
            min=0,
            max=100000,
            tooltip="Epochs in which only the new decoder learns and the MAE encoder stays as it is; "
            "after them both learn (the encoder at a tenth of the learning rate)",
        )
        self.crop_size = magic_field(
            int(seg_defaults["crop_size"]),
            min=16,
            max=4096,
            tooltip="For a 2D encoder: side in pixels of the random pieces cut from each image for "
            "training, after the images are rescaled to the model's object size (larger: more context, "
            "slower)",
        )
        self.crop_size_3d = magic_field(
            int(seg_defaults["crop_size_3d"]),
            min=16,
            max=1024,
            tooltip="For a 3D encoder (default-3d, tiny-3d, a 3D MAE or checkpoint): side in voxels of "
            "the cubic pieces cut from each volume for training (a multiple of the patch size; validation "
            "pieces are twice as large). 2D models use the crop size above",
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
            "'napari-mae-training' (segmentation: 'napari-mae-segmentation') inside the image folder"
        )
        #: Rows shown for one task only: task -> [(label, field)].
        self._task_rows: dict[str, list[tuple[QLabel, QWidget]]] = {TASK_MAE: [], TASK_SEGMENTATION: []}
        rows = [
            ("task", self.task, None),
            ("images", folder_row, None),
            ("labels", labels_row, TASK_SEGMENTATION),
            ("pattern", self.pattern, TASK_MAE),
            ("dimensions", self.dims, None),
            ("start from", self.start_from, None),
            ("", ckpt_row, None),
            ("patch size", self.patch_size, TASK_MAE),
            ("mask ratio", self.mask_ratio.native, TASK_MAE),
            ("adversarial weight", self.adversarial_weight.native, TASK_MAE),
            ("frozen epochs", self.frozen_epochs.native, TASK_SEGMENTATION),
            ("crop size", self.crop_size.native, TASK_SEGMENTATION),
            ("3D crop size", self.crop_size_3d.native, TASK_SEGMENTATION),
            ("epochs", self.epochs.native, None),
            ("crops per image", self.crops_per_image.native, None),
            ("batch size", self.batch_size.native, None),
            ("learning rate", self.lr.native, None),
            ("device", self.device, None),
            ("output", out_row, None),
        ]
        for text, widget, task in rows:
            label = QLabel(text)
            form.addRow(label, widget)
            if task is not None:
                self._task_rows[task].append((label, widget))
            if widget is ckpt_row:
                self._ckpt_label = label  # hidden with its row, so the form keeps no empty gap
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
        self._run_task = TASK_MAE
        self._job_failed = False
        self._clear_plot_on_start = False
        self.task.currentTextChanged.connect(self._task_changed)
        segmenters.models_changed.connect(self._segmenters_changed)
        registry.models_changed.connect(self._segmenters_changed)
        self.destroyed.connect(lambda *_: _disconnect_lists(self._segmenters_changed))
        self._dims_changed(self.dims.currentText())
        self._task_changed(self.task.currentText())

    # ----------------------------------------------------------------- form
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

    @property
    def segmentation(self) -> bool:
        """Whether the segmentation task is chosen."""
        return self.task.currentText() == TASK_SEGMENTATION

    def _task_changed(self, task: str) -> None:
        """Show the chosen task's rows, its defaults and its start-from choices."""
        other = TASK_MAE if task == TASK_SEGMENTATION else TASK_SEGMENTATION
        for label, widget in self._task_rows[other]:
            label.setVisible(False)
            widget.setVisible(False)
        for label, widget in self._task_rows[task]:
            label.setVisible(True)
            widget.setVisible(True)
        # A shared field still at the other task's default takes this task's (values the user typed stay).
        new, old = self.task_defaults[task], self.task_defaults[other]
        for field, name, cast in (
            (self.epochs, "epochs", int),
            (self.crops_per_image, "samples_per_image", int),
            (self.batch_size, "batch_size", int),
            (self.lr, "lr", float),
        ):
            if cast(field.value) == cast(old[name]):
                field.value = cast(new[name])
        seg = task == TASK_SEGMENTATION
        if seg:
            self.dims.setCurrentText("2D")  # the decoder trains on 2D images (volumes: their planes)
        self.dims.setEnabled(not seg)
        self.dims.setToolTip(
            "Set by the encoder to start from: a 2D encoder trains on 2D images (and segments volumes "
            "plane by plane), a 3D one (default-3d, tiny-3d) on volumes"
            if seg
            else "Set from the first image of the folder until you choose"
        )
        self.run_button.setToolTip(
            "Start training a segmentation model on the images and their labels"
            if seg
            else "Start training a new model on the folder's images"
        )
        self._fill_start_from()
        self.guess_dims()  # the folder may have been chosen for the other task

    def _segmenters_changed(self) -> None:
        with contextlib.suppress(RuntimeError):  # the widget was closed meanwhile
            if self.segmentation:
                self._fill_start_from()

    def _fill_start_from(self) -> None:
        """The start-from choices of the task (and dimensionality); the current one stays if still listed."""
        from napari_mae.training import bundled_model_available, default_model

        current = self.start_from.currentText()
        self.start_from.blockSignals(True)
        self.start_from.clear()
        if self.segmentation:
            # training.segmentation trains 2D encoders on 2D labels and 3D ones on volumes
            items = [default_model(2) + ENCODER_SUFFIX]
            if bundled_model_available(default_model(3)):
                items.append(default_model(3) + ENCODER_SUFFIX)
            items += [name + ENCODER_SUFFIX for name in registry.model_names() if name in registry.models]
            items += [
                name + CONTINUE_SUFFIX
                for name in segmenters.model_names()
                if name in segmenters.models or bundled_segmenter_path(name).is_file()
            ]
            items += [p + RANDOM_SUFFIX for p in PRESET_NAMES[2] + PRESET_NAMES[3]] + [CHECKPOINT_TEXT]
            self.start_from.addItems(items)
            self.start_from.setToolTip(
                "Where the segmentation model starts: the encoder of an MAE (bundled default-2d, "
                "default-3d for volumes, or one you pretrained on your images) with a new decoder, a "
                "segmentation model to train further (the bundled nuclei model or yours), a random "
                "encoder (2D or 3D), or a checkpoint file"
            )
            default = default_model(2) + ENCODER_SUFFIX
        else:
            ndim = 3 if self.dims.currentText() == "3D" else 2
            default = default_model(ndim) + FINETUNE_SUFFIX
            self.start_from.addItems(
                [p + SCRATCH_SUFFIX for p in PRESET_NAMES[ndim]] + [default, CHECKPOINT_TEXT]
            )
            self.start_from.setToolTip(
                "Bundled weights to fine-tune (the default, as napari-mae train), "
                "a preset to train from scratch, or a checkpoint to fine-tune"
            )
            # The CLI's default; a scratch preset only where the bundled weights are missing.
            if not bundled_model_available(default_model(ndim)):
                default = self.start_from.itemText(0)
        self.start_from.setCurrentText(current if self.start_from.findText(current) >= 0 else default)
        self.start_from.blockSignals(False)
        self._start_from_changed(self.start_from.currentText())

    def _dims_changed(self, text: str) -> None:
        ndim = 3 if text == "3D" else 2
        self.patch_size.set_dims(ndim)
        self.patch_size.set_value((4, 8, 8) if ndim == 3 else (8, 8))
        if not self.segmentation:
            self._fill_start_from()

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
        from napari_mae.training import default_model

        with contextlib.suppress(RuntimeError):  # the widget was closed meanwhile
            if self.user_chose_start or (folder, patterns) != (self.folder.text().strip(), self._patterns()):
                return  # the user chose meanwhile, or the folder changed (its own guess follows)
            if guess is None:
                return
            if not self.segmentation:
                self.dims.setCurrentText(f"{guess[0]}D")
            elif self.start_from.findText(default := default_model(guess[0]) + ENCODER_SUFFIX) >= 0:
                self.start_from.setCurrentText(default)  # volumes: the bundled 3D encoder

    def _patterns(self) -> tuple[str, ...] | None:
        return tuple(p.strip() for p in self.pattern.text().split(",") if p.strip()) or None

    def _start_from_changed(self, text: str) -> None:
        self._ckpt_row.setVisible(text == CHECKPOINT_TEXT)
        self._ckpt_label.setVisible(text == CHECKPOINT_TEXT)
        self.patch_size.setEnabled(text.endswith(SCRATCH_SUFFIX))
        # Segmentation: the encoder decides 2D or 3D, so only its crop size applies
        # (both stay open where the widget cannot tell: a checkpoint file, a model of unknown patch).
        dims = self._start_dims() if self.segmentation else None
        if dims is not None:
            self.dims.setCurrentText(f"{dims}D")
        self.crop_size.enabled = dims != 3
        self.crop_size_3d.enabled = dims != 2

    def _start_dims(self) -> int | None:
        """Spatial dimensions of the segmentation run's start model, None where not known."""
        text = self.start_from.currentText()
        if text.endswith(RANDOM_SUFFIX):
            return 3 if text.removesuffix(RANDOM_SUFFIX) in PRESET_NAMES[3] else 2
        for suffix, models in ((ENCODER_SUFFIX, registry), (CONTINUE_SUFFIX, segmenters)):
            if text.endswith(suffix):
                patch = models.patch_sizes.get(text.removesuffix(suffix))
                return len(patch) if patch else None
        return None

    # ----------------------------------------------------------------- config
    def build_config(self, resume: bool = False, overwrite: bool = False):
        """The config the form describes: a ``TrainConfig`` (MAE) or a ``SegmentationConfig``.

        Raises
        ------
        ValueError
            If a folder is missing or the core rejects a value.
        """
        folder = self.folder.text().strip()
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"Choose a folder of training images (got '{folder}').")
        task = self.task.currentText()
        output = self.output.text().strip() or str(Path(folder) / DEFAULT_OUTPUT[task])
        common = dict(
            data_dir=folder,
            output_dir=output,
            epochs=int(self.epochs.value),
            samples_per_image=int(self.crops_per_image.value),
            batch_size=int(self.batch_size.value),
            lr=float(self.lr.value),
            device=self.device.currentText(),
            resume=resume,
            overwrite=overwrite,
        )
        if task == TASK_SEGMENTATION:
            return self._segmentation_config(common)
        from napari_mae.training import TrainConfig

        start = self.start_from.currentText()
        patch_size = None
        if start == CHECKPOINT_TEXT:
            model = self._checkpoint_text()
        elif start.endswith(SCRATCH_SUFFIX):
            model = start.removesuffix(SCRATCH_SUFFIX)
            patch_size = self.patch_size.value()
        else:
            model = start.removesuffix(FINETUNE_SUFFIX)
        return TrainConfig(
            **common,
            model=model,
            spatial_dims=3 if self.dims.currentText() == "3D" else 2,
            patch_size=patch_size,
            patterns=self._patterns(),
            mask_ratio=float(self.mask_ratio.value),
            adversarial_weight=float(self.adversarial_weight.value),
        )

    def _checkpoint_text(self) -> str:
        path = self.checkpoint.text().strip()
        if not path:
            raise ValueError("Choose a checkpoint file to start from.")
        return path

    def _segmentation_config(self, common: dict):
        from napari_mae.training.segmentation import SegmentationConfig

        labels = self.labels.text().strip()
        if not labels or not Path(labels).is_dir():
            raise ValueError(
                f"Choose the folder of label images (one per image, same file names; got '{labels}')."
            )
        if Path(labels).resolve() == Path(common["data_dir"]).resolve():
            raise ValueError(
                "The labels folder is the image folder: keep the label images in a folder of their own."
            )
        start = self.start_from.currentText()
        if start == CHECKPOINT_TEXT:
            model = self._checkpoint_text()
        elif start.endswith(CONTINUE_SUFFIX):
            name = start.removesuffix(CONTINUE_SUFFIX)
            model = (
                str(bundled_segmenter_path(name)) if name in BUNDLED_SEGMENTERS else segmenters.resolve(name)
            )
        elif start.endswith(RANDOM_SUFFIX):
            model = start.removesuffix(RANDOM_SUFFIX)
        else:
            model = registry.resolve(start.removesuffix(ENCODER_SUFFIX))
        return SegmentationConfig(
            **common,
            labels_dir=labels,
            model=model,
            frozen_epochs=int(self.frozen_epochs.value),
            crop_size=int(self.crop_size.value),
            crop_size_3d=int(self.crop_size_3d.value),
        )

    # ----------------------------------------------------------------- run
    def notify_error(self, message: str) -> None:
        """Show an error (napari notification and status line); a running job's error marks it failed."""
        if self.busy:
            self._job_failed = True
        super().notify_error(message)

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
        task = self._run_task = self.task.currentText()
        # The curves of the last run stay until this one has started (bad labels lose nothing).
        self._clear_plot_on_start = not resume
        self.plot.show_metric("validation acc@0.5" if task == TASK_SEGMENTATION else None)
        self.epoch_bar.setRange(0, config.epochs)
        self.epoch_bar.setValue(0)
        self.eta.setText("")
        self.checkpoint_path = None
        self.last_update = None
        self._job_failed = False
        self.output_dir = Path(config.output_dir)
        # The files the run reads: the MAE task's patterns and exclusions; segmentation takes every image.
        patterns = getattr(config, "patterns", None)
        exclude = getattr(config, "exclude", ())

        def work(progress):
            if task == TASK_SEGMENTATION:
                from napari_mae.training.segmentation import train_segmentation as train_fn
            else:
                from napari_mae.training import train as train_fn
            _check_more_than_one_image(config.data_dir, patterns, exclude)
            try:
                with torch_threads_leaving_a_core():
                    yield from train_fn(config, stop=stop_flag)
            finally:
                release_gpu_memory()
            # Read here, not on the GUI thread.
            return None if task == TASK_SEGMENTATION else _checkpoint_patch_size(Path(config.output_dir))

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
        elif self._job_failed:
            # Refused before the first step (bad labels, one image, ...): not "done in 0.1 s".
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("not started: see the message")

    def on_update(self, update) -> None:
        """Show one :class:`~napari_mae.training.TrainUpdate` (GUI thread)."""
        self.last_update = update
        kind = update.kind
        if kind == "start" and self._clear_plot_on_start:
            self.plot.clear()
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
        metric = (update.metrics or {}).get("val_acc50")
        if kind == "epoch" and metric is not None:
            self.plot.add("metric", update.epoch, metric)
        if update.checkpoint:
            self.checkpoint_path = Path(update.checkpoint)
        if kind in ("step", "epoch"):
            acc = f", val acc@0.5 {self.plot.metric[1][-1]:.3f}" if self.plot.metric[1] else ""
            self.eta.setText(
                f"epoch {update.epoch}/{update.n_epochs}, {update.images_per_s:.1f} crops/s{acc}, "
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
        best = self.output_dir / BEST
        path = best if kind == "finished" and best.is_file() else self.checkpoint_path
        if path is None or not Path(path).is_file():
            last = self.output_dir / LAST
            path = last if last.is_file() else None
        if path is None:
            self.notify_error("Training ended without writing a checkpoint.")
            return
        name = f"trained: {self.output_dir.name}/{Path(path).name}"
        if self._run_task == TASK_SEGMENTATION:
            self.model_name = segmenters.add_model(name, str(path))
            where = "the Segmentation widget's segmentation models"
        else:
            patch_size = _result if isinstance(_result, tuple) else None
            self.model_name = registry.add_model(name, str(path), patch_size=patch_size)
            where = "the Reconstruction and Segmentation widgets"
        self.notify_info(f"Training {kind}; model '{self.model_name}' is offered in {where}.")


def _disconnect_lists(callback) -> None:
    for emitter in (segmenters.models_changed, registry.models_changed):
        with contextlib.suppress(Exception):
            emitter.disconnect(callback)


def _check_more_than_one_image(data_dir, patterns, exclude) -> None:
    """Refuse a folder of a single image (worker thread): nothing could be held out for validation.

    Raises
    ------
    ValueError
        Naming the folder and its one image. No image at all is left to the core's own message.
    """
    from napari_mae.training.files import DEFAULT_PATTERNS, find_images

    try:
        files = find_images(data_dir, tuple(patterns or DEFAULT_PATTERNS), exclude=tuple(exclude))
    except (ValueError, FileNotFoundError):
        return  # none: training says so itself, with the patterns it searched
    if len(files) == 1:
        raise ValueError(
            f"{data_dir} holds one image ({files[0].name}): training needs at least two, one of them held "
            "out to check the model on an image it has not learnt from. Add images (or save crops of a "
            "large image as separate files) and Start again."
        )


def _free_folder(path: Path) -> Path:
    """``path-2``, ``path-3``, ...: the first that holds no training run."""
    i = 2
    while (candidate := path.with_name(f"{path.name}-{i}")).exists() and (candidate / LAST).is_file():
        i += 1
    return candidate


def _checkpoint_patch_size(folder: Path) -> tuple[int, ...] | None:
    """Patch size of the run's checkpoint (best.pt, else last.pt), or None (worker thread)."""
    for name in (BEST, LAST):
        with contextlib.suppress(Exception):  # the list works without it (Masking then uses the default)
            from napari_mae.io.checkpoint import load_checkpoint

            return tuple(int(p) for p in load_checkpoint(folder / name)["config"]["patch_size"])
    return None
