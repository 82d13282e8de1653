"""OME-Zarr images read lazily as dask arrays, and labels written beside them.

Reading and writing go through the field's libraries: ``ome-zarr`` (``ome_zarr.io.parse_url``,
``ome_zarr.reader.Reader``, ``ome_zarr.writer.write_labels``) on ``zarr``; nothing here
parses the format by hand. What this module adds is the mapping to the conventions of
:mod:`napari_mae.io.readers`:

* ``axes`` as a string of upper-case letters (``"ZYX"``, ``"CZYX"``, ``"TCZYX"``);
* ``spacing``: the ``scale`` of the level's ``coordinateTransformations`` on the *spatial*
  axes, in the unit of those axes (``"micrometer"`` etc. as the file says; ``"pixel"``
  where the axes have no unit);
* every multiscale level as a dask array (nothing is read until computed).

A Zarr store without OME metadata is refused with a clear error (:class:`OMEZarrError`)
unless ``plain=True``, which reads a plain Zarr array with spacing 1 ("pixel").

No napari import here: :func:`napari_get_reader` returns plain layer-data tuples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OMEZarrError",
    "OMEZarrImage",
    "is_zarr",
    "read_ome_zarr",
    "write_ome_labels",
    "napari_get_reader",
]

ZARR_SUFFIXES = (".zarr", ".ome.zarr")


class OMEZarrError(ValueError):
    """A Zarr store that cannot be read as an OME-Zarr image (the message says why)."""


@dataclass
class OMEZarrImage:
    """An OME-Zarr multiscale image, lazily.

    Attributes
    ----------
    levels : list of dask.array.Array
        Multiscale levels, full resolution first; shape ``(..., [Z,] Y, X)`` in ``axes`` order.
    axes : str
        Upper-case axis letters of every level, e.g. ``"CZYX"``.
    scales : list of tuple of float
        Per level, the ``scale`` of its coordinateTransformations, one value per axis.
    units : tuple of str
        One unit per axis ("" where the file gives none).
    path : Path
        The image group on disk.
    array_paths : list of str
        The Zarr array of each level, relative to ``path`` (``"s0"``, ``"0"``, ...).
    labels : dict
        Label images found in the ``labels/`` group: name -> list of dask levels.
    name : str
    """

    levels: list
    axes: str
    scales: list
    units: tuple
    path: Path
    array_paths: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    name: str = ""

    @property
    def spatial(self) -> list[int]:
        """Indices of the spatial axes (Z, Y, X present) in ``axes``."""
        return [i for i, a in enumerate(self.axes) if a in "ZYX"]

    def spacing(self, level: int = 0) -> tuple[float, ...]:
        """Physical size per spatial axis of ``level``, in :attr:`unit`."""
        return tuple(float(self.scales[level][i]) for i in self.spatial)

    @property
    def unit(self) -> str:
        """The spatial axes' unit ("pixel" where the file gives none)."""
        units = {self.units[i] for i in self.spatial} - {""}
        return units.pop() if len(units) == 1 else ("pixel" if not units else "/".join(sorted(units)))


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local Zarr store (v2 or v3 metadata) or named like one."""
    p = Path(path)
    if p.is_dir() and any((p / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray")):
        return True
    return str(p).lower().rstrip("/").endswith(ZARR_SUFFIXES)


def _axis_letters(axes: list) -> str:
    names = [(a["name"] if isinstance(a, dict) else str(a)) for a in axes]
    return "".join(n.upper()[:1] for n in names)


def read_ome_zarr(path: str | os.PathLike, *, plain: bool = False) -> OMEZarrImage:
    """Open an OME-Zarr image (all multiscale levels, lazily) with its axes and scale.

    Parameters
    ----------
    path : str or path
        The image group (the folder holding ``zarr.json`` or ``.zattrs`` with
        ``multiscales``), local.
    plain : bool
        Accept a plain Zarr *array* without OME metadata: one level, axes ``"YX"`` or
        ``"ZYX"``, spacing 1 ("pixel").

    Returns
    -------
    OMEZarrImage

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    OMEZarrError
        If it is not a Zarr store, or (without ``plain``) has no OME ``multiscales``
        metadata, or has no ``axes`` (OME-NGFF before 0.3).
    """
    import dask.array as da
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such Zarr store")
    loc = parse_url(str(p), mode="r")
    image = None
    nodes: list = []
    if loc is not None:
        # The reader warns "no parent found" for every label image it visits on its own.
        log = logging.getLogger("ome_zarr.reader")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            nodes = list(Reader(loc)())
        finally:
            log.setLevel(level)
        image = next(
            (
                n
                for n in nodes
                if any(isinstance(s, Multiscales) for s in n.specs)
                and not any(isinstance(s, Label) for s in n.specs)
            ),
            None,
        )
    if image is None:
        try:
            arr = zarr.open_array(str(p), mode="r")
        except Exception:
            arr = None
        if arr is None:
            what = "no OME-Zarr image (no 'multiscales' metadata)" if loc is not None else "not a Zarr store"
            raise OMEZarrError(f"{path}: {what}")
        if not plain:
            raise OMEZarrError(
                f"{path}: a plain Zarr array without OME metadata (no axes, no voxel size); "
                "write it as OME-Zarr (ome-zarr), or give --spacing to use it with that voxel size"
            )
        if arr.ndim not in (2, 3):
            raise OMEZarrError(f"{path}: a plain Zarr array must be 2D or 3D, got shape {arr.shape}")
        return OMEZarrImage(
            levels=[da.from_zarr(arr)],
            axes="ZYX"[-arr.ndim :],
            scales=[(1.0,) * arr.ndim],
            units=("",) * arr.ndim,
            path=p,
            array_paths=[""],
            name=p.name,
        )
    meta = image.metadata
    axes_meta = meta.get("axes")
    if not axes_meta:
        raise OMEZarrError(f"{path}: OME-Zarr without 'axes' (NGFF < 0.3) is not supported")
    axes = _axis_letters(axes_meta)
    units = tuple(str(a.get("unit", "")) if isinstance(a, dict) else "" for a in axes_meta)
    transforms = meta.get("coordinateTransformations") or [[] for _ in image.data]
    scales = []
    for level_tf in transforms:
        sc = next((t["scale"] for t in level_tf if t.get("type") == "scale"), [1.0] * len(axes))
        scales.append(tuple(float(s) for s in sc))
    group = zarr.open_group(str(p), mode="r")
    attrs = dict(group.attrs)
    ms = (attrs.get("ome", attrs)).get("multiscales", [{}])[0]
    array_paths = [d["path"] for d in ms.get("datasets", [])]
    labels = {}
    for n in nodes:
        if any(isinstance(s, Label) for s in n.specs) and not any(isinstance(s, Labels) for s in n.specs):
            labels[str(n.metadata.get("name") or Path(str(n.zarr)).name)] = list(n.data)
    return OMEZarrImage(
        levels=list(image.data),
        axes=axes,
        scales=scales,
        units=units,
        path=p,
        array_paths=array_paths,
        labels=labels,
        name=str(meta.get("name") or p.name),
    )


def read_ome_zarr_image(path: str | os.PathLike, *, level: int = 0, plain: bool = False):
    """One level of an OME-Zarr image in the ``(image, spacing, meta)`` form of
    :func:`napari_mae.io.readers.read_image`, lazily.

    Returns
    -------
    image : dask.array.Array, shape ``[T,] [C,] [Z,] Y, X`` with singleton T and C dropped
    spacing : tuple of float, one per spatial axis
    meta : dict
        ``axes`` (letters of the returned array, channels moved last as ``C``), ``unit``,
        ``path``, ``level``, ``n_levels``, ``format`` ("ome-zarr").

    Raises
    ------
    OMEZarrError
        As :func:`read_ome_zarr`, or for a level that does not exist.
    """
    img = read_ome_zarr(path, plain=plain)
    if not 0 <= level < len(img.levels):
        raise OMEZarrError(f"{path}: level {level} does not exist (the image has {len(img.levels)})")
    data = img.levels[level]
    axes = img.axes
    # Singleton time / channel axes dropped; channels moved last (the readers' convention).
    for letter in "TC":
        i = axes.find(letter)
        if i >= 0 and data.shape[i] == 1:
            data = data[(slice(None),) * i + (0,)]
            axes = axes[:i] + axes[i + 1 :]
    c = axes.find("C")
    if c >= 0:
        import dask.array as da

        data = da.moveaxis(data, c, -1)
        axes = axes[:c] + axes[c + 1 :] + "C"
    meta = {
        "axes": axes,
        "unit": img.unit,
        "path": str(img.path),
        "level": level,
        "n_levels": len(img.levels),
        "format": "ome-zarr",
        "array_path": img.array_paths[level] if img.array_paths else "",
    }
    return data, img.spacing(level), meta


def write_ome_labels(
    image_path: str | os.PathLike,
    labels,
    *,
    name: str = "napari-mae",
    axes: str,
    spacing,
    unit: str | None = None,
    chunks=None,
    compute: bool = True,
):
    """Write labels as OME-Zarr labels beside an image: ``image_path/labels/name``.

    Written as ``ome_zarr.writer.write_labels`` writes them (its classes ``OMEZarrImage``
    and ``OMEZarrLabels``), one level (no pyramid), with the scale and unit given and the
    ``image-label`` metadata; a dask array is written chunk by chunk (on the active dask
    client, if any), in one pass over the labels.

    Parameters
    ----------
    image_path : str or path
        The OME-Zarr image group (created if it does not exist).
    labels : ndarray or dask.array.Array of int, shape ``[Z,] Y, X``
    name : str
        Name of the label image in the ``labels/`` group.
    axes : str
        Letters of ``labels``' axes, e.g. ``"ZYX"``.
    spacing : sequence of float
        Physical size per axis.
    unit : str or None
        Unit of the spatial axes (e.g. "micrometer"); None or "pixel" writes none.
    chunks : tuple of int or None
        Zarr chunks; default the dask chunks (or 256 per axis for a numpy array).
    compute : bool
        False returns the dask jobs without running them.

    Raises
    ------
    ValueError
        If ``axes`` and ``spacing`` do not match the labels' dimensions.
    """
    import dask.array as da
    from ome_zarr.classes import OMEZarrImage, OMEZarrLabels
    from ome_zarr.writer import check_group_fmt, write_label_metadata

    if len(axes) != labels.ndim or len(spacing) != labels.ndim:
        raise ValueError(f"axes {axes!r} and spacing {tuple(spacing)} must have {labels.ndim} entries")
    if not isinstance(labels, da.Array):
        labels = da.from_array(np.asarray(labels), chunks=chunks or tuple(min(256, n) for n in labels.shape))
    elif chunks is not None:
        labels = labels.rechunk(chunks)
    dims = [a.lower() for a in axes]
    units = None
    if unit not in (None, "", "pixel"):
        units = {d: unit for d in dims if d in "zyx"}
    # ome_zarr.writer.write_labels' steps, but OMEZarrLabels(auto_parse_labels=False):
    # write_labels lets it list the label values (da.unique over the whole label image, an
    # extra pass before the write, and a colour entry per object built in this process,
    # which grows with the number of objects) and then discards that list (the
    # image-label metadata it writes has no colours).
    group, fmt = check_group_fmt(str(image_path))
    sub_group = group.require_group(f"labels/{name}")
    image = OMEZarrImage(
        data=labels,
        axes=dims,
        name=name,
        scale={d: float(s) for d, s in zip(dims, spacing)},
        axes_units=units,
    )
    jobs = OMEZarrLabels(image=image, scale_factors=(), auto_parse_labels=False).to_ome_zarr(
        group=sub_group,
        storage_options={"chunks": tuple(int(c[0]) for c in labels.chunks)},
        version=fmt.version,
        compute=compute,
        overwrite=True,
    )
    write_label_metadata(group=group["labels"], name=name, fmt=fmt)
    return jobs


# --------------------------------------------------------------------------- npe2 reader


def napari_get_reader(path):
    """npe2 reader contribution: a reader for an OME-Zarr folder, or ``None``.

    Parameters
    ----------
    path : str or list of str
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(is_zarr(p) and Path(p).is_dir() for p in paths):
        return None
    return read_layers


