"""Per-object measurements of a label image, in physical units.

:func:`object_table` is the table the Segmentation widget shows and stores in the
Labels layer's ``features``, and what a batch run writes as CSV
(:func:`write_table_csv`). It is :func:`skimage.measure.regionprops_table` with
``spacing``, so sizes and centroids are in the units of the voxel spacing.
Numpy and scikit-image only: no Qt, no napari, no torch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["object_table", "write_table_csv"]


def object_table(
    labels: np.ndarray,
    intensity_image: np.ndarray | None = None,
    *,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    t: int | None = None,
) -> dict[str, np.ndarray]:
    """One row per object of ``labels``: size, centroid and mean intensity.

    Parameters
    ----------
    labels : ndarray of int, shape ``([Z,] Y, X)``
        0 = background, objects > 0 (need not be consecutive).
    intensity_image : ndarray, shape ``labels.shape`` or ``labels.shape + (C,)``, optional
        The image the labels were made from; gives ``mean_intensity`` (one column
        per channel, ``mean_intensity-<c>``, when it has channels).
    spacing : sequence of float, optional
        Physical size of one pixel per axis of ``labels``, (Z, Y, X) or (Y, X).
        ``None`` means 1 per axis (uncalibrated).
    channel_axis : int, optional
        Axis of ``intensity_image`` holding channels (moved last).
    t : int, optional
        Time point, added as a first column ``t``.

    Returns
    -------
    dict of str to ndarray
        Columns, each of length ``n_objects``: ``label``; ``pixels`` (pixel
        count; only when ``spacing`` is not all ones, where it would repeat the
        size column); ``area`` (2D, units of ``spacing`` squared) or ``volume``
        (3D, cubed); ``centroid_z`` (3D), ``centroid_y``, ``centroid_x`` in units
        of ``spacing`` from the centre of the first pixel; ``mean_intensity``
        when ``intensity_image`` is given.

    Raises
    ------
    ValueError
        If ``labels`` is not 2D or 3D, ``spacing`` has the wrong length or a
        non-positive or non-finite value, or ``intensity_image`` does not match.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {labels.dtype}")
    if spacing is None:
        spacing = (1.0,) * labels.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != labels.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} must be {labels.ndim} positive finite numbers")
    properties = ["label", "num_pixels", "area", "centroid"]
    if intensity_image is not None:
        intensity_image = np.asarray(intensity_image)
        if channel_axis is not None:
            intensity_image = np.moveaxis(intensity_image, channel_axis, -1)
        if intensity_image.shape[: labels.ndim] != labels.shape or intensity_image.ndim > labels.ndim + 1:
            raise ValueError(
                f"intensity_image of shape {intensity_image.shape} does not match labels {labels.shape}"
            )
        properties.append("intensity_mean")
    raw = regionprops_table(labels, intensity_image, properties=properties, spacing=spacing)
    size = "area" if labels.ndim == 2 else "volume"
    axes = "zyx"[3 - labels.ndim :]
    table: dict[str, np.ndarray] = {}
    if t is not None:
        table["t"] = np.full(len(raw["label"]), int(t))
    table["label"] = raw["label"]
    if any(s != 1.0 for s in spacing):
        table["pixels"] = raw["num_pixels"]
    table[size] = np.asarray(raw["area"], dtype=float)
    for i, axis in enumerate(axes):
        table[f"centroid_{axis}"] = raw[f"centroid-{i}"]
    for key, value in raw.items():
        if key.startswith("intensity_mean"):
            table[key.replace("intensity_mean", "mean_intensity")] = value
    return table


def write_table_csv(path: str | os.PathLike, table: Mapping[str, Sequence]) -> Path:
    """Write a column table (``{name: values}``, a pandas DataFrame works) as CSV.

    Parameters
    ----------
    path : str or PathLike
        Output file; parent folders are created.
    table : mapping of str to sequence
        Columns of equal length.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        If the columns differ in length.
    """
    path = Path(path)
    keys = [str(k) for k in table]
    columns = [list(np.asarray(table[k]).tolist()) for k in table]
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: {dict(zip(keys, map(len, columns)))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        writer.writerows(zip(*columns))
    return path
