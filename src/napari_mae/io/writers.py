"""Write results as OME-TIFF with their physical voxel spacing.

Labels are uint32, which ImageJ TIFFs cannot hold, so results are written as
OME-TIFF (read by Fiji/Bio-Formats, napari, tifffile and :func:`napari_mae.io.readers.read_image`)
with ``PhysicalSize{Z,Y,X}`` and their unit. Orientation-wise the arrays are in the
axes :func:`napari_mae.io.readers.read_image` returned (for NIfTI/NRRD: (Z, Y, X) =
(S, P, L)).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
_OME_UNITS = {"um": "µm", "mm": "mm", "nm": "nm"}


def write_tiff(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    channel_axis: int | None = None,
) -> Path:
    """Write ``array`` as a zlib-compressed OME-TIFF with its voxel spacing, atomically.

    Parameters
    ----------
    path : str or PathLike
        Must end in ``.tif`` or ``.tiff``; parent folders are created.
    array : ndarray, shape ``([Z,] Y, X)`` or with one channel axis
        Any dtype tifffile writes (uint32 labels, float32 images, ...).
    spacing : sequence of float, optional
        Physical size per spatial axis, (Z, Y, X) or (Y, X).
    unit : {"um", "mm", "nm", "pixel"}, optional
        Unit of ``spacing``; ``None`` or ``"pixel"`` writes no calibration.
    channel_axis : int, optional
        Axis of ``array`` holding channels (moved first, OME axis ``C``).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        For another suffix, more than 3 spatial axes, or a ``spacing`` of the wrong length.
    NotADirectoryError, FileExistsError
        If a parent of ``path`` is a file.
    """
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"{path}: only TIFF output is written; use a .tif name")
    array = np.asarray(array)
    if channel_axis is not None:
        array = np.moveaxis(array, channel_axis, 0)
    n_spatial = array.ndim - (channel_axis is not None)
    if n_spatial not in (2, 3):
        raise ValueError(f"expected 2 or 3 spatial axes, got array of shape {array.shape}")
    spatial_axes = "ZYX"[3 - n_spatial :]
    metadata: dict = {"axes": ("C" if channel_axis is not None else "") + spatial_axes}
    if spacing is not None and unit not in (None, "pixel"):
        if len(spacing) != n_spatial:
            raise ValueError(f"spacing {tuple(spacing)} does not match {n_spatial} spatial axes")
        for axis, size in zip(spatial_axes, spacing):
            metadata[f"PhysicalSize{axis}"] = float(size)
            metadata[f"PhysicalSize{axis}Unit"] = _OME_UNITS.get(unit, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target, then renamed: an interrupted run never leaves half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tifffile.imwrite(
            tmp, array, ome=True, photometric="minisblack", compression="zlib", metadata=metadata
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
