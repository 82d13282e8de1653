"""Masking dock widget: hide image patches the way an MAE sees its input.

Reads an image layer, builds a patch mask with :func:`napari_mae.masking.make_mask`
and applies it with :func:`napari_mae.masking.apply_mask` in a worker thread, then
adds ``"<name> masked"`` (Image) and ``"<name> mask"`` (Labels, 1 = removed) with the
input's scale, translate and units. The patch-grid mask is kept in the mask layer's
metadata (and :data:`~._registry.registry`) for the Reconstruction widget; the
masked image's metadata names its source (:data:`~._registry.MASKED_KEY`), so the
Reconstruction widget can offer the original instead.

The patch size follows the model chosen in the Reconstruction widget (else the
bundled ``default-2d``/``default-3d`` one, :func:`~._registry.model_patch_size`)
until the user sets it.

The value fields are magicgui widgets (``create_widget``); the layer picker is
:class:`~._common.LayerCombo` and the per-axis patch size a small Qt row (see
their docstrings for why).
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QSpinBox, QWidget

from ._common import (
    ImageJobWidget,
    LayerCombo,
    channel_axis_combo,
    magic_field,
    time_mode_combo,
)
from ._layers import UserInputError, add_or_update, as_rgb_dtype
from ._registry import MASK_KEY, MASKED_KEY, MaskRecord, model_patch_size, registry


class PatchSizeEdit(QWidget):
    """Patch size in pixels per spatial axis (Z, Y, X), with its physical size.

    Hand-built Qt rather than a magicgui tuple: it hides the Z box for 2D
    images and shows the physical size beside the boxes as they change.
    """

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
            spin.setToolTip(
                f"Patch size along {axis}, in pixels: the image is cut into patches of this size "
                "and a share of them is hidden (set to the model's patch size by default)"
            )
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


class MaskingWidget(ImageJobWidget):
    """Mask an image with MAE patches (random, grid or block) and show the result.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__(napari_viewer, run_text="Mask")
        self.run_button.setToolTip("Hide patches of the chosen image as the MAE sees it")
        form = QFormLayout()
        self.image = LayerCombo(napari_viewer, (Image,))
        self.image.setToolTip("The image to mask")
        self.channel = channel_axis_combo()
        self.time_mode = time_mode_combo()
        self.patch_size = PatchSizeEdit(8)
        from napari_mae.masking import FILLS, STRATEGIES  # numpy only

        self.mask_ratio = magic_field(
            0.75,
            "FloatSlider",
            min=0.0,
            max=0.95,
            step=0.01,
            tooltip="Share of the patches hidden (0.75 = three of every four, as in the MAE paper)",
        )
        self.strategy = magic_field(
            STRATEGIES[0],
            choices=STRATEGIES,
            tooltip="Which patches are hidden: 'random' anywhere, 'grid' a regular pattern, "
            "'block' whole rectangular groups of patches",
        )
        self.fill = magic_field(
            FILLS[0],
            choices=FILLS,
            tooltip="What hidden patches show: 'zero' black, 'noise' random values, 'mean' the image's mean",
        )
        self.seed = magic_field(
            0,
            min=-1,
            max=2**31 - 1,
            tooltip="Number that fixes the random choice of patches (same number, same mask); "
            "-1 = a new mask every run",
        )
        self.seed.native.setSpecialValueText("random")
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel)
        form.addRow("4D input", self.time_mode)
        form.addRow("patch size", self.patch_size)
        form.addRow("mask ratio", self.mask_ratio.native)
        form.addRow("strategy", self.strategy.native)
        form.addRow("fill", self.fill.native)
        form.addRow("seed", self.seed.native)
        self.form_layout.addLayout(form)
        # The patch size follows the model until the user sets it.
        self.patch_size_set_by_user = False
        self._setting_patch_size = False
        for spin in self.patch_size.spins:
            spin.valueChanged.connect(self._patch_size_edited)
        self.image.currentIndexChanged.connect(self._image_changed)
        self.channel.currentIndexChanged.connect(self._image_changed)
        registry.model_chosen.connect(self._image_changed)
        self.destroyed.connect(lambda *_: _disconnect_signal(registry.model_chosen, self._image_changed))
        self._image_changed()

    def _patch_size_edited(self, *_) -> None:
        if not self._setting_patch_size:
            self.patch_size_set_by_user = True

    def _image_changed(self, *_) -> None:
        try:
            prep = self.prepared_image(for_run=False)
        except (UserInputError, ValueError):
            return
        self._setting_patch_size = True
        try:
            self.patch_size.set_dims(prep.spatial_dims, prep.spacing, prep.units)
            shape = prep.spatial_shape
            current = [s.value() for s in self.patch_size.spins[3 - len(shape) :]]
            wanted = current if self.patch_size_set_by_user else model_patch_size(prep.spatial_dims)
            # Keep patches a few per axis on small/thin axes (e.g. 30 CT slices).
            self.patch_size.set_value([min(p, max(1, n // 2)) for p, n in zip(wanted, shape, strict=True)])
        finally:
            self._setting_patch_size = False

    def run(self) -> None:
        """Mask the chosen image in a worker thread."""
        layer = self.image.value()
        try:
            prep = self.prepared_image()
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
        mask_ratio = float(self.mask_ratio.value)
        strategy, fill = self.strategy.value, self.fill.value
        seed = None if self.seed.value < 0 else int(self.seed.value)

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
        add_or_update(
            self.viewer, "image", data, f"{prep.name} masked", metadata={MASKED_KEY: prep.name}, **kwargs
        )
        record = MaskRecord(
            mask=mask, patch_size=tuple(patch_size), spatial_shape=prep.spatial_shape, source=prep.name
        )
        registry.last_mask = record
        # At the time point masked in "current time point" mode; else shared by all frames.
        mask_data, mask_kwargs = prep.place_spatial(pixels)
        add_or_update(
            self.viewer,
            "labels",
            mask_data,
            f"{prep.name} mask",
            metadata={MASK_KEY: record.as_metadata()},
            opacity=0.3,
            **mask_kwargs,
        )
        self.notify_notes(prep.notes)
        self.status.setText(
            f"{int(mask.sum())} of {mask.size} patches removed ({mask.mean():.0%}, asked {mask_ratio:.0%}); "
            f"grid {tuple(mask.shape)} of {tuple(patch_size)} px."
        )


def _disconnect_signal(signal, callback) -> None:
    import contextlib

    with contextlib.suppress(RuntimeError, TypeError, ValueError):
        signal.disconnect(callback)
