"""napari dock widgets (the only part of napari-mae that imports Qt and napari).

``napari.yaml`` points at the four classes below. Each is a thin layer over one
core function; torch is imported only inside their worker threads.
"""

from ._masking import MaskingWidget
from ._reconstruction import ReconstructionWidget
from ._segmentation import SegmentationWidget
from ._training import TrainingWidget

__all__ = ["MaskingWidget", "ReconstructionWidget", "SegmentationWidget", "TrainingWidget"]
