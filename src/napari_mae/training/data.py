"""Image-folder datasets for MAE training, as MONAI dict-transform pipelines.

A folder (or several) of 2D images and/or 3D volumes becomes a training and a
validation dataset of fixed-size crops ``(C, *img_size)``, float32, intensities
scaled per channel so that the 1st and 99.8th percentiles map to 0 and 1.

The pipeline has two parts:

* a deterministic prefix, run once per file and cached (``CacheDataset`` in
  memory, ``PersistentDataset`` on disk, or nothing)::

      LoadImaged -> EnsureChannelFirstd -> [Spacingd] -> ScaleIntensityRangePercentilesd
      -> channel matching -> EnsureTyped (plain tensor)

  It is wrapped in a guard that turns a failure (unreadable file, 2D image for
  a 3D model, ...) into a record, so that every bad file is found in the same
  pass that fills the cache and reported in **one** warning;

* a random suffix, run for every sample::

      [random 2D plane of a 3D volume] -> SpatialPadd -> RandSpatialCropd
      -> RandFlipd (each axis) -> [RandRotate90d]

  Its random state is re-seeded from ``(seed, epoch, index)`` before each
  sample, so a sample depends only on those three numbers: not on the number of
  DataLoader workers, on the process, or on what was drawn before. This is what
  makes an interrupted and resumed training run reproduce an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, Transform

from napari_mae.training.files import (
    DEFAULT_EXCLUDE,
    DEFAULT_PATTERNS,
    DEFAULT_PERCENTILES,
    find_images,
    sample_seed,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_PATTERNS",
    "FinishItemd",
    "Guarded",
    "ImageFolderData",
    "LoadWithReadersd",
    "Pick",
    "RandPlaned",
    "SeededCrops",
    "find_images",
    "make_datasets",
    "make_transforms",
    "sample_seed",
]

CacheMode = Literal["memory", "disk", "none"]

# Files whose MONAI reader (napari_mae.io.readers.TifffileReader: TIFF, PNG, JPEG) already
# returns numpy axis order ([Z,] Y, X); the other readers return (X, Y[, Z]).
_NUMPY_ORDER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------


# Module-level classes, so that a DataLoader with worker processes can pickle them under
# the "spawn" start method (the default on macOS and Windows).


class LoadWithReadersd(MapTransform):
    """MONAI ``LoadImaged`` with :func:`napari_mae.io.readers.monai_readers` (tifffile for
    every page of a 3D TIFF), built where it first runs.

    The readers are not pickled with the pipeline (a DataLoader worker process builds its
    own), so the pipeline pickles whatever the reader objects are.
    """

    def __init__(self, keys, **kwargs):
        super().__init__(keys)
        self.kwargs = kwargs
        self._load = None

    def __call__(self, data):
        if self._load is None:
            from monai.transforms import LoadImaged

            from napari_mae.io.readers import monai_readers

            self._load = LoadImaged(self.keys, reader=monai_readers(), **self.kwargs)
        return self._load(data)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_load"] = None
        return state


class FinishItemd(MapTransform):
    """Check dimensionality, match channels, record spacing, drop metadata.

    Input ``d[key]``: MetaTensor ``(C, *spatial)``. Output: plain float32
    tensor ``(in_channels, [Z,] Y, X)`` (the spatial axes of NIfTI, NRRD
    and PIL reads, which MONAI gives as ``(X, Y[, Z])``, are reversed) and
    ``d["spacing"]``, a tuple of floats (physical units per spatial axis,
    from the affine; 1.0 where unknown).
    """

    def __init__(self, keys, spatial_dims: int, in_channels: int):
        super().__init__(keys)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n_spatial = img.ndim - 1
            if n_spatial not in (2, 3):
                raise ValueError(f"expected a 2D image or a 3D volume, got array shape {tuple(img.shape)}")
            if self.spatial_dims == 3 and n_spatial == 2:
                raise ValueError("2D image, but the model is 3D")
            pixdim = getattr(img, "pixdim", None)
            spacing = (1.0,) * n_spatial
            if pixdim is not None and len(pixdim) >= n_spatial:
                spacing = tuple(float(abs(s)) or 1.0 for s in list(pixdim)[:n_spatial])
            x = torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img)
            x = x.to(torch.float32)
            source = str(getattr(img, "meta", {}).get("filename_or_obj", d.get("path", "")))
            if not source.lower().endswith(_NUMPY_ORDER_SUFFIXES):
                # MONAI's NIfTI/NRRD/PIL readers give (X, Y[, Z]); napari_mae.io.readers and
                # reconstruction use ([Z,] Y, X), so models see the same axis order in both.
                x = x.permute(0, *range(n_spatial, 0, -1))
                spacing = spacing[::-1]
            c = x.shape[0]
            if c != self.in_channels:
                if self.in_channels == 1:
                    x = x.mean(dim=0, keepdim=True)  # RGB / multichannel -> grey
                elif c == 1:
                    x = x.expand(self.in_channels, *x.shape[1:])
                else:
                    raise ValueError(f"image has {c} channels, the model takes {self.in_channels}")
            if not torch.isfinite(x).all():
                x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            d[key] = x.contiguous()
            d["spacing"] = spacing
        return d


class Guarded(Transform):
    """Run a transform; turn an exception into ``{"error": message}``."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data):
        try:
            return self.transform(data)
        except Exception as exc:  # noqa: BLE001 - any failure means "skip this file"
            cause = exc
            # MONAI wraps errors in RuntimeError("applying transform ..."); report the root cause.
            while cause.__cause__ is not None:
                cause = cause.__cause__
            msg = f"{type(cause).__name__}: {cause}".strip().splitlines()[0][:200]
            return {"path": data.get("path", data.get("image")), "error": msg}


