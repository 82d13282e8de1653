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

The radius and threshold boxes stay hand-built Qt: their "auto (last: ...)"
special value text has no magicgui equivalent.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_mae.measure import object_table, write_table_csv

from ._common import (
    JobWidget,
    LayerCombo,
    channel_axis_combo,
    magic_field,
    parse_channel_axis,
    time_mode_combo,
)
from ._layers import UserInputError, add_or_update, prepare_image
from ._model_picker import ModelPicker

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


class SegmentationWidget(JobWidget):
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
            "image; auto: learned when a segmentation model is named below and no scribbles are "
            "painted, classical otherwise",
        )
        self.segmenter = magic_field(
            "",
            tooltip="Segmentation model of the learned method: empty or default-2d (bundled, fluorescent "
            "nuclei), or the path of a model you trained (napari-mae train --labels)",
        )
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
            prep = prepare_image(
                self.image.value(), self.viewer, channel_axis=parse_channel_axis(self.channel.currentText())
            )
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
            prep = prepare_image(
                self.image.value(), self.viewer, channel_axis=parse_channel_axis(self.channel.currentText())
            )
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
        if self.busy:  # re-run once the current job has stopped
            self._rerun = True
            self.stop()
            return
        self.run()

    def _on_finished(self, job) -> None:
        super()._on_finished(job)
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
            prep = prepare_image(
                layer,
                self.viewer,
                channel_axis=parse_channel_axis(self.channel.currentText()),
                time_mode=self.time_mode.currentText(),
            )
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
            named = str(self.segmenter.value).strip()
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
            # The only torch work, MAE features, runs single-threaded on CPU already
            # (features._one_torch_thread_on_cpu), which leaves the GUI thread a core.
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
