"""Read microscopy and medical images together with their physical voxel spacing.

Axis conventions (the same for every format):

* Arrays come back as ``[T,] [Z,] Y, X [, C]``: time first, then the spatial axes
  in (Z, Y, X) order, channels (or RGB samples) last. Singleton time and channel
  axes are dropped.
* ``spacing`` holds one physical size per *spatial* axis, in (Z, Y, X) or (Y, X)
  order: micrometres for microscopy TIFFs that say so, millimetres for NIfTI and
  NRRD, 1.0 (pixels) where the file has no calibration.
* NIfTI and NRRD volumes are reoriented (without resampling) so that the returned
  (Z, Y, X) axes run towards patient Superior, Posterior and Left. An axial slice
  then shows the patient as radiologists view it: anterior at the top, the
  patient's right on the left of the screen. The original affine is kept in the
  metadata.

TIFF is read with tifffile (ImageJ, OME and plain TIFF resolution tags);
PNG and JPEG with imageio (Pillow), without spacing (1.0 pixel); NIfTI/NRRD with
MONAI's ``NibabelReader`` / ``NrrdReader`` through ``LoadImage``. An RGB(A) PNG or
JPEG comes back as an RGB TIFF does: ``(Y, X, 3|4)``, ``axes`` ``"YXC"``, ``rgb`` True.
:class:`TifffileReader` makes the TIFF, PNG and JPEG paths available to MONAI pipelines,
because MONAI's PIL fallback silently reads only the first page of a multi-page TIFF
(and returns a palette PNG's indices, not its colours).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd",)
#: 2D raster formats without physical calibration, read with imageio.
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Every file suffix :func:`read_image` reads (and so every command: segment, reconstruct,
#: finetune, train, batch).
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + RASTER_SUFFIXES + NIFTI_SUFFIXES + NRRD_SUFFIXES
#: The formats :func:`read_image` reads, as the command-line help names them.
FORMAT_NAMES = "TIFF, PNG, JPEG, NIfTI, NRRD"
#: Every suffix an image file or store of this package may have (what :func:`image_stem` strips).
IMAGE_SUFFIXES = SUPPORTED_SUFFIXES + (".ome.tif", ".ome.tiff", ".ome.zarr", ".zarr")

# Micrometres per unit, for the units found in TIFF resolution tags and ImageJ metadata.
_UM_PER_UNIT = {
    "um": 1.0,
    "µm": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "inch": 25400.0,
}

# Orientation of the returned (Z, Y, X) axes, as nibabel axis codes of the voxel
# axes (i, j, k) before the final transpose: i -> patient Left, j -> Posterior,
# k -> Superior, then (i, j, k) is transposed to (k, j, i) = (Z, Y, X).
_VOXEL_AXCODES = ("L", "P", "S")


class ImageReadError(ValueError):
    """A file exists but cannot be read as an image (corrupt, empty, unsupported)."""


def _matching_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    """The longest of ``suffixes`` that ``name`` ends with (case-insensitive), or ""."""
    low = name.lower()
    return max((s for s in suffixes if low.endswith(s)), key=len, default="")


def _suffix(path: str | os.PathLike) -> str:
    name = str(path)
    return _matching_suffix(name, SUPPORTED_SUFFIXES) or Path(name.lower()).suffix


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix: ``a.nii.gz`` -> ``a``, ``b.ome.tif`` -> ``b``.

    Parameters
    ----------
    path : str or PathLike
        A file or store (``.zarr``) name; only the last component is used.

    Returns
    -------
    str
        The name without the longest of :data:`IMAGE_SUFFIXES` it ends with
        (case-insensitive), or the whole name where it ends with none.
    """
    name = Path(path).name
    suffix = _matching_suffix(name, IMAGE_SUFFIXES)
    return name[: len(name) - len(suffix)]


