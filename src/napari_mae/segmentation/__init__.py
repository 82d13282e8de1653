"""Instance segmentation: the learned pipeline (:mod:`~napari_mae.segmentation.learned`, the
MAE encoder's decoder) and the classical one (:mod:`~napari_mae.segmentation.classical`),
behind one entry point, :func:`segment_instances`.

:mod:`~napari_mae.segmentation.targets` holds the decoder's training targets. Importing this
package imports no torch.
"""

from __future__ import annotations

from napari_mae.segmentation.classical import (
    detect_polarity,
    estimate_object_radius,
    segment_instances,
    working_shape,
)

__all__ = ["detect_polarity", "estimate_object_radius", "segment_instances", "working_shape"]
