"""Segmentation dock widget: instance labels, automatic or from scribbles.

Calls :func:`napari_mae.segmentation.segment_instances` in a worker thread. With
a scribbles Labels layer (1 = background, 2 = foreground) the classifier is
trained from the strokes; without one the image is segmented automatically. The
object radius and threshold it chose are shown and can be overridden. Live mode
re-runs (debounced) whenever the scribbles change. The result is a Labels layer
``"<name> labels"`` with the input's scale and units, whose ``features`` table
(:func:`napari_mae.measure.object_table`, also shown in the widget and exported
as CSV) gives each object's size, centroid and mean intensity in physical units.

Shortcuts (:data:`~._shortcuts.SHORTCUTS`): Shift-S segments, Shift-N switches
the scribble label between background (1) and objects (2), Shift-X stops.

**Fine-tune** trains the chosen segmentation model a little further on the image
(:func:`napari_mae.segmentation.finetune.finetune`, in a worker, for the seconds in
the box beside it) from the scribbles layer and from the objects the user corrected
in the labels result layer: every id whose pixels were painted or changed since the
widget last wrote that layer counts as one object corrected *whole*, and pixels
whose object was erased (painted 0) count as background strokes. The labels layer
follows the training live (a few times a minute); Stop keeps the best model so
far. The new model is saved in the user's model folder (:func:`finetuned_folder`),
added to the segmentation-model list (:data:`~._registry.segmenters`, listed after
restarts) and selected, the previous one staying in the list; the image is then
segmented with it.

The radius and threshold boxes stay hand-built Qt: their "auto (last: ...)"
special value text has no magicgui equivalent.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_mae._names import PSEUDO_SOURCES
from napari_mae.measure import object_table, write_table_csv

from ._common import (
    ImageJobWidget,
    LayerCombo,
    channel_axis_combo,
    magic_field,
    time_mode_combo,
    torch_threads_leaving_a_core,
)
from ._layers import UserInputError, add_or_update
from ._model_picker import ModelPicker
from ._registry import config_dir, segmenters

#: Scribble label values (the core's convention).
BACKGROUND, FOREGROUND = 1, 2

#: Rows shown in the objects table (the layer's ``features`` holds them all).
MAX_TABLE_ROWS = 500

#: Share of the image covered by automatic objects above which the status warns (issue 12.15).
COVERAGE_WARNING = 0.4


def _auto_spin(decimals: int, maximum: float, tooltip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setDecimals(decimals)
    spin.setRange(0.0, maximum)
    spin.setSpecialValueText("auto")
    spin.setValue(0.0)
    spin.setToolTip(tooltip)
    return spin


class SegmentationWidget(ImageJobWidget):
    """Segment every object of an image into a Labels layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Segment")
        self.run_button.setToolTip("Find and label every object of the chosen image (shortcut Shift-S)")
        form = QFormLayout()
        self.image = LayerCombo(napari_viewer, (Image,))
        self.image.setToolTip("The image to segment")
        self.channel = channel_axis_combo()
        self.time_mode = time_mode_combo()
        self.scribbles = LayerCombo(napari_viewer, (Labels,), none_text="none (automatic)")
        self.scribbles.setToolTip(
            "Optional strokes that teach the segmenter: paint label 1 on background and 2 on objects; "
            "'none' segments automatically"
        )
        self.new_scribbles = QPushButton("New scribbles")
        self.new_scribbles.setToolTip(
            "Add an empty layer to paint on: 1 = background, 2 = objects (Shift-N switches the label)"
        )
        self.new_scribbles.clicked.connect(self.add_scribbles_layer)
        row = QWidget()
        row_layout = QHBoxLayout(row)
        row_layout.setContentsMargins(0, 0, 0, 0)
        row_layout.addWidget(self.scribbles, 1)
        row_layout.addWidget(self.new_scribbles)
        self.method = magic_field(
            "auto",
            choices=("auto", "learned", "classical"),
            tooltip="learned: a trained network finds the objects (MAE encoder + decoder; the bundled "
            "default-2d knows fluorescent nuclei); classical: size and brightness rules estimated per "
            "image; auto: learned with the model named below, or with the bundled nuclei model on a "
            "single-channel 2D image, falling back to classical where that model is unsure of the image "
            "(the status says so); classical with scribbles or a threshold set, and otherwise",
        )
        self.segmenter = SegmenterField(
            "Segmentation model of the learned method: default-2d (bundled, fluorescent nuclei), the "
            "models you trained or fine-tuned (listed after a restart too), or type the path of a model "
            "(napari-mae train --labels, napari-mae finetune)"
        )
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.setToolTip(
            "Teach the segmentation model your image: trains it a little further from the scribbles "
            "(1 = background, 2 = objects) and from the objects you corrected in the labels layer, then "
            "saves it as a new model in the list (the previous one stays) and segments with it"
        )
        self.finetune_button.clicked.connect(self.finetune)
        self.finetune_seconds = QSpinBox()
        self.finetune_seconds.setRange(5, 3600)
        self.finetune_seconds.setValue(60)
        self.finetune_seconds.setSuffix(" s")
        self.finetune_seconds.setToolTip(
            "How long fine-tuning runs (seconds, preparation included); Stop ends it earlier and keeps "
            "the best model so far"
        )
        self.pseudo_source = QComboBox()
        for source in PSEUDO_SOURCES:
            self.pseudo_source.addItem(f"pseudo-labels: {source}", source)
        self.pseudo_source.setToolTip(
            "Pseudo-labels away from your strokes: the model's confident predictions (model), the "
            "classical pipeline's objects with your strokes (classical), or those where the model "
            "agrees (agreement); which is best depends on the data (see the README)"
        )
        finetune_row = QWidget()
        finetune_layout = QHBoxLayout(finetune_row)
        finetune_layout.setContentsMargins(0, 0, 0, 0)
        finetune_layout.addWidget(self.finetune_button)
        finetune_layout.addWidget(self.finetune_seconds)
        finetune_layout.addWidget(self.pseudo_source)
        self.use_model = QCheckBox("MAE features")
        self.use_model.setToolTip(
            "Also let the scribble classifier use what the trained network sees in the image "
            "(slower; helps on textured objects)"
        )
        self.model = ModelPicker()
        self.model.setEnabled(False)
        self.use_model.toggled.connect(self.model.setEnabled)
        self.radius = _auto_spin(
            3,
            1e6,
            "Typical object radius in the image's units (e.g. µm); 'auto' estimates it from the image",
        )
        self.threshold = _auto_spin(
            4,
            1e6,
            "How bright a pixel must be to belong to an object (on the normalised image); "
            "'auto' chooses it (Otsu's method, or 0.5 of the classifier's score with scribbles)",
        )
        self.polarity = magic_field(
            "auto",
            choices=("auto", "bright", "dark"),
            tooltip="Objects brighter (fluorescence) or darker (brightfield, stained tissue) than the "
            "background; 'auto' detects it (set it when objects cover most of the image)",
        )
        self.use_estimates = QPushButton("Keep estimates")
        self.use_estimates.setToolTip("Copy the last estimated radius and threshold into the boxes above")
        self.use_estimates.clicked.connect(self._keep_estimates)
        self.use_estimates.setEnabled(False)
        self.live = QCheckBox("live: re-run when scribbles change")
        self.live.setToolTip("Segment again a moment after each stroke you paint")
        self.live.toggled.connect(self._live_toggled)
        self.export_button = QPushButton("Export table...")
        self.export_button.setToolTip("Save the object table (size, centroid, mean intensity) as a CSV file")
        self.export_button.clicked.connect(self.export_table)
        self.export_button.setEnabled(False)
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel)
        form.addRow("4D input", self.time_mode)
        form.addRow("method", self.method.native)
        form.addRow("segmentation model", self.segmenter.native)
        form.addRow("", finetune_row)
        form.addRow("scribbles", row)
        form.addRow(self.use_model, self.model)
        form.addRow("object radius", self.radius)
        form.addRow("threshold", self.threshold)
        form.addRow("objects", self.polarity.native)
        form.addRow(self.use_estimates, self.live)
        self.form_layout.addLayout(form)
        self.table = QTableWidget(0, 0)
        self.table.setMinimumHeight(220)
        # No row numbers beside the 'label' column (they would repeat it); columns as wide as their text.
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setToolTip("One row per object; the Labels layer's features hold the same table")
        self.results_layout.addWidget(self.table)
        self.results_layout.addWidget(self.export_button)
        self.labels_layer = None
        self._written = None  # (layer, copy of the labels this widget last wrote into it)
        self._finetune_stop: threading.Event | None = None
        self.finetune_result = None  # the last fine-tuning's final update
        #: Further :class:`~napari_mae.segmentation.finetune.FinetuneConfig` settings (the seconds
        #: come from the box), e.g. ``{"encoder_blocks": 2}``; tests use tiny budgets.
        self.finetune_options: dict = {}
        self.info: dict = {}
        self.features: dict = {}
        self.debounce = QTimer(self)
        self.debounce.setSingleShot(True)
        self.debounce.setInterval(600)
        self.debounce.timeout.connect(self._live_run)
        self._watched = None
        self._rerun = False
        self.scribbles.currentIndexChanged.connect(self._watch_scribbles)
        self.image.currentIndexChanged.connect(self._image_changed)
        self._image_changed()

    def _image_changed(self, *_) -> None:
        layer = self.image.value()
        if layer is not None:
            spatial = layer.ndim - int(layer.ndim == 4)  # a 4D layer is (T, Z, Y, X)
            self.model.set_default_for_dims(3 if spatial >= 3 and min(layer.data.shape[-3:]) > 6 else 2)
        if self.table.rowCount() == 0:
            self._show_empty_table()

    def _show_empty_table(self) -> None:
        """The columns a run will fill, for the chosen image (no numbered placeholder columns)."""
        try:
            prep = self.prepared_image(for_run=False)
        except (UserInputError, ValueError):
            prep = None
        ndim = prep.spatial_dims if prep is not None else 2
        spacing = prep.spacing if prep is not None else None
        table = object_table(np.zeros((1,) * ndim, np.int32), np.zeros((1,) * ndim), spacing=spacing)
        self._fill_table(table, *_size_header(ndim, prep.units if prep is not None else "px"))

    # ----------------------------------------------------------------- shortcuts
    def next_scribble_label(self) -> None:
        """Switch the scribbles layer's label between background (1) and objects (2) (Shift-N)."""
        layer = self.scribbles.value()
        if layer is None:
            self.status.setText("No scribbles layer: press 'New scribbles' first.")
            return
        layer.selected_label = BACKGROUND if layer.selected_label == FOREGROUND else FOREGROUND
        name = "background" if layer.selected_label == BACKGROUND else "objects"
        self.status.setText(f"Painting label {layer.selected_label} ({name}).")

    # ----------------------------------------------------------------- scribbles
    def add_scribbles_layer(self) -> Labels | None:
        """Add an empty scribbles layer over the image, ready to paint objects (2)."""
        try:
            prep = self.prepared_image(for_run=False)
        except (UserInputError, ValueError) as exc:
            self.notify_error(str(exc))
            return None
        layer = self.viewer.add_labels(
            np.zeros(prep.spatial_shape, dtype=np.uint8),
            name=f"{prep.name} scribbles",
            **prep.spatial_kwargs(),
        )
        layer.selected_label = FOREGROUND
        layer.brush_size = max(3, min(prep.spatial_shape[-2:]) // 100)
        layer.mode = "paint"
        self.scribbles.set_value(layer)
        self.status.setText("Paint objects with label 2 and background with label 1.")
        return layer

    def _watch_scribbles(self, *_) -> None:
        if self._watched is not None:
            for emitter in (self._watched.events.paint, self._watched.events.data):
                with contextlib.suppress(RuntimeError, TypeError, ValueError):
                    emitter.disconnect(self._scribbles_changed)
        self._watched = self.scribbles.value()
        if self._watched is not None:
            self._watched.events.paint.connect(self._scribbles_changed)
            self._watched.events.data.connect(self._scribbles_changed)

    def _scribbles_changed(self, event=None) -> None:
        if self.live.isChecked():
            self.debounce.start()

    def _live_toggled(self, on: bool) -> None:
        if on:
            self.debounce.start()
        else:
            self.debounce.stop()

    def _live_run(self) -> None:
        if self._finetune_stop is not None:  # painting while fine-tuning: the strokes were read
            return
        if self.busy:  # re-run once the current job has stopped
            self._rerun = True
            self.stop()
            return
        self.run()

    def _on_finished(self, job) -> None:
        super()._on_finished(job)
        if job is self.job:
            self._finetune_stop = None
            self.finetune_button.setEnabled(True)
        if job is self.job and self._rerun:
            self._rerun = False
            self.debounce.start()

    def _keep_estimates(self) -> None:
        if self.info:
            self.radius.setValue(float(self.info.get("radius", 0.0) or 0.0))
            self.threshold.setValue(max(0.0, float(self.info.get("threshold", 0.0) or 0.0)))

    # ----------------------------------------------------------------- run
    def run(self) -> None:
        """Segment the chosen image in a worker thread."""
        layer = self.image.value()
        scribbles_layer = self.scribbles.value()
        try:
            prep = self.prepared_image()
            scribbles = None
            if scribbles_layer is not None:
                scribbles = np.asarray(scribbles_layer.data)
                if scribbles.shape != prep.spatial_shape:
                    raise UserInputError(
                        f"Scribbles '{scribbles_layer.name}' have shape {scribbles.shape}, the image "
                        f"{prep.spatial_shape}; use 'New scribbles' to make a matching layer."
                    )
                if not ((scribbles == BACKGROUND).any() and (scribbles >= FOREGROUND).any()):
                    raise UserInputError("Paint both background (label 1) and objects (label 2) scribbles.")
                scribbles = scribbles.copy()
            method = self.method.value
            if scribbles is not None and method == "learned":
                raise UserInputError(
                    "The learned method takes no scribbles: choose 'classical' or 'auto', or clear the "
                    "scribbles layer."
                )
            named = self.segmenter.spec()
            if scribbles is None:
                model = (named or "default-2d") if method == "learned" else (named or None)
                if method == "classical":
                    model = None
            else:
                model = self.model.spec() if self.use_model.isChecked() else None
        except (UserInputError, ValueError) as exc:
            self.notify_error(str(exc))
            return
        radius = self.radius.value() or None
        threshold = self.threshold.value() or None
        polarity = self.polarity.value
        bright_objects = None if polarity == "auto" else polarity == "bright"
        n = len(prep.frames)

        def work(progress):
            from napari_mae.segmentation import segment_instances

            labels, infos = [], []
            # MAE features run single-threaded on CPU already (features._one_torch_thread_on_cpu);
            # the decoder (learned, or auto without scribbles) gets all cores but the GUI thread's.
            decoder = scribbles is None and method != "classical"
            with torch_threads_leaving_a_core() if decoder else contextlib.nullcontext():
                for i in range(n):

                    def frame_progress(done, total, message, i=i):
                        progress(i * total + done, n * total, message)

                    lab, info = segment_instances(
                        prep.frame(i, fill_nan=False),
                        scribbles=scribbles,
                        method=method,
                        model=model,
                        spacing=prep.spacing,
                        channel_axis=prep.channel_axis,
                        object_radius=radius,
                        threshold=threshold,
                        bright_objects=bright_objects,
                        progress=frame_progress,
                    )
                    labels.append(lab)
                    infos.append(info)
            tables = [
                object_table(
                    lab,
                    prep.frame(i),
                    spacing=prep.spacing,
                    t=(i if n > 1 else prep.time_point),
                )
                for i, lab in enumerate(labels)
            ]
            features = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
            return labels, infos, features

        # The scan's voxel-to-world affine goes with the labels, so File > Save as NIfTI overlays it.
        affine = (layer.metadata or {}).get("voxel_affine")

        def done(result) -> None:
            self.show_result(prep, *result, metadata={} if affine is None else {"voxel_affine": affine})

        layers = [layer] if scribbles_layer is None else [layer, scribbles_layer]
        self.start_job(work, description="Segmenting", on_returned=done, layers=layers)

    def show_result(self, prep, labels, infos, features, metadata=None) -> None:
        """Add the labels layer and fill the estimates and the objects table (GUI thread)."""
        data = prep.to_layer_layout(labels)
        features_df = _to_dataframe(features)
        # A "current time point" result has a singleton T axis at its time point (drawn there only).
        kwargs = prep.output_kwargs()
        self.labels_layer = add_or_update(
            self.viewer,
            "labels",
            data,
            f"{prep.name} labels",
            features=features_df,
            metadata=dict(metadata or {}),
            **kwargs,
        )
        self._remember_written()
        self.export_button.setEnabled(True)
        info = infos[0]
        self.info = info
        self.radius.setSpecialValueText(f"auto (last: {_fmt(info.get('radius'))})")
        self.threshold.setSpecialValueText(f"auto (last: {_fmt(info.get('threshold'))})")
        self.features = features
        self.use_estimates.setEnabled(True)
        n_objects = sum(int(i.get("n_objects", 0)) for i in infos)
        size_key, size_header = _size_header(prep.spatial_dims, prep.units)
        sizes = features[size_key]
        unit = prep.units
        power = "²" if prep.spatial_dims == 2 else "³"
        if info.get("method") == "learned":
            text = (
                f"{n_objects} objects (learned, model {info.get('model', '')}); "
                f"radius {_fmt(info.get('radius_found') or info.get('radius'))} {unit}"
            )
        else:
            text = (
                f"{n_objects} objects ({info.get('mode', '')}, classical); radius "
                f"{_fmt(info.get('radius'))} {unit}, threshold {_fmt(info.get('threshold'))}"
            )
        per_frame = [str(i.get("method", "")) for i in infos]
        if len(set(per_frame)) > 1:  # auto decides per frame of a time series
            text += "; " + ", ".join(f"{m} on {per_frame.count(m)} frames" for m in sorted(set(per_frame)))
        if info.get("ambiguity") is not None and info.get("fallback"):
            text += (
                f" (the bundled model was unsure here: {info['ambiguity']:.0%} of its foreground ambiguous)"
            )
        elif info.get("fallback"):
            text += f" ({info['fallback']})"  # why auto did not try the decoder
        if len(sizes):
            text += f"; median {size_key} {np.median(sizes):.4g} {unit}{power}"
        work = info.get("working_shape")
        if work is not None and tuple(work) != tuple(np.shape(labels)[-len(work) :]):
            # Large objects are segmented on a shrunk grid (segmentation.working_shape).
            text += f"; segmented on a {' x '.join(str(n) for n in work)} grid"
        if info.get("message"):
            text += f". {info['message']}"
        coverage = float(np.mean([np.count_nonzero(lab) / max(lab.size, 1) for lab in labels]))
        if info.get("mode") == "automatic" and coverage > COVERAGE_WARNING:
            text += (
                f". The {n_objects} object{'s' if n_objects != 1 else ''} cover {coverage:.0%} of the image: "
                "automatic mode probably took the background or the whole body/tissue for objects. "
                "Paint scribbles (New scribbles: 2 on objects, 1 on background), or set 'objects' to "
                "bright or dark"
            )
        self.status.setText(text)
        self.notify_notes(prep.notes)
        self._fill_table(features, size_key, size_header)

    # ----------------------------------------------------------------- fine-tuning
    def _remember_written(self) -> None:
        """Keep a copy of the labels this widget wrote, to tell the user's corrections from them."""
        layer = self.labels_layer
        self._written = None if layer is None else (layer, np.array(layer.data, copy=True))

    def corrected_objects(self, prep) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The user's corrections in the labels result layer since this widget last wrote it.

        Returns
        -------
        corrected : ndarray of int32 or None
            The objects (ids) with any pixel painted or changed, whole; 0 elsewhere.
        erased : ndarray of bool or None
            Pixels of an object that were painted 0 (background).
        Both have ``prep.spatial_shape``; None when there is no such layer or no change.
        """
        if self._written is None:
            return None, None
        layer, before = self._written
        if layer is not self.labels_layer or layer not in self.viewer.layers:
            return None, None
        now = np.asarray(layer.data)
        if now.shape != before.shape or now.size != int(np.prod(prep.spatial_shape)):
            return None, None
        now, before = now.reshape(prep.spatial_shape), before.reshape(prep.spatial_shape)
        changed = now != before
        if not changed.any():
            return None, None
        ids = np.unique(now[changed])
        ids = ids[ids > 0]
        corrected = np.where(np.isin(now, ids), now, 0) if ids.size else None
        erased = changed & (now == 0)
        return corrected, (erased if erased.any() else None)

    def finetune(self) -> None:
        """Fine-tune the chosen segmentation model on the image from the scribbles and corrections."""
        layer = self.image.value()
        scribbles_layer = self.scribbles.value()
        try:
            prep = self.prepared_image()
            if len(prep.frames) != 1:
                raise UserInputError("Fine-tune on one time point: set '4D input' to the current time point.")
            if scribbles_layer is None:
                raise UserInputError(
                    "Fine-tuning learns from scribbles: press 'New scribbles' and paint objects (2) and "
                    "background (1)."
                )
            scribbles = np.asarray(scribbles_layer.data)
            if scribbles.shape != prep.spatial_shape:
                raise UserInputError(
                    f"Scribbles '{scribbles_layer.name}' have shape {scribbles.shape}, the image "
                    f"{prep.spatial_shape}; use 'New scribbles' to make a matching layer."
                )
            if scribbles.dtype.kind == "i" and scribbles.size and scribbles.min() < 0:
                raise UserInputError(f"Scribbles '{scribbles_layer.name}' hold negative labels.")
            scribbles = scribbles.astype(np.uint8 if scribbles.max(initial=0) < 256 else np.int64)
            corrected, erased = self.corrected_objects(prep)
            if erased is not None:
                scribbles = np.where((scribbles == 0) & erased, 1, scribbles).astype(scribbles.dtype)
            model = self.segmenter.spec() or "default-2d"
        except (UserInputError, ValueError) as exc:
            self.notify_error(str(exc))
            return
        seconds = float(self.finetune_seconds.value())
        options = {
            "seconds": seconds,
            "pseudo_source": self.pseudo_source.currentData(),
            **self.finetune_options,
        }
        radius = self.radius.value() or None  # a radius the user set wins, and the model keeps it
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = _free_path(finetuned_folder() / f"{_safe(prep.name)}-{stamp}.pt")
        stop = threading.Event()

        def work(progress):
            from napari_mae.segmentation import segment_instances
            from napari_mae.segmentation.finetune import FinetuneConfig, finetune

            frame = prep.frame(0, fill_nan=False)
            final = None
            with torch_threads_leaving_a_core():
                for update in finetune(
                    frame,
                    scribbles,
                    out=out,
                    model=model,
                    corrected=corrected,
                    spacing=prep.spacing,
                    channel_axis=prep.channel_axis,
                    object_radius=radius,
                    config=FinetuneConfig(**options),
                    stop=stop,
                ):
                    final = update
                    progress(min(int(update.elapsed_s), int(seconds)), int(seconds), _progress_text(update))
                    if update.kind in ("prepared", "evaluated"):
                        yield update
                if final is None or final.checkpoint is None:
                    return final, None
                progress(int(seconds), int(seconds), "segmenting with the fine-tuned model")
                lab, info = segment_instances(
                    frame, method="learned", model=str(final.checkpoint), spacing=prep.spacing,
                    channel_axis=prep.channel_axis,
                )  # fmt: skip
            table = object_table(lab, prep.frame(0), spacing=prep.spacing, t=prep.time_point)
            return final, ([lab], [info], table)

        def on_update(update) -> None:
            if update.message:
                self.status.setText(update.message)
            if update.labels is not None:
                data = prep.to_layer_layout([update.labels])
                layer = self.labels_layer
                if layer is not None and layer in self.viewer.layers and layer.data.shape == data.shape:
                    layer.data = data  # one refresh (add_or_update also resets scale, units...)
                else:
                    self.labels_layer = add_or_update(
                        self.viewer, "labels", data, f"{prep.name} labels", **prep.output_kwargs()
                    )
                self._remember_written()

        def done(result) -> None:
            final, segmented = result
            self.finetune_result = final
            if final is None or final.checkpoint is None:
                message = final.message if final is not None else "fine-tuning ended without a result"
                if final is not None and final.kind == "stopped":
                    self.notify_info(f"Fine-tuning {message}")
                else:
                    self.notify_error(f"Fine-tuning {message}")
                return
            name = segmenters.add_model(f"fine-tuned: {prep.name} {stamp}", str(final.checkpoint))
            self.segmenter.value = name
            if segmented is not None:
                self.show_result(prep, *segmented)
            self.notify_info(
                f"Fine-tuning {final.message}. Model '{name}' is selected; the previous model stays in "
                "the list. Choose scribbles 'none' and method 'learned' to segment other images with it."
            )

        self._finetune_stop = stop
        self.finetune_result = None
        job = self.start_job(
            work,
            description="Fine-tuning",
            on_returned=done,
            on_yielded=on_update,
            layers=[layer, scribbles_layer],
        )
        if job is None:
            self._finetune_stop = None
            return
        self.finetune_button.setEnabled(False)

    def stop(self) -> None:
        """Stop the running job; fine-tuning stops after its current step and keeps the best model."""
        if self.busy and self._finetune_stop is not None:
            self._finetune_stop.set()
            self.status.setText("Stopping: the best model so far is saved...")
            return
        super().stop()

    def export_table(self, path=None):
        """Save the last result's object table as CSV (asks for a file name unless ``path`` is given)."""
        layer = self.labels_layer
        if layer is None or layer not in self.viewer.layers:
            self.notify_error("Nothing to export: segment an image first.")
            return None
        if not path:
            default = f"{layer.name.replace(' ', '_')}.csv"
            path, _ = QFileDialog.getSaveFileName(self, "Export object table", default, "CSV (*.csv)")
            if not path:
                return None
        table = {k: layer.features[k].to_numpy() for k in layer.features.columns}
        written = write_table_csv(path, table)
        self.notify_info(f"Wrote {len(layer.features)} objects to {written}")
        return written

    def _fill_table(self, features: dict, size_key: str, size_header: str) -> None:
        keys = list(features)
        headers = [size_header if k == size_key else k for k in keys]
        n = min(len(features[keys[0]]), MAX_TABLE_ROWS) if keys else 0
        self.table.clear()
        self.table.setColumnCount(len(keys))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setRowCount(n)
        for r in range(n):
            for c, k in enumerate(keys):
                v = features[k][r]
                text = f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)
                self.table.setItem(r, c, QTableWidgetItem(text))


