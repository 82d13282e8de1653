"""Patch masks for masked-autoencoder training and display.

An image of spatial shape ``(Y, X)`` or ``(Z, Y, X)`` is cut into a grid of
patches of ``patch_size`` pixels per axis (anisotropic sizes such as
``(2, 16, 16)`` for thick-slice MR are fine). The grid has
``ceil(shape / patch_size)`` patches per axis, so an image whose size is not a
multiple of the patch keeps its partial edge patches. A mask is a boolean
array over that grid with the convention of He et al. 2021 ("Masked
Autoencoders Are Scalable Vision Learners", sec. 3): **True / 1 = removed**,
False / 0 = kept (visible). Flattened in C order the grid is the token order of
MONAI's ``PatchEmbeddingBlock`` (and of :mod:`napari_mae.models.mae`).

Strategies (paper sec. 3 and fig. 6; BEiT, Bao et al. 2021, Algorithm 1):

``random``
    exactly ``round(mask_ratio * n_patches)`` patches removed, drawn uniformly
    without replacement, independently per sample.
``grid``
    a regular pattern: the kept patches are the most evenly spread ones of an
    ordered-dither (Bayer) ranking. At ``mask_ratio=0.75`` in 2D this keeps one
    patch of every 2 x 2, the paper's grid-wise sampling.
``block``
    BEiT block-wise masking: rectangles (cuboids in 3D) of random size and
    aspect ratio are removed until exactly ``round(mask_ratio * n_patches)``
    patches are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "FILLS",
    "STRATEGIES",
    "apply_mask",
    "check_mask_ratio",
    "make_mask",
    "mask_to_pixels",
    "n_removed",
    "normalize_patch_size",
    "patch_grid_shape",
    "resample_mask",
]

STRATEGIES = ("random", "grid", "block")
FILLS = ("zero", "noise", "mean")


def normalize_patch_size(patch_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Return ``patch_size`` as a tuple of ``ndim`` positive ints.

    Raises
    ------
    ValueError
        If the length does not match ``ndim`` or a size is not a positive integer.
    """
    if isinstance(patch_size, (int, np.integer)):
        patch = (int(patch_size),) * ndim
    else:
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != ndim or any(p != q for p, q in zip(patch, patch_size)):
            raise ValueError(
                f"patch_size={tuple(patch_size)} must be {ndim} positive integers, one per spatial axis"
            )
    if any(p < 1 for p in patch):
        raise ValueError(f"patch_size={patch} must be positive")
    return patch


def check_mask_ratio(mask_ratio: float) -> float:
    """Return ``mask_ratio`` as a float, or raise if it is not in [0, 1).

    Raises
    ------
    ValueError
        If ``mask_ratio`` is NaN or outside [0, 1).
    """
    try:
        ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"mask_ratio must be in [0, 1) (0 keeps every patch, 0.75 is the MAE default), got {mask_ratio}"
        )
    return ratio


def n_removed(n_patches: int, mask_ratio: float) -> int:
    """Number of patches removed: ``round(mask_ratio * n_patches)``, halves rounded up.

    The model's own masking uses the same count, so a mask drawn here and one
    drawn by :meth:`napari_mae.models.mae.MaskedAutoencoder.forward` remove as many.
    """
    return int(math.floor(check_mask_ratio(mask_ratio) * n_patches + 0.5))


