"""npe2 writer contributions: Labels and Image layers as OME-TIFF or NIfTI, with their spacing.

File > Save Selected Layers... offers "napari MAE" for ``.tif``/``.tiff``
(OME-TIFF with ``PhysicalSize{Z,Y,X}`` and its unit) and ``.nii``/``.nii.gz``
(NIfTI in millimetres; in the scanner space of the volume it was read from when
the layer's metadata holds that volume's ``voxel_affine``), so a saved result
reads back with the spacing it was shown with. The work is done by
:mod:`napari_mae.io.writers`; this module only turns napari's layer ``meta``
into its arguments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_mae.io.readers import NIFTI_SUFFIXES
from napari_mae.io.writers import write_nifti, write_tiff

# napari (pint) unit names -> the writers' unit names.
_UNITS = {
    "micrometer": "um",
    "micron": "um",
    "um": "um",
    "µm": "um",
    "millimeter": "mm",
    "mm": "mm",
    "nanometer": "nm",
    "nm": "nm",
}
# Millimetres per unit, for NIfTI (whose spacing is millimetres).
_MM_PER_UNIT = {"um": 1e-3, "mm": 1.0, "nm": 1e-6}


def _spatial(data: np.ndarray, meta: dict, rgb: bool) -> tuple[np.ndarray, list, list, bool]:
    """Drop singleton leading axes beyond 3 spatial ones; return data, scale, units, has_time."""
    scale = [float(s) for s in meta.get("scale", [1.0] * (data.ndim - rgb))]
    units = [str(u) for u in (meta.get("units") or ["pixel"] * len(scale))]
    n_axes = data.ndim - int(rgb)
    while n_axes > 3 and data.shape[0] == 1:  # a result at one time point: (1, Z, Y, X)
        data, scale, units, n_axes = data[0], scale[1:], units[1:], n_axes - 1
    return data, scale, units, n_axes > 3


def _unit(units: list[str]) -> str | None:
    names = {_UNITS.get(u) for u in units}
    return names.pop() if len(names) == 1 and None not in names else None


def write_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels or Image layer to ``path`` (npe2 single-layer writer).

    Parameters
    ----------
    path : str
        Ends in ``.tif``/``.tiff`` (OME-TIFF) or ``.nii``/``.nii.gz`` (NIfTI).
    data : array-like, shape ``([T,] [Z,] Y, X)`` (RGB: ``(..., 3|4)``)
        The layer's data (level 0 of a multiscale layer).
    meta : dict
        napari's layer state: ``scale``, ``units``, ``rgb``, ``metadata``.

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    ValueError
        For a layer the format cannot hold (NIfTI of a time series or RGB image,
        more than 3 spatial axes, ...).
    """
    if isinstance(data, list):  # multiscale: full resolution
        data = data[0]
    data = np.asarray(data)
    rgb = bool(meta.get("rgb", False))
    data, scale, units, has_time = _spatial(data, meta, rgb)
    spatial_scale = scale[1:] if has_time else scale
    spatial_units = units[1:] if has_time else units
    unit = _unit(spatial_units)
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        if has_time or rgb:
            raise ValueError(
                "NIfTI output takes one (Z, Y, X) volume; save a time series or RGB image as .tif"
            )
        if data.ndim == 2:
            data, spatial_scale = data[None], [1.0, *spatial_scale]
        mm = [s * _MM_PER_UNIT.get(unit or "mm", 1.0) for s in spatial_scale]
        affine = (meta.get("metadata") or {}).get("voxel_affine")
        same_shape = affine is not None and np.allclose(mm, _affine_spacing(affine))
        return [str(write_nifti(path, data, voxel_affine=affine if same_shape else None, spacing=mm))]
    return [
        str(
            write_tiff(
                path,
                data,
                spacing=spatial_scale,
                unit=unit,
                channel_axis=-1 if rgb else None,
                time_axis=0 if has_time else None,
            )
        )
    ]


def _affine_spacing(affine) -> list[float]:
    """(Z, Y, X) voxel sizes of a voxel (X, Y, Z) -> world affine."""
    affine = np.asarray(affine, dtype=float)
    return list(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[::-1])


def write_table(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer's object table (its ``features``) as CSV (npe2 writer, ``.csv``).

    Raises
    ------
    ValueError
        If the layer has no object table (segment it with the Segmentation widget first).
    """
    from napari_mae.measure import write_table_csv

    features = meta.get("features")
    if features is None or len(getattr(features, "columns", ())) == 0:
        raise ValueError("This Labels layer has no object table; segment an image with napari MAE first.")
    table = {str(k): np.asarray(features[k]) for k in features.columns}
    return [str(write_table_csv(path, table))]
