"""What the widgets share: trained models and the last patch mask.

The Training widget adds each model it finishes here; the Reconstruction and
Segmentation widgets list them next to the bundled ``default-2d`` and
``default-3d``. The Masking widget stores its patch mask both in the mask
layer's ``metadata[MASK_KEY]`` and here as :attr:`Registry.last_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from napari_mae._names import BUNDLED_MODELS

#: Key of the patch-mask record in a mask layer's ``metadata``.
MASK_KEY = "napari_mae_mask"


@dataclass
class MaskRecord:
    """A patch mask made by the Masking widget.

    Attributes
    ----------
    mask : numpy.ndarray of bool
        Patch-grid mask, shape ``patch_grid_shape(spatial_shape, patch_size)``,
        ``True`` = removed (the MAE convention).
    patch_size : tuple of int
        Patch size in pixels per spatial axis.
    spatial_shape : tuple of int
        Spatial shape of the image it was made for.
    source : str
        Name of the image layer it was made for.
    """

    mask: np.ndarray
    patch_size: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    source: str = ""

    def as_metadata(self) -> dict:
        """The record as a plain dict for ``layer.metadata``."""
        return {
            "mask": self.mask,
            "patch_size": tuple(self.patch_size),
            "spatial_shape": tuple(self.spatial_shape),
            "source": self.source,
        }

    @classmethod
    def from_layer(cls, layer) -> MaskRecord | None:
        """The record stored in ``layer.metadata``, or None."""
        meta = getattr(layer, "metadata", {}).get(MASK_KEY)
        if not meta:
            return None
        return cls(
            mask=np.asarray(meta["mask"], dtype=bool),
            patch_size=tuple(meta["patch_size"]),
            spatial_shape=tuple(meta["spatial_shape"]),
            source=meta.get("source", ""),
        )


class Registry:
    """Models trained in this session and the last mask (one instance: :data:`registry`)."""

    #: Emitted with no argument when a model is added or removed.
    models_changed = Signal()

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.last_mask: MaskRecord | None = None

    def add_model(self, name: str, spec: Any) -> str:
        """Offer a trained model (checkpoint path or model object) under ``name``.

        Returns
        -------
        str
            The name used (made unique with a suffix if needed).
        """
        base, i = name, 1
        while name in self.models or name in BUNDLED_MODELS:
            i += 1
            name = f"{base} ({i})"
        self.models[name] = spec
        self.models_changed.emit()
        return name

    def model_names(self) -> list[str]:
        """Bundled names, then trained models, newest first."""
        return list(BUNDLED_MODELS) + list(self.models)[::-1]

    def resolve(self, name: str) -> Any:
        """The spec to pass to ``load_model`` for a listed name."""
        spec = self.models.get(name, name)
        return str(spec) if isinstance(spec, Path) else spec

    def clear(self) -> None:
        """Forget trained models and the last mask (tests)."""
        self.models.clear()
        self.last_mask = None
        self.models_changed.emit()


registry = Registry()