def is_supported(path: str | os.PathLike) -> bool:
    """Return True when ``path`` has a suffix this module reads (``.tif``, ``.nii.gz``, ...)."""
    return _suffix(path) in SUPPORTED_SUFFIXES


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """Read an image file with its physical voxel spacing.

    Parameters
    ----------
    path : str or PathLike
        A ``.tif``/``.tiff``, ``.png``, ``.jpg``/``.jpeg``, ``.nii``/``.nii.gz`` or
        ``.nrrd`` file.

    Returns
    -------
    image : ndarray
        Axes ``[T,] [Z,] Y, X [, C]`` (see the module docstring); the file's dtype.
    spacing : tuple of float
        Physical size of one voxel along each spatial axis, (Z, Y, X) or (Y, X);
        units in ``metadata["unit"]`` (``"um"``, ``"mm"`` or ``"pixel"``).
    metadata : dict
        ``axes`` (e.g. ``"ZYX"``, ``"YXC"``, ``"TZYX"``), ``unit``, ``rgb`` (bool),
        ``path``, and for NIfTI/NRRD ``affine`` (the file's original 4x4 voxel-to-RAS
        affine), ``voxel_affine`` (the 4x4 voxel-to-RAS affine of the returned array's
        axes reversed, (X, Y, Z) = (L, P, S): what :func:`napari_mae.io.writers.write_nifti`
        needs to put results back in the scanner's space) and ``orientation`` (the axis
        codes of the returned Z, Y, X axes).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ImageReadError
        If the file is empty, corrupt, or of an unsupported type; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such image file: {path}")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes)")
    suffix = _suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            return read_tiff(path)
        if suffix in RASTER_SUFFIXES:
            return read_raster(path)
        if suffix in NIFTI_SUFFIXES + NRRD_SUFFIXES:
            _check_medical_header(path, suffix)
            return read_medical(path)
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile/nibabel/pynrrd raise many kinds on corrupt files
        raise ImageReadError(f"Could not read {path}: {type(exc).__name__}: {exc}") from exc
    raise ImageReadError(
        f"{path}: unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


# --------------------------------------------------------------------------- TIFF


def _tiff_resolution_um(page, unit_scale: float) -> tuple[float | None, float | None]:
    """Return (y, x) pixel size from the page's resolution tags, or None where absent."""
    out = []
    for tag_name in ("YResolution", "XResolution"):
        tag = page.tags.get(tag_name)
        if tag is None:
            out.append(None)
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if not num or not den:
            out.append(None)
            continue
        pixels_per_unit = num / den
        # A resolution of 1 pixel per unit is the TIFF default: no calibration.
        out.append(None if pixels_per_unit == 1 else unit_scale / pixels_per_unit)
    return out[0], out[1]