class RandPlaned(Randomizable, MapTransform):
    """Take a random 2D plane of a 3D volume; leave 2D images as they are.

    ``(C, A, B, D)`` -> ``(C, B, D)``, ``(C, A, D)`` or ``(C, A, B)``. The
    axis normal to the plane is the one with the largest spacing if the
    voxels are anisotropic (ratio > 1.5, e.g. Z of a confocal stack),
    otherwise the shortest axis if the volume is flat (ratio > 2), otherwise
    a random one. The plane index is uniform.
    """

    def __init__(self, keys):
        MapTransform.__init__(self, keys)
        self._axis = 0
        self._frac = 0.0

    def randomize(self, data=None):
        self._axis = int(self.R.randint(3))
        self._frac = float(self.R.uniform())

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 4:
                continue
            shape = np.asarray(img.shape[1:], dtype=float)
            spacing = np.asarray(d.get("spacing", (1.0, 1.0, 1.0)), dtype=float)
            if spacing.max() / spacing.min() > 1.5:
                axis = int(np.argmax(spacing))
            elif shape.max() / shape.min() > 2:
                axis = int(np.argmin(shape))
            else:
                axis = self._axis
            n = img.shape[axis + 1]
            index = min(int(self._frac * n), n - 1)
            d[key] = img.select(axis + 1, index)
        return d


class Pick(Transform):
    """Return ``data[key]`` (drops the other keys before collation)."""

    def __init__(self, key):
        self.key = key

    def __call__(self, data):
        x = data[self.key]
        return x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor


