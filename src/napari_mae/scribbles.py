"""Former home of :mod:`napari_mae.segmentation.scribbles` (kept importable; use the new path)."""

from napari_mae.segmentation.scribbles import ct_bone_labels, simulate_scribbles

__all__ = ["ct_bone_labels", "simulate_scribbles"]