def _ome_spacing(ome_xml: str) -> tuple[dict[str, float], str]:
    """Return ({axis: size}, unit) from OME ``PhysicalSize*``; sizes in that unit.

    Millimetres stay millimetres (medical results written by :mod:`napari_mae.io.writers`);
    other units are converted to micrometres.
    """
    import tifffile

    try:
        ome = tifffile.xml2dict(ome_xml)["OME"]
        image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
        pixels = image["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return {}, "pixel"
    units = {str(pixels.get(f"PhysicalSize{a}Unit", "µm")) for a in "ZYX" if pixels.get(f"PhysicalSize{a}")}
    keep_mm = units == {"mm"}
    spacing = {}
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        if value:
            unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            spacing[axis] = float(value) if keep_mm else float(value) * _UM_PER_UNIT.get(unit, 1.0)
    return spacing, ("mm" if keep_mm else "um") if spacing else "pixel"


def _canonical_tiff_axes(axes: str) -> list[str]:
    """Map tifffile axis letters to T, Z, Y, X, C, keeping the array's order for unnamed axes.

    Generic page axes (I, Q, E, R, ...: a file without axis metadata) take the
    names T and Z that named axes leave free, so that the array's own order reads
    ``[T,] [Z,] Y, X``: the generic axis nearest Y/X becomes Z, one before it T.
    A (2, 8, 64, 64) array written without metadata (``"QQYX"``) is (T, Z, Y, X).
    More generic axes than free names stay generic (``"Q"``) and are rejected by
    the caller.
    """
    named = {"Y": "Y", "X": "X", "C": "C", "S": "C", "T": "T", "Z": "Z"}
    mapped = [named.get(letter, "?") for letter in axes]
    free = [a for a in "TZ" if a not in mapped]
    for i in reversed([i for i, a in enumerate(mapped) if a == "?"]):
        mapped[i] = free.pop() if free else "Q"
    return mapped


def read_tiff(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """Read a TIFF (all pages) with its spacing; see :func:`read_image` for the returns.

    Spacing comes from OME ``PhysicalSize*``, else ImageJ metadata (``spacing`` for Z,
    resolution tags for Y/X, ``unit``), else the resolution tags and ``ResolutionUnit``;
    1.0 pixel where none is present.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageReadError(f"{path}: TIFF holds no image series")
        series = tif.series[0]
        image = series.asarray()
        axes = series.axes
        file_shape, file_axes = tuple(int(n) for n in image.shape), str(axes)
        page = tif.pages[0]
        ij = tif.imagej_metadata or {}
        ome_spacing, unit = (
            _ome_spacing(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else ({}, "pixel")
        )
        ij_unit = str(ij.get("unit", "")).replace("\\u00B5", "µ")
        unit_scale = _UM_PER_UNIT.get(ij_unit)
        if unit_scale is None:
            res_unit = page.tags.get("ResolutionUnit")
            res_value = int(res_unit.value) if res_unit is not None else 1
            unit_scale = {2: _UM_PER_UNIT["inch"], 3: _UM_PER_UNIT["cm"]}.get(res_value)
        yx = _tiff_resolution_um(page, unit_scale or 1.0)
        rgb = "S" in axes and image.shape[axes.index("S")] in (3, 4)

    if ij and int(ij.get("channels", 1)) == 1 and "C" in axes:
        # tifffile labels the page axis of a plain ImageJ stack (``images=N`` with no
        # ``channels``/``slices``) as C; ImageJ itself shows such a stack as slices.
        axes = axes.replace("C", "Z" if "Z" not in axes else "I")
    letters = _canonical_tiff_axes(axes)
    # Drop singleton T and C axes, then order as T, Z, Y, X, C.
    keep = [i for i, a in enumerate(letters) if not (a in "TC" and image.shape[i] == 1)]
    image = image.reshape([image.shape[i] for i in keep]) if len(keep) != image.ndim else image
    letters = [letters[i] for i in keep]
    if letters.count("Z") > 1 or letters.count("T") > 1 or letters.count("C") > 1 or "Q" in letters:
        raise ImageReadError(
            f"{path}: cannot interpret TIFF axes {axes!r} (shape {image.shape}): at most time, "
            "Z, Y, X and channels are read"
        )
    order = [letters.index(a) for a in "TZYXC" if a in letters]
    image = np.transpose(image, order)
    out_axes = "".join(a for a in "TZYXC" if a in letters)

    spacing_map: dict[str, float] = {}
    if ome_spacing:
        spacing_map.update(ome_spacing)
    else:
        if yx[0] is not None:
            spacing_map["Y"] = yx[0]
        if yx[1] is not None:
            spacing_map["X"] = yx[1]
        if "spacing" in ij:
            spacing_map["Z"] = float(ij["spacing"]) * (unit_scale or 1.0)
        if spacing_map and unit_scale is not None:
            unit = "um"
    spatial = [a for a in out_axes if a in "ZYX"]
    spacing = tuple(float(spacing_map.get(a, 1.0)) for a in spatial)
    metadata = {"axes": out_axes, "unit": unit, "rgb": bool(rgb), "path": str(path)}
    if file_shape != image.shape:  # reordered or squeezed: messages give the file's own shape too
        metadata["file_shape"], metadata["file_axes"] = file_shape, file_axes
    return image, spacing, metadata


def describe_layout(image, metadata: dict[str, Any]) -> str:
    """``axes ..., shape ...`` of an image from :func:`read_image`, for messages.

    Where the reader reordered or dropped axes (a TIFF), the file's own shape and
    tifffile's axis letters follow, so a user finds the array they wrote:
    ``axes TZYXC, shape (2, 3, 32, 32, 4), read from the file's shape (2, 3, 4, 32, 32)
    (tifffile's axes 'QQSYX')``.
    """
    text = f"axes {metadata.get('axes', '?')}, shape {tuple(image.shape)}"
    if "file_shape" in metadata:
        text += f", read from the file's shape {tuple(metadata['file_shape'])}"
        if metadata.get("file_axes"):
            text += f" (tifffile's axes {metadata['file_axes']!r})"
    return text


# ------------------------------------------------------------------ PNG / JPEG


def read_raster(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """Read a PNG or JPEG (first frame) with imageio; see :func:`read_image` for the returns.

    Grey images come back as ``(Y, X)`` (``axes`` ``"YX"``), colour ones as ``(Y, X, C)``
    (``axes`` ``"YXC"``) with ``rgb`` True for 3 or 4 samples, as :func:`read_tiff` returns
    an RGB(A) TIFF; a palette image comes back as its colours. The spacing is
    ``(1.0, 1.0)`` pixel: these formats carry no physical calibration that microscopes
    write.
    """
    import imageio.v3 as iio

    try:
        image = np.asarray(iio.imread(path, plugin="pillow", index=0))
    except OSError as exc:  # imageio's message lists plugins to install; say what the file is not
        raise ImageReadError(f"Could not read {path}: not a readable PNG or JPEG file") from exc
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        axes = "YX"
    elif image.ndim == 3 and image.shape[-1] <= 4:
        axes = "YXC"
    else:
        raise ImageReadError(f"{path}: expected a 2D grey or colour image, got shape {image.shape}")
    rgb = axes == "YXC" and image.shape[-1] in (3, 4)
    metadata = {"axes": axes, "unit": "pixel", "rgb": bool(rgb), "path": str(path)}
    return image, (1.0, 1.0), metadata


# ------------------------------------------------------------------ NIfTI / NRRD

# NRRD "type" field -> numpy dtype (NRRD spec, "type" section). pynrrd keeps its own
# table private, so the spec's names are listed here.
_NRRD_TYPES = {
    np.int8: ("signed char", "int8", "int8_t"),
    np.uint8: ("uchar", "unsigned char", "uint8", "uint8_t"),
    np.int16: ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    np.uint16: ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    np.int32: ("int", "signed int", "int32", "int32_t"),
    np.uint32: ("uint", "unsigned int", "uint32", "uint32_t"),
    np.int64: (
        "longlong",
        "long long",
        "long long int",
        "signed long long",
        "signed long long int",
        "int64",
        "int64_t",
    ),
    np.uint64: ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    np.float32: ("float",),
    np.float64: ("double",),
}


def _check_medical_header(path: Path, suffix: str) -> None:
    """Raise a one-line ``ImageReadError`` for a ``.nii``/``.nii.gz``/``.nrrd`` that is not one.

    Checked before MONAI, which would otherwise try each of its readers, log a
    traceback for each and end with "Please install the reader libraries".
    NIfTI-1/2 headers start with their size, 348 or 540, in either byte order;
    NRRD files start with ``NRRD``.
    """
    import gzip
    import struct

    try:
        with open(path, "rb") as raw:
            start = raw.read(4)
            if suffix == ".nii.gz":
                if start[:2] != b"\x1f\x8b":
                    raise ImageReadError(
                        f"not a NIfTI file: {path} (a .nii.gz file is gzip-compressed; this is not)"
                    )
                raw.seek(0)
                with gzip.open(raw) as unzipped:
                    start = unzipped.read(4)
    except (OSError, EOFError) as exc:
        raise ImageReadError(f"not a NIfTI file: {path} (broken gzip data: {exc})") from exc
    if suffix in NRRD_SUFFIXES:
        if start != b"NRRD":
            raise ImageReadError(f"not an NRRD file: {path} (it does not start with 'NRRD')")
        return
    sizes = set(struct.unpack("<i", start) + struct.unpack(">i", start)) if len(start) == 4 else set()
    if not sizes & {348, 540}:
        raise ImageReadError(f"not a NIfTI file: {path} (no NIfTI-1 or NIfTI-2 header)")


def _nrrd_dtype(path: str | os.PathLike):
    import nrrd

    header = nrrd.read_header(str(path))
    name = str(header.get("type", "float")).strip().lower()
    for dtype, names in _NRRD_TYPES.items():
        if name in names:
            return dtype
    return np.float32


def read_medical(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """Read a NIfTI or NRRD volume through MONAI, reoriented to (Z, Y, X) = (S, P, L).

    See :func:`read_image` for the returns. A 4D file (X, Y, Z, T) comes back as
    (T, Z, Y, X). Spacing is in millimetres, taken from the affine after
    reorientation (so it follows the axes, also for oblique or flipped headers).
    """
    import nibabel as nib
    from monai.data import NibabelReader, NrrdReader
    from monai.transforms import LoadImage

    suffix = _suffix(path)
    # MONAI's NrrdReader casts to its `dtype` argument (None means float64), so pass
    # the header's own type to keep e.g. int16 Hounsfield units as int16.
    reader = NrrdReader(dtype=_nrrd_dtype(path)) if suffix in NRRD_SUFFIXES else NibabelReader(dtype=None)
    loaded = LoadImage(reader=reader, image_only=True, dtype=None)(str(path))
    data = np.asarray(loaded.array if hasattr(loaded, "array") else loaded)
    affine = np.asarray(loaded.affine, dtype=float)  # voxel (i, j, k) -> RAS world, mm
    if data.ndim < 2:
        raise ImageReadError(f"{path}: expected a 2D-4D image, got shape {data.shape}")
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim > 4:
        raise ImageReadError(f"{path}: expected at most 4 dimensions (X, Y, Z, T), got shape {data.shape}")
    if affine.shape != (4, 4):
        affine = np.eye(4)

    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(_VOXEL_AXCODES)
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
    voxel_mm = np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))  # size of (i, j, k) steps
    # (i, j, k[, t]) -> ([t,] k, j, i) = ([T,] Z, Y, X)
    order = (3, 2, 1, 0) if data.ndim == 4 else (2, 1, 0)
    data = np.ascontiguousarray(np.transpose(data, order))
    spacing = tuple(float(s) for s in voxel_mm[::-1])
    metadata = {
        "axes": "TZYX" if data.ndim == 4 else "ZYX",
        "unit": "mm",
        "rgb": False,
        "path": str(path),
        "affine": affine,
        "voxel_affine": new_affine,
        "orientation": ("S", "P", "L"),
    }
    return data, spacing, metadata


# ------------------------------------------------------------------ MONAI reader


def _build_tifffile_reader_class():
    from monai.data import ImageReader
    from monai.utils import MetaKeys, SpaceKeys

    class TifffileReader(ImageReader):
        """MONAI ``ImageReader`` for (multi-page) TIFF, PNG and JPEG files, built on
        :func:`read_tiff` and :func:`read_raster`.

        Reads every page (MONAI's PIL fallback reads only the first page of a 3D
        TIFF, and a palette PNG's indices). The array's spatial axes are (Z, Y, X) or
        (Y, X) as :func:`read_image` returns them (numpy order), channels last
        (``original_channel_dim = -1``); the affine is ``diag(spacing, 1)`` in the
        file's units. Time axes are not supported here (``ValueError``).
        """

        def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
            names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
            return all(_suffix(n) in TIFF_SUFFIXES + RASTER_SUFFIXES for n in names)

        def read(self, data, **kwargs):
            names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
            out = [read_tiff(n) if _suffix(n) in TIFF_SUFFIXES else read_raster(n) for n in names]
            return out if len(out) > 1 else out[0]

        def get_data(self, img):
            items = img if isinstance(img, list) else [img]
            arrays, meta = [], {}
            for array, spacing, info in items:
                if "T" in info["axes"]:
                    raise ValueError(f"{info['path']}: TIFF with a time axis cannot be used here")
                has_channel = info["axes"].endswith("C")
                spatial_shape = array.shape[:-1] if has_channel else array.shape
                affine = np.diag([*spacing, 1.0])
                meta = {
                    MetaKeys.AFFINE: affine,
                    MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                    MetaKeys.SPATIAL_SHAPE: np.asarray(spatial_shape),
                    MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if has_channel else float("nan"),
                    MetaKeys.SPACE: SpaceKeys.RAS,
                    "spacing": np.asarray(spacing),
                    "filename_or_obj": info["path"],
                }
                arrays.append(array)
            if len(arrays) == 1:
                return arrays[0], meta
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta

    return TifffileReader


_TIFF_READER_CLASS = None


def __getattr__(name: str):
    # Build the MONAI subclass on first use so that importing this module (done by
    # napari at start-up, through the reader contribution) does not import MONAI.
    global _TIFF_READER_CLASS
    if name == "TifffileReader":
        if _TIFF_READER_CLASS is None:
            _TIFF_READER_CLASS = _build_tifffile_reader_class()
        return _TIFF_READER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def monai_readers() -> list:
    """Reader instances for MONAI ``LoadImage(d)``: TIFF, PNG and JPEG, then NIfTI and NRRD.

    Returns
    -------
    list
        ``[TifffileReader(), NibabelReader(), NrrdReader()]``, to pass as ``reader=``.
    """
    from monai.data import NibabelReader, NrrdReader

    reader_cls = __getattr__("TifffileReader")
    return [reader_cls(), NibabelReader(), NrrdReader()]