def patch_grid_shape(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Patches per axis: ``ceil(spatial_shape / patch_size)``.

    Parameters
    ----------
    spatial_shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)`` in pixels.
    patch_size : int or sequence of int
        Pixels per patch along each axis.

    Returns
    -------
    tuple of int
        Same length as ``spatial_shape``.

    Raises
    ------
    ValueError
        If a size is not positive or the lengths differ.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"spatial_shape={shape} must be positive")
    patch = normalize_patch_size(patch_size, len(shape))
    return tuple(-(-s // p) for s, p in zip(shape, patch))


def _rng(seed: Any) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _random_mask(grid: tuple[int, ...], k: int, rng: np.random.Generator) -> np.ndarray:
    n = math.prod(grid)
    flat = np.zeros(n, dtype=bool)
    flat[rng.permutation(n)[:k]] = True
    return flat.reshape(grid)


# Rank of each corner of a 2 x ... x 2 cell in the ordered-dither pattern.
# 2D: the classic Bayer matrix [[0, 2], [3, 1]]. 3D: far corners first.
_BAYER_BASE = {
    1: {(0,): 0, (1,): 1},
    2: {(0, 0): 0, (1, 1): 1, (0, 1): 2, (1, 0): 3},
    3: {
        (0, 0, 0): 0,
        (1, 1, 1): 1,
        (0, 1, 1): 2,
        (1, 0, 0): 3,
        (1, 0, 1): 4,
        (0, 1, 0): 5,
        (1, 1, 0): 6,
        (0, 0, 1): 7,
    },
}


def _bayer_rank(grid: tuple[int, ...]) -> np.ndarray:
    """Ordered-dither rank of every grid position (lower = kept first).

    The finest coordinate bits are the most significant, as in the recursive
    Bayer matrix, so the lowest ranks are spread over the whole grid.
    """
    ndim = len(grid)
    levels = max(1, math.ceil(math.log2(max(grid))))
    base = np.zeros((2,) * ndim, dtype=np.int64)
    for corner, rank in _BAYER_BASE[ndim].items():
        base[corner] = rank
    coords = np.indices(grid)
    key = np.zeros(grid, dtype=np.int64)
    for level in range(levels):  # level 0 = finest bit = most significant digit
        bits = tuple((coords[a] >> level) & 1 for a in range(ndim))
        key += base[bits] * (2**ndim) ** (levels - 1 - level)
    return key


def _grid_mask(grid: tuple[int, ...], k: int) -> np.ndarray:
    n = math.prod(grid)
    order = np.argsort(_bayer_rank(grid).ravel(), kind="stable")
    flat = np.ones(n, dtype=bool)
    flat[order[: n - k]] = False
    return flat.reshape(grid)


def _block_mask(
    grid: tuple[int, ...],
    k: int,
    rng: np.random.Generator,
    *,
    min_block: int = 4,
    max_aspect: float = 1 / 0.3,
) -> np.ndarray:
    """BEiT block-wise masking (Bao et al. 2021, Algorithm 1), exact count."""
    mask = np.zeros(grid, dtype=bool)
    ndim = len(grid)
    count = 0
    failures = 0
    while count < k and failures < 10 * ndim:
        remaining = k - count
        volume = rng.uniform(min(min_block, remaining), remaining)
        log_aspect = rng.uniform(-math.log(max_aspect), math.log(max_aspect), size=ndim)
        log_aspect -= log_aspect.mean()
        sizes = [
            int(np.clip(round(volume ** (1 / ndim) * math.exp(a)), 1, g)) for a, g in zip(log_aspect, grid)
        ]
        start = [int(rng.integers(0, g - s + 1)) for g, s in zip(grid, sizes)]
        block = tuple(slice(a, a + s) for a, s in zip(start, sizes))
        new = int((~mask[block]).sum())
        if 0 < new <= remaining:
            mask[block] = True
            count += new
            failures = 0
        else:
            failures += 1
    if count < k:
        # BEiT stops short here; we top up with random patches so the count is exact.
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=k - count, replace=False)] = True
    return mask


