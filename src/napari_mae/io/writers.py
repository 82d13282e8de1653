"""Write results with their physical voxel spacing: OME-TIFF, or NIfTI for medical volumes.

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

from napari_mae.io.readers import NIFTI_SUFFIXES, TIFF_SUFFIXES

_OME_UNITS = {"um": "µm", "mm": "mm", "nm": "nm"}


def write_tiff(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    channel_axis: int | None = None,
    time_axis: int | None = None,
    rgb: bool = False,
) -> Path:
    """Write ``array`` as a zlib-compressed OME-TIFF with its voxel spacing, atomically.

    Parameters
    ----------
    path : str or PathLike
        Must end in ``.tif`` or ``.tiff``; parent folders are created.
    array : ndarray, shape ``([Z,] Y, X)``, with at most one channel and one time axis
        Any dtype tifffile writes (uint32 labels, float32 images, ...).
    spacing : sequence of float, optional
        Physical size per spatial axis, (Z, Y, X) or (Y, X).
    unit : {"um", "mm", "nm", "pixel"}, optional
        Unit of ``spacing``; ``None`` or ``"pixel"`` writes no calibration.
    channel_axis : int, optional
        Axis of ``array`` holding channels (OME axis ``C``).
    time_axis : int, optional
        Axis of ``array`` holding time points (OME axis ``T``); the file's axes
        are ``[T,] [C,] [Z,] Y, X``.
    rgb : bool
        With a ``channel_axis`` of 3 or 4 and no ``time_axis``: write the channels as the
        RGB(A) samples of each pixel (photometric RGB, file axes ``[Z,] Y, X, S``), as an
        RGB input is stored, instead of grey channels before Y, X.

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
    samples = rgb and channel_axis is not None and time_axis is None and array.shape[channel_axis] in (3, 4)
    if samples:  # RGB(A) samples last, as tifffile writes photometric RGB
        array, channel_axis = np.moveaxis(array, channel_axis, -1), None
    lead = [a % array.ndim for a in (time_axis, channel_axis) if a is not None]
    if len(set(lead)) != len(lead):
        raise ValueError(f"time_axis={time_axis} and channel_axis={channel_axis} are the same axis")
    if lead:
        array = np.moveaxis(array, lead, list(range(len(lead))))
    n_spatial = array.ndim - len(lead) - samples
    if n_spatial not in (2, 3):
        raise ValueError(f"expected 2 or 3 spatial axes, got array of shape {array.shape}")
    spatial_axes = "ZYX"[3 - n_spatial :]
    lead_axes = ("T" if time_axis is not None else "") + ("C" if channel_axis is not None else "")
    metadata: dict = {"axes": lead_axes + spatial_axes + "S" * samples}
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
            tmp,
            array,
            ome=True,
            photometric="rgb" if samples else "minisblack",
            compression="zlib",
            metadata=metadata,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    voxel_affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write a (Z, Y, X) volume as NIfTI in the scanner space it was read from, atomically.

    Parameters
    ----------
    path : str or PathLike
        Ends in ``.nii`` or ``.nii.gz``; parent folders are created.
    array : ndarray, shape (Z, Y, X)
        A result in the axes :func:`napari_mae.io.readers.read_image` returned.
    voxel_affine : ndarray of float, shape (4, 4), optional
        ``metadata["voxel_affine"]`` from :func:`~napari_mae.io.readers.read_image`, so
        the result overlays the original scan in ITK-SNAP, 3D Slicer or napari. Without
        it, ``diag(-sx, -sy, sz, 1)``: the array's axes taken as read_image returns them,
        (Z, Y, X) = (S, P, L), so the file reads back as the same array.
    spacing : sequence of float, optional
        (Z, Y, X) voxel size in millimetres, used only without ``voxel_affine``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        For another suffix, an array that is not 3D, or an affine that is not 4 x 4.
    """
    import nibabel as nib

    path = Path(path)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name ends in .nii or .nii.gz")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"NIfTI output needs a (Z, Y, X) volume, got shape {array.shape}")
    if voxel_affine is None:
        sx, sy, sz = list(spacing)[::-1] if spacing is not None else [1.0] * 3
        voxel_affine = np.diag([-sx, -sy, sz, 1.0])  # (X, Y, Z) = (L, P, S) in RAS world
    voxel_affine = np.asarray(voxel_affine, dtype=float)
    if voxel_affine.shape != (4, 4):
        raise ValueError(f"voxel_affine must be 4 x 4, got {voxel_affine.shape}")
    if array.dtype == np.uint32 and array.max(initial=0) < 2**31:
        array = array.astype(np.int32)  # uint32 is not in the NIfTI-1 standard's common set
    # (Z, Y, X) -> (X, Y, Z), the voxel order voxel_affine describes.
    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), voxel_affine)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


#: Millimetres per unit of a spacing, for NIfTI output.
_TO_MM = {"mm": 1.0, "um": 1e-3, "µm": 1e-3, "nm": 1e-6}


def write_image(
    path: str | os.PathLike, array: np.ndarray, *, spacing=None, unit=None, metadata=None
) -> Path:
    """Write a result as OME-TIFF (``.tif``) or NIfTI (``.nii``, ``.nii.gz``), by suffix.

    Parameters
    ----------
    path : str or PathLike
    array : ndarray, shape ``([Z,] Y, X)``
    spacing : sequence of float, optional
        Per spatial axis, (Z, Y, X) or (Y, X).
    unit : str, optional
        Unit of ``spacing``. NIfTI is written in millimetres: a spacing in ``"um"`` or
        ``"nm"`` is converted; other units (``"pixel"``, None) are written as they are.
    metadata : dict, optional
        The input's ``read_image`` metadata; its ``voxel_affine`` places NIfTI output in
        the input's scanner space.

    Raises
    ------
    ValueError
        For an unsupported suffix, or NIfTI output of a 2D array.
    """
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        if spacing is not None and unit in _TO_MM:  # NIfTI is in millimetres (a µm TIFF kept µm)
            spacing = [float(v) * _TO_MM[unit] for v in spacing]
        return write_nifti(path, array, voxel_affine=(metadata or {}).get("voxel_affine"), spacing=spacing)
    if name.endswith(TIFF_SUFFIXES):
        return write_tiff(path, array, spacing=spacing, unit=unit)
    raise ValueError(f"{path}: write .tif/.tiff (OME-TIFF) or .nii/.nii.gz (NIfTI)")
