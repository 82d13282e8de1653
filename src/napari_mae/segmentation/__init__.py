"""Instance segmentation: the learned pipeline (:mod:`~napari_mae.segmentation.learned`, the
MAE encoder's decoder) and the classical one (:mod:`~napari_mae.segmentation.classical`),
behind one entry point, :func:`segment_instances` (:mod:`~napari_mae.segmentation.segment`).

Shared rooms: :mod:`~napari_mae.segmentation.prepare` (input to one bright channel),
:mod:`~napari_mae.segmentation.scale` (object radius, working grid),
:mod:`~napari_mae.segmentation.watershed` (seeds, watershed, relabelling),
:mod:`~napari_mae.segmentation.tiling` (one tiler), :mod:`~napari_mae.segmentation.params`
(frozen parameters, the typed info record), :mod:`~napari_mae.segmentation.features`,
:mod:`~napari_mae.segmentation.scribbles`, :mod:`~napari_mae.segmentation.metrics`;
:mod:`~napari_mae.segmentation.targets` holds the decoder's training targets. Importing
this package imports no torch.
"""

from __future__ import annotations

from napari_mae.segmentation.params import DEFAULT_PARAMS, SegmentationInfo, SegmentationParams
from napari_mae.segmentation.prepare import detect_polarity
from napari_mae.segmentation.scale import estimate_object_radius, working_shape
from napari_mae.segmentation.segment import segment_instances

__all__ = [
    "DEFAULT_PARAMS",
    "SegmentationInfo",
    "SegmentationParams",
    "detect_polarity",
    "estimate_object_radius",
    "segment_instances",
    "working_shape",
]