def make_mask(
    spatial_shape: Sequence[int],
    patch_size: int | Sequence[int],
    *,
    mask_ratio: float = 0.75,
    strategy: str = "random",
    seed: int | np.random.Generator | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Draw a patch mask over the grid of an image (1 / True = removed).

    Parameters
    ----------
    spatial_shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)`` in pixels.
    patch_size : int or sequence of int
        Pixels per patch along each axis (anisotropic allowed).
    mask_ratio : float
        Fraction of patches removed, in [0, 1). Exactly
        ``round(mask_ratio * n_patches)`` are removed (:func:`n_removed`).
    strategy : {"random", "grid", "block"}
        See the module docstring.
    seed : int, numpy Generator or None
        Same seed, same mask, on every platform (numpy's PCG64).
    batch_size : int or None
        If given, draw that many independent masks (``random`` and ``block``;
        ``grid`` is the same for every sample).

    Returns
    -------
    mask : ndarray of bool, shape ``patch_grid_shape(spatial_shape, patch_size)``
        or ``(batch_size,) + that`` if ``batch_size`` is given.

    Raises
    ------
    ValueError
        If ``mask_ratio`` is outside [0, 1), ``strategy`` is unknown, or shapes are invalid.
    """
    grid = patch_grid_shape(spatial_shape, patch_size)
    if len(grid) not in (1, 2, 3):
        raise ValueError(f"spatial_shape={tuple(spatial_shape)} must have 2 or 3 axes")
    k = n_removed(math.prod(grid), mask_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    rng = _rng(seed)

    def one() -> np.ndarray:
        if strategy == "random":
            return _random_mask(grid, k, rng)
        if strategy == "grid":
            return _grid_mask(grid, k)
        return _block_mask(grid, k, rng)

    if batch_size is None:
        return one()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    return np.stack([one() for _ in range(batch_size)])


def mask_to_pixels(mask: Any, spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> np.ndarray:
    """Expand a patch mask to a pixel mask of the image.

    Parameters
    ----------
    mask : array_like of bool, shape ``grid`` or ``(B,) + grid``
        ``grid = patch_grid_shape(spatial_shape, patch_size)``; 1 = removed.
    spatial_shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)`` in pixels.
    patch_size : int or sequence of int

    Returns
    -------
    ndarray of bool, shape ``spatial_shape`` or ``(B,) + spatial_shape``
        Partial edge patches are cropped.

    Raises
    ------
    ValueError
        If the mask's shape is not the image's patch grid.
    """
    shape = tuple(int(s) for s in spatial_shape)
    grid = patch_grid_shape(shape, patch_size)
    patch = normalize_patch_size(patch_size, len(shape))
    mask = np.asarray(mask).astype(bool, copy=False)
    lead = mask.ndim - len(grid)
    if lead not in (0, 1) or mask.shape[lead:] != grid:
        raise ValueError(
            f"mask of shape {mask.shape} is not the patch grid {grid} of an image of shape {shape} "
            f"with patch_size={patch}; draw it with make_mask(spatial_shape, patch_size)"
        )
    out = mask
    for axis, (p, s) in enumerate(zip(patch, shape)):
        out = np.repeat(out, p, axis=lead + axis)
        if out.shape[lead + axis] != s:
            out = out[(slice(None),) * (lead + axis) + (slice(0, s),)]
    return np.ascontiguousarray(out)


def resample_mask(
    mask: Any,
    spatial_shape: Sequence[int],
    patch_size: int | Sequence[int],
    new_patch_size: int | Sequence[int],
) -> np.ndarray:
    """The same removed pixels on another patch grid: a new patch is removed when most of it was.

    Used when a mask drawn with one patch size (the Masking widget's) meets a
    model with another.

    Parameters
    ----------
    mask : array_like of bool, shape ``patch_grid_shape(spatial_shape, patch_size)``
        1 = removed.
    spatial_shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)`` in pixels.
    patch_size, new_patch_size : int or sequence of int
        Pixels per patch of ``mask`` and of the result.

    Returns
    -------
    ndarray of bool, shape ``patch_grid_shape(spatial_shape, new_patch_size)``
        A new patch is removed when more than half of its pixels inside the
        image were (partial edge patches count their pixels inside the image).

    Raises
    ------
    ValueError
        If the sizes have another number of axes than ``spatial_shape`` or the
        mask is not its patch grid.
    """
    shape = tuple(int(s) for s in spatial_shape)
    new = normalize_patch_size(new_patch_size, len(shape))
    if normalize_patch_size(patch_size, len(shape)) == new:
        return np.asarray(mask).astype(bool)
    pixels = mask_to_pixels(mask, shape, patch_size).astype(np.float32)
    grid = patch_grid_shape(shape, new)
    padded = np.zeros([g * p for g, p in zip(grid, new)], np.float32)  # (g0 * p0, g1 * p1, ...)
    inside = np.zeros_like(padded)
    padded[tuple(slice(0, n) for n in shape)] = pixels
    inside[tuple(slice(0, n) for n in shape)] = 1.0
    split = [v for g, p in zip(grid, new) for v in (g, p)]  # (g0, p0, g1, p1, ...)
    within = tuple(range(1, 2 * len(grid), 2))
    removed = padded.reshape(split).sum(axis=within)  # grid
    return removed > 0.5 * inside.reshape(split).sum(axis=within)


def apply_mask(
    image: Any,
    mask: Any,
    patch_size: int | Sequence[int],
    *,
    fill: str | float = "zero",
    seed: int | np.random.Generator | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Replace the removed patches of ``image`` by a fill, for display.

    ``x_masked = (1 - m) * x + m * f`` with ``m`` the pixel mask and ``f`` the fill.

    Parameters
    ----------
    image : array_like, shape (Y, X), (Z, Y, X) or either with one channel axis
        Any real dtype.
    mask : array_like of bool, shape ``patch_grid_shape(spatial_shape, patch_size)``
        1 = removed.
    patch_size : int or sequence of int
    fill : {"zero", "noise", "mean"} or float
        ``zero``: 0; ``noise``: uniform noise between the channel's finite minimum
        and maximum (paper's noise fill); ``mean``: the channel's finite mean;
        a number: that value.
    seed : int, numpy Generator or None
        For ``noise``.
    channel_axis : int or None
        The channel axis, if any. None means a single-channel image (no guessing:
        an RGB image needs ``channel_axis=-1``).

    Returns
    -------
    ndarray, same shape and dtype as ``image``
        A copy; fills are rounded and clipped to integer dtypes, and thresholded
        at 0.5 for bool images.

    Raises
    ------
    ValueError
        If ``fill`` is unknown or the mask is not the image's patch grid.
    """
    image = np.asarray(image)
    out = image.copy()
    view = out[None] if channel_axis is None else np.moveaxis(out, channel_axis, 0)
    spatial = view.shape[1:]
    if isinstance(fill, str) and fill not in FILLS:
        raise ValueError(f"fill={fill!r} is not one of {FILLS} or a number")
    pixels = mask_to_pixels(mask, spatial, patch_size)
    n_masked = int(pixels.sum())
    if n_masked == 0:
        return out
    rng = _rng(seed)
    for c in range(view.shape[0]):
        channel = view[c]
        if fill == "zero":
            values: Any = 0.0
        elif isinstance(fill, str):
            finite = (
                channel if not np.issubdtype(channel.dtype, np.floating) else channel[np.isfinite(channel)]
            )
            finite = finite.astype(np.float64) if finite.dtype == bool else finite
            if finite.size == 0:
                values = 0.0
            elif fill == "mean":
                values = float(np.mean(finite, dtype=np.float64))
            else:
                lo, hi = float(np.min(finite)), float(np.max(finite))
                values = rng.uniform(lo, hi, size=n_masked)
        else:
            values = float(fill)
        channel[pixels] = _cast_fill(values, channel.dtype)
    return out


def _cast_fill(values: Any, dtype: np.dtype) -> Any:
    values = np.asarray(values, dtype=np.float64)
    if np.dtype(dtype).kind == "b":
        return values >= 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
