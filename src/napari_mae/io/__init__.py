"""File input/output: image readers with physical spacing, and model checkpoints.

``napari_mae.io.readers`` reads TIFF, NIfTI and NRRD files as arrays with their voxel
spacing; ``napari_mae.io.checkpoint`` writes and loads MAE checkpoints safely.
Submodules are imported on use, so importing this package stays light.
"""

from napari_mae.io.readers import ImageReadError, read_image

__all__ = ["ImageReadError", "read_image"]
