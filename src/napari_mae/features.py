"""Former home of :mod:`napari_mae.segmentation.features` (kept importable; use the new path)."""

from napari_mae.segmentation.features import (
    as_float_image,
    default_sigmas,
    filter_bank,
    model_features,
    multiscale_features,
)

__all__ = ["as_float_image", "default_sigmas", "filter_bank", "model_features", "multiscale_features"]