class SegmenterField:
    """The segmentation models of the learned method (:data:`~._registry.segmenters`), or a typed path.

    An editable combo box kept in sync with the registry; ``value`` is its text.
    """

    def __init__(self, tooltip: str) -> None:
        self.native = QComboBox()
        self.native.setEditable(True)
        self.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.native.setToolTip(tooltip)
        self.native.lineEdit().setPlaceholderText("default-2d")
        self.native.lineEdit().setToolTip(tooltip)
        segmenters.models_changed.connect(self.refresh)
        self.native.destroyed.connect(lambda *_: _disconnect_quietly(segmenters.models_changed, self.refresh))
        self.refresh()

    def refresh(self) -> None:
        """Re-list the models, keeping the current text."""
        current = self.native.currentText()
        self.native.blockSignals(True)
        self.native.clear()
        self.native.addItems(segmenters.model_names())
        self.native.setEditText(current)
        self.native.blockSignals(False)

    @property
    def value(self) -> str:
        return self.native.currentText()

    @value.setter
    def value(self, text) -> None:
        idx = self.native.findText(str(text))
        if idx >= 0:
            self.native.setCurrentIndex(idx)
        self.native.setEditText(str(text))

    def spec(self) -> str:
        """What to pass to the core: a listed model's checkpoint path, else the text ('' for the default)."""
        name = self.value.strip()
        return str(segmenters.resolve(name)) if name in segmenters.models else name


