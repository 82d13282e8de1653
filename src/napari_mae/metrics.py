"""Former home of :mod:`napari_mae.segmentation.metrics` (kept importable; use the new path)."""

from napari_mae.segmentation.metrics import (
    iou_matrix,
    match_dataset,
    match_instances,
    match_instances_at,
    summarize_matches,
)

__all__ = ["iou_matrix", "match_dataset", "match_instances", "match_instances_at", "summarize_matches"]