def read_layers(path) -> list[tuple]:
    """OME-Zarr images as napari layer-data tuples: every multiscale level (dask), the
    level-0 ``scale`` on every axis, the spatial ``units`` and ``axis_labels``; channels as
    separate layers; the label images of ``labels/`` as Labels layers with the same scale.

    Raises
    ------
    OMEZarrError
        If a folder is not an OME-Zarr image.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        img = read_ome_zarr(p)
        axes = img.axes
        scale = list(img.scales[0])
        units = [u if u else "pixel" for u in img.units]
        kwargs: dict[str, Any] = {
            "name": img.name,
            "multiscale": len(img.levels) > 1,
            "metadata": {"path": str(img.path), "axes": axes, "format": "ome-zarr"},
        }
        data = img.levels if len(img.levels) > 1 else img.levels[0]
        c = axes.find("C")
        keep = [i for i in range(len(axes)) if i != c]
        kwargs["scale"] = [scale[i] for i in keep]
        kwargs["axis_labels"] = [axes[i].lower() for i in keep]
        if any(units[i] != "pixel" for i in keep):
            kwargs["units"] = [units[i] for i in keep]
        if c >= 0:
            kwargs["channel_axis"] = c
            n_c = img.levels[0].shape[c]
            kwargs["name"] = [f"{img.name} [{k}]" for k in range(n_c)]
        layers.append((data, kwargs, "image"))
        spatial = img.spatial
        for name, levels in img.labels.items():
            lab_kwargs = {
                "name": name,
                "multiscale": len(levels) > 1,
                "scale": [scale[i] for i in spatial][-levels[0].ndim :],
                "metadata": {"path": str(img.path / "labels" / name), "format": "ome-zarr"},
            }
            if any(units[i] != "pixel" for i in spatial):
                lab_kwargs["units"] = [units[i] for i in spatial][-levels[0].ndim :]
            layers.append((levels if len(levels) > 1 else levels[0], lab_kwargs, "labels"))
    return layers
