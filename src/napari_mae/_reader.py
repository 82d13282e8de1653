"""npe2 reader contribution: NIfTI, NRRD and TIFF with physical spacing.

The heavy lifting is in :mod:`napari_mae.io.readers` (no napari imports there).
Returns ``None`` ("not my file") for files it cannot handle, so napari can try
another reader; a file that matches but is corrupt raises an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from napari_mae.io.readers import is_supported, read_image

# Integer images whose file name says so are opened as Labels layers.
_LABEL_NAME = re.compile(r"(label|seg|mask|annotation|gt)", re.IGNORECASE)


def napari_get_reader(path):
    """Return a reader function for ``path``, or ``None`` if it is not ours.

    Parameters
    ----------
    path : str or list of str
        A single file path; lists are accepted when every item is supported.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_supported(p) and Path(p).is_file() for p in paths):
        return None
    return read_files


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_files(path) -> list[tuple]:
    """Read one or more files into napari layer-data tuples with ``scale`` = spacing.

    A ``T`` axis gets scale 1; channels (non-RGB) become separate layers through
    ``channel_axis``; RGB TIFFs open as RGB layers; integer images named like labels
    (``*label*``, ``*seg*``, ``*mask*``) open as Labels layers.

    Raises
    ------
    napari_mae.io.readers.ImageReadError
        If a file is corrupt or empty (the message names the file).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        p = Path(p)
        data, spacing, meta = read_image(p)
        axes = meta["axes"]
        scale = [1.0] * ("T" in axes) + list(spacing)
        kwargs: dict = {"name": _layer_name(p), "metadata": {"path": str(p), "axes": axes}}
        if meta.get("voxel_affine") is not None:
            # Kept so that results saved as NIfTI (napari_mae._writer) overlay the scan.
            kwargs["metadata"]["voxel_affine"] = np.asarray(meta["voxel_affine"])
        if meta.get("unit") not in (None, "pixel"):
            kwargs["units"] = meta["unit"]
        is_channel = axes.endswith("C")
        if is_channel and meta.get("rgb") and data.dtype == np.uint8:
            kwargs["rgb"] = True
            kwargs["scale"] = scale
            layers.append((data, kwargs, "image"))
            continue
        if is_channel:
            kwargs["channel_axis"] = data.ndim - 1
            kwargs["name"] = [f"{kwargs['name']} [{c}]" for c in range(data.shape[-1])]
        kwargs["scale"] = scale
        is_labels = (
            not is_channel and np.issubdtype(data.dtype, np.integer) and bool(_LABEL_NAME.search(p.name))
        )
        layers.append((data, kwargs, "labels" if is_labels else "image"))
    return layers