def make_transforms(
    *,
    spatial_dims: int,
    img_size: Sequence[int],
    in_channels: int = 1,
    spacing: Sequence[float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    augment: bool = True,
    guard: bool = True,
):
    """Build the deterministic and the random part of the training pipeline.

    Parameters
    ----------
    spatial_dims : {2, 3}
        Spatial dimensionality of the model. With 2, 3D volumes give random 2D
        planes; with 3, 2D images are rejected (skipped by the dataset).
    img_size : sequence of int
        Crop size ``([Z,] Y, X)`` in pixels, the model's input size.
    in_channels : int
        Channels of the model. Multichannel images are averaged to one channel
        for a 1-channel model; 1-channel images are repeated for a
        multichannel model.
    spacing : sequence of float, optional
        Resample to this pixel spacing (physical units per axis, in the
        readers' axis order) with ``Spacingd`` (bilinear) before cropping.
        ``None`` keeps the original grid.
    percentiles : (float, float)
        Per-channel percentiles mapped to 0 and 1 (not clipped).
    augment : bool
        Add random flips along every axis and, where the two last axes of
        ``img_size`` are equal, random 90 degree rotations in that plane.
    guard : bool
        Wrap the deterministic part so that a failure returns
        ``{"path": ..., "error": message}`` instead of raising.

    Returns
    -------
    (prefix, suffix) : (monai.transforms.Compose, monai.transforms.Compose)
        ``prefix({"image": path})`` -> ``{"image": float32 tensor (C, *spatial),
        "spacing": tuple, "path": str}``; ``suffix(item)`` -> float32 tensor
        ``(in_channels, *img_size)``.

    Raises
    ------
    ValueError
        If ``spatial_dims`` is not 2 or 3, or ``img_size``/``spacing`` do not
        have ``spatial_dims`` positive entries.
    """
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        RandFlipd,
        RandRotate90d,
        RandSpatialCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    img_size = tuple(int(s) for s in img_size)
    if len(img_size) != spatial_dims or min(img_size) < 1:
        raise ValueError(f"img_size must have {spatial_dims} positive entries, got {img_size!r}")
    if spacing is not None and (len(spacing) not in (2, 3) or min(spacing) <= 0):
        raise ValueError(f"spacing must have 2 or 3 positive entries, got {spacing!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {percentiles!r}")

    k = "image"
    steps: list[Any] = [
        LoadWithReadersd(k, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(k),
    ]
    if spacing is not None:
        steps.append(Spacingd(k, pixdim=tuple(float(s) for s in spacing), mode="bilinear"))
    steps += [
        ScaleIntensityRangePercentilesd(
            k, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=False, channel_wise=True
        ),
        FinishItemd(k, spatial_dims=spatial_dims, in_channels=in_channels),
    ]
    prefix = Compose(steps)
    if guard:
        prefix = Compose([Guarded(prefix)])

    rand: list[Any] = []
    if spatial_dims == 2:
        rand.append(RandPlaned(k))
    rand += [SpatialPadd(k, spatial_size=img_size), RandSpatialCropd(k, roi_size=img_size, random_size=False)]
    if augment:
        rand += [RandFlipd(k, prob=0.5, spatial_axis=a) for a in range(spatial_dims)]
        if img_size[-1] == img_size[-2]:
            rand.append(
                RandRotate90d(k, prob=0.5, max_k=3, spatial_axes=(spatial_dims - 2, spatial_dims - 1))
            )
    rand.append(Pick(k))
    return prefix, Compose(rand)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------


class SeededCrops:
    """Random crops of cached images, each a pure function of ``(seed, epoch, index)``.

    A map-style dataset (``torch.utils.data.Dataset`` protocol) of length
    ``len(indices) * repeats``. Item ``i`` applies the random transform, seeded
    with :func:`sample_seed` ``(seed, epoch, i)``, to ``base[indices[i % n]]``.

    Parameters
    ----------
    base : Sequence
        Dataset of preprocessed items (the cached deterministic prefix).
    indices : sequence of int
        Indices of ``base`` to use (the readable files of this split).
    transform : monai.transforms.Compose
        The random suffix of :func:`make_transforms`.
    seed : int
        Base seed.
    repeats : int
        Crops per image and epoch.
    fixed_epoch : int, optional
        If given, :meth:`set_epoch` is ignored and this epoch is always used
        (validation: the same crops every time).
    """

    def __init__(self, base, indices, transform, *, seed=0, repeats=1, fixed_epoch=None):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats!r}")
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.seed = int(seed)
        self.repeats = int(repeats)
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else int(fixed_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating)."""
        if self.fixed_epoch is None:
            self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices) * self.repeats

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = self.base[self.indices[i % len(self.indices)]]
        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, i))
        return self.transform(item)


@dataclass
class ImageFolderData:
    """Result of :func:`make_datasets`.

    Attributes
    ----------
    train, val : SeededCrops
        Training and validation crops, float32 tensors ``(C, *img_size)``;
        ``val`` may be empty.
    train_files, val_files : list of pathlib.Path
        Readable files of each split.
    skipped : dict
        Unusable file -> reason.
    """

    train: SeededCrops
    val: SeededCrops
    train_files: list[Path]
    val_files: list[Path]
    skipped: dict[Path, str] = field(default_factory=dict)


def _prefix_key(**settings) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def make_datasets(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    spatial_dims: int,
    img_size: Sequence[int],
    in_channels: int = 1,
    val_fraction: float = 0.1,
    spacing: Sequence[float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    exclude: Sequence[str] = (),
    cache: CacheMode = "memory",
    cache_dir: str | os.PathLike | None = None,
    samples_per_image: int = 1,
    augment: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
) -> ImageFolderData:
    """Build training and validation datasets over image folders.

    Every file is read once through the deterministic prefix of
    :func:`make_transforms`; files that fail (unreadable, wrong
    dimensionality, wrong channels) are skipped and listed in a single
    ``UserWarning``. The readable files are split by file (not by crop) into
    training and validation with a seeded shuffle.

    Parameters
    ----------
    sources : path or sequence of paths
        Folders (searched recursively, see :func:`find_images`) or files.
    spatial_dims : {2, 3}
        Spatial dimensionality of the model.
    img_size : sequence of int
        Crop size ``([Z,] Y, X)`` in pixels.
    in_channels : int
        Input channels of the model.
    val_fraction : float
        Fraction of files held out for validation, in ``[0, 1)``; at least one
        file when > 0 and at least two files are readable, and never all.
    spacing, percentiles, augment
        See :func:`make_transforms`.
    patterns, exclude : sequence of str
        File-name patterns, see :func:`find_images`.
    cache : {"memory", "disk", "none"}
        ``"memory"``: ``monai.data.CacheDataset`` keeps the preprocessed
        images in RAM (float32, 4 bytes per voxel). ``"disk"``:
        ``monai.data.PersistentDataset`` writes them under ``cache_dir``
        (re-used by later runs with the same settings). ``"none"``: read and
        preprocess every time a crop is drawn.
    cache_dir : path, optional
        Required for ``cache="disk"``.
    samples_per_image : int
        Crops per image and epoch.
    seed : int
        Seed of the split and of the augmentation streams.
    num_threads : int, optional
        Threads filling the memory cache (default: up to 4).

    Returns
    -------
    ImageFolderData

    Raises
    ------
    FileNotFoundError
        If a source does not exist.
    ValueError
        If no file matches, no file is usable (the message gives the reasons),
        or an argument is out of range.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if cache not in ("memory", "disk", "none"):
        raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
    if cache == "disk" and cache_dir is None:
        raise ValueError("cache='disk' needs a cache_dir")
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image!r}")

    files = find_images(sources, patterns, exclude=exclude)
    prefix, suffix = make_transforms(
        spatial_dims=spatial_dims,
        img_size=img_size,
        in_channels=in_channels,
        spacing=spacing,
        percentiles=percentiles,
        augment=augment,
    )
    items = [{"image": str(f), "path": str(f)} for f in files]
    with warnings.catch_warnings():
        # Readers' own warnings (e.g. PIL's "Corrupt EXIF data" while MONAI tries a
        # fallback reader on a broken file) would bury the one summary below.
        warnings.simplefilter("ignore")
        if cache == "memory":
            threads = num_threads or min(4, os.cpu_count() or 1)
            base = CacheDataset(items, prefix, num_workers=threads, progress=False, copy_cache=False)
        elif cache == "disk":
            key = _prefix_key(
                spatial_dims=spatial_dims, in_channels=in_channels, spacing=spacing, percentiles=percentiles
            )
            base = PersistentDataset(items, prefix, cache_dir=Path(cache_dir) / f"prefix-{key}")
        else:
            base = Dataset(items, prefix)
        # One pass over the (now cached) items finds the files that failed.
        good: list[int] = []
        skipped: dict[Path, str] = {}
        for i, f in enumerate(files):
            out = base[i]
            if "error" in out:
                skipped[f] = out["error"]
            else:
                good.append(i)
    if skipped:
        listing = "; ".join(f"{p} ({why})" for p, why in skipped.items())
        if not good:
            raise ValueError(f"none of the {len(files)} image files could be used: {listing}")
        warnings.warn(
            f"skipped {len(skipped)} of {len(files)} image files that could not be used: {listing}",
            UserWarning,
            stacklevel=2,
        )

    order = np.random.default_rng(seed).permutation(len(good))
    n_val = 0
    if val_fraction > 0 and len(good) >= 2:
        n_val = min(max(1, math.floor(val_fraction * len(good) + 0.5)), len(good) - 1)
    val_idx = sorted(good[j] for j in order[:n_val])
    train_idx = sorted(good[j] for j in order[n_val:])
    train = SeededCrops(base, train_idx, suffix, seed=seed, repeats=samples_per_image)
    _, val_suffix = make_transforms(
        spatial_dims=spatial_dims, img_size=img_size, in_channels=in_channels, augment=False
    )
    val = SeededCrops(base, val_idx, val_suffix, seed=seed + 1, repeats=samples_per_image, fixed_epoch=0)
    return ImageFolderData(
        train=train,
        val=val,
        train_files=[files[i] for i in train_idx],
        val_files=[files[i] for i in val_idx],
        skipped=skipped,
    )
