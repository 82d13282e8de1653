"""Reconstruction dock widget: what the MAE makes of a masked image.

Loads a model (bundled ``default-2d``/``default-3d``, a checkpoint file, or a
model trained in the Training widget) and calls
:func:`napari_mae.reconstruction.reconstruct` over sliding windows in a worker
thread. The mask is the one from the Masking widget (its mask layer) or a new
random one. Adds ``"<name> reconstruction"`` and ``"<name> error"`` layers with
the input's scale and units, and shows the reconstruction alone (the other
layers hidden) or side by side in napari's grid view.

After the Masking widget ran, the image offered is the original (not its
``"<name> masked"`` output, which the model would mask again) with the mask the
Masking widget made for it; choosing a masked output warns.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QCheckBox, QFormLayout

from ._common import (
    ImageJobWidget,
    LayerCombo,
    channel_axis_combo,
    magic_field,
    time_mode_combo,
    torch_threads_leaving_a_core,
)
from ._layers import UserInputError, add_or_update, as_rgb_dtype
from ._model_picker import ModelPicker, device_combo
from ._registry import MASKED_KEY, MaskRecord

NEW_MASK_TEXT = "new random mask"


def masked_source(layer) -> str | None:
    """Name of the image a Masking-widget output was made from, or None for other layers."""
    return (getattr(layer, "metadata", None) or {}).get(MASKED_KEY)


def release_gpu_memory() -> None:
    """Give cached CUDA memory back to the driver (no-op without torch/CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReconstructionWidget(ImageJobWidget):
    """Reconstruct masked patches of an image with an MAE.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Reconstruct")
        self.run_button.setToolTip("Let the model fill in the hidden patches of the chosen image")
        form = QFormLayout()
        outputs = (" error", " reconstruction")
        self.image = LayerCombo(
            napari_viewer,
            (Image,),
            predicate=lambda ly: not ly.name.endswith(outputs),
            # A masked output is listed but not offered first when its original is open.
            avoid=lambda ly: masked_source(ly) in napari_viewer.layers,
        )
        self.image.setToolTip(
            "The original image (not its 'masked' copy): the model hides the patches of the mask below "
            "and fills them in"
        )
        self.channel = channel_axis_combo()
        self.time_mode = time_mode_combo()
        self.model = ModelPicker(report_choice=True)
        self.device = device_combo()
        self.mask = LayerCombo(
            napari_viewer,
            (Labels,),
            none_text=NEW_MASK_TEXT,
            predicate=lambda ly: MaskRecord.from_layer(ly) is not None,
        )
        self.mask.setToolTip(
            "Which patches to hide: the mask the Masking widget made for this image, or a new random one"
        )
        self.mask_ratio = magic_field(
            0.75,
            "FloatSlider",
            min=0.0,
            max=0.95,
            step=0.01,
            tooltip="Share of the patches a new random mask hides (0.75 = three of every four)",
        )
        self.seed = magic_field(
            0,
            min=0,
            max=2**31 - 1,
            tooltip="Number that fixes the new random mask (same number, same patches hidden)",
        )
        self.batch_size = magic_field(
            4,
            min=1,
            max=256,
            tooltip="Image windows the model processes at once: more is faster on a GPU but needs more memory",
        )
        self.grid = QCheckBox("side by side (grid view)")
        self.grid.setToolTip(
            "Show the original, masked image, reconstruction and error map side by side; "
            "unchecked: only the reconstruction is shown, the others are hidden"
        )
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel)
        form.addRow("4D input", self.time_mode)
        form.addRow("model", self.model)
        form.addRow("device", self.device)
        form.addRow("mask", self.mask)
        form.addRow("new mask ratio", self.mask_ratio.native)
        form.addRow("seed", self.seed.native)
        form.addRow("batch size", self.batch_size.native)
        form.addRow("", self.grid)
        self.form_layout.addLayout(form)
        self.mask.currentIndexChanged.connect(self._mask_changed)
        self.image.currentIndexChanged.connect(self._image_changed)
        events = napari_viewer.layers.events
        events.inserted.connect(self._layer_inserted)
        self.destroyed.connect(lambda *_: _disconnect(events.inserted, self._layer_inserted))
        self._mask_changed()
        self._image_changed()

    def _layer_inserted(self, event) -> None:
        """A mask made for the chosen image after this widget opened: choose it."""
        layer = event.value
        record = MaskRecord.from_layer(layer)
        current = self.image.value()
        if record is not None and current is not None and record.source == current.name:
            self.mask.set_value(layer)

    def _mask_changed(self, *_) -> None:
        new = self.mask.value() is None
        self.mask_ratio.enabled = new
        self.seed.enabled = new

    def _image_changed(self, *_) -> None:
        try:
            prep = self.prepared_image(for_run=False)
        except (UserInputError, ValueError):
            return
        self.model.set_default_for_dims(prep.spatial_dims)
        layer = self.image.value()
        # Prefer the mask made for this image (for a masked output: for its original).
        source = masked_source(layer) or layer.name
        for ly in self.mask.layers():
            if MaskRecord.from_layer(ly).source == source:
                self.mask.set_value(ly)
                break
        else:
            self.mask.setCurrentIndex(0)

    def run(self) -> None:
        """Reconstruct the chosen image in a worker thread."""
        layer = self.image.value()
        mask_layer = self.mask.value()
        try:
            prep = self.prepared_image()
            spec = self.model.spec()
            mask = None
            if mask_layer is not None:
                record = MaskRecord.from_layer(mask_layer)
                if tuple(record.spatial_shape) != tuple(prep.spatial_shape):
                    raise UserInputError(
                        f"Mask '{mask_layer.name}' was made for shape {record.spatial_shape}, not "
                        f"{prep.spatial_shape}; mask this image first or use a new random mask."
                    )
                mask = record
        except (UserInputError, ValueError) as exc:
            self.notify_error(str(exc))
            return
        source = masked_source(layer)
        if source is not None:
            prep.notes.append(
                f"'{layer.name}' is the Masking widget's output: its hidden patches are already blank, "
                f"so the model sees them masked again and the error compares against a masked image. "
                f"Choose '{source}' (with mask '{source} mask') to reconstruct the original."
            )
            self.notify_notes(prep.notes[-1:])
        device = self.device.currentText()
        mask_ratio, seed, batch_size = (
            float(self.mask_ratio.value),
            int(self.seed.value),
            int(self.batch_size.value),
        )
        n = len(prep.frames)

        def work(progress):
            from napari_mae.models.mae import load_model
            from napari_mae.reconstruction import reconstruct

            progress(0, 1, "loading model")
            model = load_model(spec, device=device)
            model_mask = _mask_for_model(mask, tuple(model.config.patch_size), prep.notes)
            recon, error = [], []
            try:
                with torch_threads_leaving_a_core():
                    for i in range(n):

                        def frame_progress(done, total, message, i=i):
                            progress(i * total + done, n * total, message or "windows")

                        result = reconstruct(
                            prep.frame(i, fill_nan=False),
                            model,
                            mask=model_mask,
                            mask_ratio=mask_ratio,
                            seed=seed,
                            channel_axis=prep.channel_axis,
                            device=device,
                            batch_size=batch_size,
                            progress=frame_progress,
                        )
                        recon.append(np.asarray(result.reconstruction, dtype=np.float32))
                        error.append(np.asarray(result.error, dtype=np.float32))
            finally:
                del model
                release_gpu_memory()
            return recon, error

        def done(result) -> None:
            self.show_result(layer, prep, *result, mask_layer=mask_layer)

        layers = [layer] if mask_layer is None else [layer, mask_layer]
        self.start_job(work, description="Reconstructing", on_returned=done, layers=layers)

    def show_result(self, layer, prep, recon, error, mask_layer=None) -> None:
        """Add the reconstruction and error layers and show them (GUI thread)."""
        kwargs = prep.output_kwargs(with_channels=True)
        if prep.rgb:
            data = as_rgb_dtype(prep.to_layer_layout(recon), layer.dtype)
        else:
            data = prep.to_layer_layout(recon)
            kwargs["contrast_limits"] = layer.contrast_limits
            kwargs["colormap"] = layer.colormap.name
        recon_layer = add_or_update(self.viewer, "image", data, f"{prep.name} reconstruction", **kwargs)
        err = prep.to_layer_layout(error)
        err_kwargs = prep.output_kwargs(with_channels=err.ndim > prep.spatial_dims + int(prep.stacked))
        err_kwargs.pop("rgb", None)
        if err_kwargs.get("scale") is not None and len(err_kwargs["scale"]) != err.ndim:
            err = err.mean(axis=-1)  # RGB error: mean over colours
            err_kwargs = prep.output_kwargs()
        error_layer = add_or_update(
            self.viewer,
            "image",
            err,
            f"{prep.name} error",
            colormap="magma",
            blending="additive",
            **err_kwargs,
        )
        self._show(layer, recon_layer, error_layer, mask_layer)
        finite = err[np.isfinite(err)]
        self.status.setText(
            f"Reconstructed {prep.name} with {self.model.describe()}; mean error {finite.mean():.4g}"
            if finite.size
            else f"Reconstructed {prep.name}."
        )
        self.notify_notes(prep.notes)

    def _show(self, layer, recon_layer, error_layer, mask_layer) -> None:
        """Only the reconstruction visible, or the four layers side by side in grid view."""
        masked_name = f"{layer.name} masked"
        masked = self.viewer.layers[masked_name] if masked_name in self.viewer.layers else None  # noqa: SIM401
        compared = [ly for ly in (layer, masked, recon_layer, error_layer) if ly is not None]
        if mask_layer is not None:
            mask_layer.visible = False
        if self.grid.isChecked():
            for ly in compared:
                ly.visible = True
            grid = viewer_grid(self.viewer)
            grid.enabled = True
            grid.shape = (-1, 2)
        else:
            for ly in compared:
                ly.visible = ly is recon_layer
        self.viewer.layers.selection.active = recon_layer


def viewer_grid(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` from napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _disconnect(emitter, callback) -> None:
    import contextlib

    with contextlib.suppress(RuntimeError, TypeError, ValueError):
        emitter.disconnect(callback)


def _mask_for_model(record: MaskRecord | None, patch_size: tuple[int, ...], notes: list[str]):
    """The Masking widget's mask on the model's patch grid (None: ``reconstruct`` draws one).

    A mask made with another patch size is resampled by
    :func:`napari_mae.masking.resample_mask` (a note is added to ``notes``).

    Raises
    ------
    UserInputError
        If the model's patches have another number of axes than the mask.
    """
    if record is None:
        return None
    if tuple(record.patch_size) == tuple(patch_size):
        return record.mask
    from napari_mae.masking import resample_mask

    if len(patch_size) != len(record.spatial_shape):
        raise UserInputError(
            f"The model takes {len(patch_size)}D patches; the mask is {len(record.spatial_shape)}D."
        )
    notes.append(
        f"Mask of {tuple(record.patch_size)} px patches resampled to the model's {tuple(patch_size)} px patches."
    )
    return resample_mask(record.mask, record.spatial_shape, record.patch_size, patch_size)