def _disconnect_quietly(signal, slot) -> None:
    with contextlib.suppress(RuntimeError, TypeError, ValueError):
        signal.disconnect(slot)


def finetuned_folder() -> Path:
    """Where the Segmentation widget saves fine-tuned models: ``models/`` in the registry's folder.

    That is ``platformdirs.user_config_dir("napari-mae")`` (or ``$NAPARI_MAE_CONFIG_DIR``),
    beside the model lists that name them.
    """
    return config_dir() / "models"


def _free_path(path: Path) -> Path:
    i = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        i += 1
    return candidate


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "image"


def _progress_text(update) -> str:
    if update.kind == "step":
        return f"fine-tuning: step {update.step}, loss {update.loss:.3f}"
    return f"fine-tuning: {update.kind}"


def _size_header(spatial_dims: int, units: str) -> tuple[str, str]:
    """(column key, header with its unit), e.g. ``("area", "area (µm²)")``."""
    key, power = ("area", "²") if spatial_dims == 2 else ("volume", "³")
    unit = f"{units}{power}" if units != "scale units" else f"scale units{power}"
    return key, f"{key} ({unit})"


def _fmt(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "?"
    return "n/a" if math.isnan(v) else f"{v:.3g}"


def _to_dataframe(features: dict):
    import pandas as pd

    return pd.DataFrame(features)
