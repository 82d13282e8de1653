"""Masking dock widget: hide image patches the way an MAE sees its input.

Reads an image layer, builds a patch mask with :func:`napari_mae.masking.make_mask`
and applies it with :func:`napari_mae.masking.apply_mask` in a worker thread, then
adds ``"<name> masked"`` (Image) and ``"<name> mask"`` (Labels, 1 = removed) with the
input's scale and translate. The patch-grid mask is kept in the mask layer's
metadata (and :data:`~._registry.registry`) for the Reconstruction widget.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QSpinBox, QWidget
from superqt import QLabeledDoubleSlider

from ._common import JobWidget, LayerCombo, channel_axis_combo, parse_channel_axis, time_mode_combo
from ._layers import UserInputError, add_or_update, as_rgb_dtype, prepare_image
from ._registry import MASK_KEY, MaskRecord, registry


class PatchSizeEdit(QWidget):
    """Patch size in pixels per spatial axis (Z, Y, X), with its physical size."""

    def __init__(self, default: int = 16) -> None:
        super().__init__()
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.spins = []
        for axis in "ZYX":
            spin = QSpinBox()
            spin.setRange(1, 512)
            spin.setValue(default)
            spin.setPrefix(f"{axis} ")
            spin.setToolTip(f"Patch size along {axis}, in pixels")
            spin.valueChanged.connect(self._update_label)
            lay.addWidget(spin)
            self.spins.append(spin)
        self.physical = QLabel()
        self.physical.setToolTip("Patch size in the layer's physical units (pixels x scale)")
        lay.addWidget(self.physical)
        self._spacing: tuple[float, ...] = (1.0, 1.0)
        self._units = "px"
        self.set_dims(2)

    def set_dims(self, ndim: int, spacing=None, units: str = "px") -> None:
        """Show 2 or 3 axes; ``spacing`` gives the physical size label."""
        self.spins[0].setVisible(ndim == 3)
        self._spacing = tuple(spacing) if spacing is not None else (1.0,) * ndim
        self._units = units
        self._update_label()

    @property
    def ndim(self) -> int:
        """Number of axes shown."""
        return 3 if self.spins[0].isVisibleTo(self) else 2

    def value(self) -> tuple[int, ...]:
        """Patch size per shown axis, in pixels."""
        return tuple(s.value() for s in self.spins[3 - self.ndim :])

    def set_value(self, patch_size) -> None:
        """Set the shown axes (last ones first if fewer are given)."""
        for spin, v in zip(self.spins[::-1], tuple(patch_size)[::-1], strict=False):
            spin.setValue(int(v))

    def _update_label(self, *_) -> None:
        size = self.value()
        if len(self._spacing) != len(size):
            self.physical.setText("")
            return
        phys = " x ".join(f"{p * s:.3g}" for p, s in zip(size, self._spacing, strict=True))
        self.physical.setText(f"= {phys} {self._units}")


class MaskingWidget(JobWidget):
    """Mask an image with MAE patches (random, grid or block) and show the result.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Mask")
        form = QFormLayout()
        self.image = LayerCombo(napari_viewer, (Image,))
        self.channel = channel_axis_combo()
        self.time_mode = time_mode_combo()
        self.patch_size = PatchSizeEdit()
        self.mask_ratio = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.mask_ratio.setRange(0.0, 0.95)
        self.mask_ratio.setDecimals(2)
        self.mask_ratio.setValue(0.75)
        from napari_mae.masking import FILLS, STRATEGIES  # numpy only

        self.strategy = QComboBox()
        self.strategy.addItems(STRATEGIES)
        self.fill = QComboBox()
        self.fill.addItems(FILLS)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setSpecialValueText("random")
        self.seed.setValue(0)
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel)
        form.addRow("4D input", self.time_mode)
        form.addRow("patch size", self.patch_size)
        form.addRow("mask ratio", self.mask_ratio)
        form.addRow("strategy", self.strategy)
        form.addRow("fill", self.fill)
        form.addRow("seed", self.seed)
        self.form_layout.addLayout(form)
        self.image.currentIndexChanged.connect(self._image_changed)
        self.channel.currentIndexChanged.connect(self._image_changed)
        self._image_changed()

    def _image_changed(self, *_) -> None:
        try:
            prep = prepare_image(
                self.image.value(), self.viewer, channel_axis=parse_channel_axis(self.channel.currentText())
            )
        except (UserInputError, ValueError):
            return
        self.patch_size.set_dims(prep.spatial_dims, prep.spacing, prep.units)
        # Keep patches a few per axis on small/thin axes (e.g. 30 CT slices).
        shape = prep.spatial_shape
        self.patch_size.set_value(
            [
                min(s.value(), max(1, n // 2))
                for s, n in zip(self.patch_size.spins[3 - len(shape) :], shape, strict=True)
            ]
        )

    def run(self) -> None:
        """Mask the chosen image in a worker thread."""
        layer = self.image.value()
        try:
            prep = prepare_image(
                layer,
                self.viewer,
                channel_axis=parse_channel_axis(self.channel.currentText()),
                time_mode=self.time_mode.currentText(),
            )
            if prep.spatial_dims != self.patch_size.ndim:
                self.patch_size.set_dims(prep.spatial_dims, prep.spacing, prep.units)
            patch_size = self.patch_size.value()
            for p, n in zip(patch_size, prep.spatial_shape, strict=True):
                if p > n:
                    raise UserInputError(
                        f"Patch size {patch_size} is larger than the image {prep.spatial_shape}."
                    )
        except (UserInputError, ValueError) as exc:
            self.notify_error(str(exc))
            return
        mask_ratio = float(self.mask_ratio.value())
        strategy, fill = self.strategy.currentText(), self.fill.currentText()
        seed = None if self.seed.value() < 0 else self.seed.value()

        def work(progress):
            from napari_mae import masking

            n = len(prep.frames)
            mask = masking.make_mask(
                prep.spatial_shape, patch_size, mask_ratio=mask_ratio, strategy=strategy, seed=seed
            )
            masked = []
            for i in range(n):
                progress(i, n, "masking")
                image = prep.frame(i)
                masked.append(
                    np.asarray(
                        masking.apply_mask(
                            image, mask, patch_size, fill=fill, seed=seed, channel_axis=prep.channel_axis
                        )
                    )
                )
            progress(n, n, "masking")
            pixels = np.asarray(masking.mask_to_pixels(mask, prep.spatial_shape, patch_size), dtype=np.uint8)
            return masked, np.asarray(mask, dtype=bool), pixels

        def done(result) -> None:
            masked, mask, pixels = result
            self.show_result(layer, prep, masked, mask, pixels, patch_size, mask_ratio)

        self.start_job(work, description="Masking", on_returned=done, layers=[layer])

    def show_result(self, layer, prep, masked, mask, pixels, patch_size, mask_ratio) -> None:
        """Add the masked image and the mask layers (GUI thread)."""
        data = prep.to_layer_layout(masked)
        kwargs = prep.output_kwargs(with_channels=True)
        if prep.rgb:
            data = as_rgb_dtype(data, layer.dtype)
        else:
            kwargs["contrast_limits"] = layer.contrast_limits
            kwargs["colormap"] = layer.colormap.name
        add_or_update(self.viewer, "image", data, f"{prep.name} masked", **kwargs)
        record = MaskRecord(
            mask=mask, patch_size=tuple(patch_size), spatial_shape=prep.spatial_shape, source=prep.name
        )
        registry.last_mask = record
        add_or_update(
            self.viewer,
            "labels",
            pixels,
            f"{prep.name} mask",
            metadata={MASK_KEY: record.as_metadata()},
            opacity=0.3,
            **prep.spatial_kwargs(),
        )
        self.notify_notes(prep.notes)
        self.status.setText(
            f"{int(mask.sum())} of {mask.size} patches removed ({mask.mean():.0%}, asked {mask_ratio:.0%}); "
            f"grid {tuple(mask.shape)} of {tuple(patch_size)} px."
        )
