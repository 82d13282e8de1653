"""Reconstruction dock widget: what the MAE makes of a masked image.

Loads a model (bundled ``default-2d``/``default-3d``, a checkpoint file, or a
model trained in the Training widget) and calls
:func:`napari_mae.reconstruction.reconstruct` over sliding windows in a worker
thread. The mask is the one from the Masking widget (its mask layer) or a new
random one. Adds ``"<name> reconstruction"`` and ``"<name> error"`` layers with
the input's scale.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFormLayout, QSpinBox
from superqt import QLabeledDoubleSlider

from ._common import (
    JobWidget,
    LayerCombo,
    channel_axis_combo,
    parse_channel_axis,
    time_mode_combo,
    torch_threads_leaving_a_core,
)
from ._layers import UserInputError, add_or_update, as_rgb_dtype, prepare_image
from ._model_picker import ModelPicker, device_combo
from ._registry import MaskRecord

NEW_MASK_TEXT = "new random mask"


def release_gpu_memory() -> None:
    """Give cached CUDA memory back to the driver (no-op without torch/CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReconstructionWidget(JobWidget):
    """Reconstruct masked patches of an image with an MAE.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Reconstruct")
        form = QFormLayout()
        self.image = LayerCombo(napari_viewer, (Image,), predicate=lambda ly: not ly.name.endswith(" error"))
        self.channel = channel_axis_combo()
        self.time_mode = time_mode_combo()
        self.model = ModelPicker()
        self.device = device_combo()
        self.mask = LayerCombo(
            napari_viewer,
            (Labels,),
            none_text=NEW_MASK_TEXT,
            predicate=lambda ly: MaskRecord.from_layer(ly) is not None,
        )
        self.mask.setToolTip("A mask layer made by the Masking widget, or a new random mask")
        self.mask_ratio = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.mask_ratio.setRange(0.0, 0.95)
        self.mask_ratio.setDecimals(2)
        self.mask_ratio.setValue(0.75)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 256)
        self.batch_size.setValue(4)
        self.batch_size.setToolTip("Windows per forward pass")
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel)
        form.addRow("4D input", self.time_mode)
        form.addRow("model", self.model)
        form.addRow("device", self.device)
        form.addRow("mask", self.mask)
        form.addRow("new mask ratio", self.mask_ratio)
        form.addRow("seed", self.seed)
        form.addRow("batch size", self.batch_size)
        self.form_layout.addLayout(form)
        self.mask.currentIndexChanged.connect(self._mask_changed)
        self.image.currentIndexChanged.connect(self._image_changed)
        self._mask_changed()
        self._image_changed()

    def _mask_changed(self, *_) -> None:
        new = self.mask.value() is None
        self.mask_ratio.setEnabled(new)
        self.seed.setEnabled(new)

    def _image_changed(self, *_) -> None:
        try:
            prep = prepare_image(
                self.image.value(), self.viewer, channel_axis=parse_channel_axis(self.channel.currentText())
            )
        except (UserInputError, ValueError):
            return
        self.model.set_default_for_dims(prep.spatial_dims)
        source = self.image.value().name
        for ly in self.mask.layers():  # prefer the mask made for this image
            if MaskRecord.from_layer(ly).source == source:
                self.mask.set_value(ly)
                break

    def run(self) -> None:
        """Reconstruct the chosen image in a worker thread."""
        layer = self.image.value()
        mask_layer = self.mask.value()
        try:
            prep = prepare_image(
                layer,
                self.viewer,
                channel_axis=parse_channel_axis(self.channel.currentText()),
                time_mode=self.time_mode.currentText(),
            )
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
        device = self.device.currentText()
        mask_ratio, seed, batch_size = (
            float(self.mask_ratio.value()),
            self.seed.value(),
            self.batch_size.value(),
        )
        n = len(prep.frames)

        def work(progress):
            from napari_mae.model import load_model
            from napari_mae.reconstruction import reconstruct

            progress(0, 1, "loading model")
            model = load_model(spec, device=device)
            model_mask = _mask_for_model(mask, tuple(model.config.patch_size), prep)
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
            self.show_result(layer, prep, *result)

        layers = [layer] if mask_layer is None else [layer, mask_layer]
        self.start_job(work, description="Reconstructing", on_returned=done, layers=layers)

    def show_result(self, layer, prep, recon, error) -> None:
        """Add the reconstruction and error layers (GUI thread)."""
        kwargs = prep.output_kwargs(with_channels=True)
        if prep.rgb:
            data = as_rgb_dtype(prep.to_layer_layout(recon), layer.dtype)
        else:
            data = prep.to_layer_layout(recon)
            kwargs["contrast_limits"] = layer.contrast_limits
            kwargs["colormap"] = layer.colormap.name
        add_or_update(self.viewer, "image", data, f"{prep.name} reconstruction", **kwargs)
        err = prep.to_layer_layout(error)
        err_kwargs = prep.output_kwargs(with_channels=err.ndim > prep.spatial_dims + int(prep.stacked))
        err_kwargs.pop("rgb", None)
        if err_kwargs.get("scale") is not None and len(err_kwargs["scale"]) != err.ndim:
            err = err.mean(axis=-1)  # RGB error: mean over colours
            err_kwargs = prep.output_kwargs()
        add_or_update(
            self.viewer,
            "image",
            err,
            f"{prep.name} error",
            colormap="magma",
            blending="additive",
            **err_kwargs,
        )
        finite = err[np.isfinite(err)]
        self.status.setText(
            f"Reconstructed {prep.name} with {self.model.describe()}; mean error {finite.mean():.4g}"
            if finite.size
            else f"Reconstructed {prep.name}."
        )
        self.notify_notes(prep.notes)


def _mask_for_model(record: MaskRecord | None, patch_size: tuple[int, ...], prep):
    """The Masking widget's mask on the model's patch grid (None: ``reconstruct`` draws one).

    A mask made with another patch size is resampled: a model patch is removed
    when most of its pixels were.
    """
    if record is None:
        return None
    if tuple(record.patch_size) == tuple(patch_size):
        return record.mask
    from napari_mae.masking import mask_to_pixels, patch_grid_shape

    if len(patch_size) != len(record.spatial_shape):
        raise UserInputError(
            f"The model takes {len(patch_size)}D patches; the mask is {len(record.spatial_shape)}D."
        )
    pixels = mask_to_pixels(record.mask, record.spatial_shape, record.patch_size).astype(np.float32)
    grid = patch_grid_shape(record.spatial_shape, patch_size)
    padded = np.zeros([g * p for g, p in zip(grid, patch_size, strict=True)], np.float32)
    padded[tuple(slice(0, n) for n in record.spatial_shape)] = pixels
    blocks = padded.reshape([v for g, p in zip(grid, patch_size, strict=True) for v in (g, p)])
    fraction = blocks.mean(axis=tuple(range(1, 2 * len(grid), 2)))
    prep.notes.append(
        f"Mask of {tuple(record.patch_size)} px patches resampled to the model's {tuple(patch_size)} px patches."
    )
    return fraction > 0.5
