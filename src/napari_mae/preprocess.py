"""Input validation and intensity normalisation shared by the MAE core.

Every array that reaches the model goes through here: dtypes the model cannot
take (bool, integers, float16/64) become float32, the channel axis moves to the
front, and intensities are mapped with per-channel percentiles so that the 1st
and 99.8th percentiles land on 0 and 1 (the ``ScaleIntensityRangePercentiles``
convention of MONAI and the CSBDeep/CARE normalisation used in microscopy).

Two entry points:

* :func:`as_channels_first` validates and returns a *view* ``(C, *spatial)``
  without copying (numpy views, memmaps and dask arrays stay lazy), for tiled
  code that reads window by window;
* :func:`to_channels_first` does the same and returns a contiguous float32 copy,
  for small images and training crops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "apply_normalization",
    "as_channels_first",
    "check_channel_axis",
    "check_object_radius",
    "check_threshold",
    "check_spacing",
    "guess_layer_channel_axis",
    "guess_rgb_axis",
    "denormalize",
    "normalize_percentile",
    "percentile_range",
    "resolve_channel_axis",
    "to_channels_first",
]

#: Largest channel count guessed as a channel axis when ``channel_axis`` is None.
_MAX_GUESSED_CHANNELS = 4


def _is_dask(image: Any) -> bool:
    return type(image).__module__.startswith("dask.")


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind == "b" or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
        return
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(
            f"complex images (dtype {dtype}) are not supported; pass np.abs(image) for the magnitude "
            "or image.real for the real part"
        )
    raise ValueError(f"image dtype {dtype} is not supported; pass a bool, integer or floating-point array")


def check_channel_axis(channel_axis: int | None, ndim: int) -> int | None:
    """The one range check of a ``channel_axis`` argument.

    Parameters
    ----------
    channel_axis : int or None
        Axis holding channels; negative values count from the end.
    ndim : int
        Number of axes of the array.

    Returns
    -------
    int or None
        ``channel_axis`` made non-negative, or None.

    Raises
    ------
    ValueError
        If ``channel_axis`` is not an integer or not in ``[-ndim, ndim)``.
    """
    if channel_axis is None:
        return None
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int | np.integer):
        raise ValueError(f"channel_axis must be an integer or None, got {channel_axis!r}")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for an array of {ndim} dims")
    return int(channel_axis) % ndim


#: Largest ratio of the largest to the smallest pixel size :func:`check_spacing` accepts
#: (microscopy stacks reach about 50x, clinical CT and MR about 20x).
MAX_ANISOTROPY = 1000.0


def check_spacing(spacing: Any, ndim: int) -> np.ndarray:
    """The one check of a ``spacing`` argument (physical pixel size per spatial axis).

    Parameters
    ----------
    spacing : sequence of float or None
        One positive, finite value per spatial axis; None means 1 per axis (pixels).
    ndim : int
        Number of spatial axes.

    Returns
    -------
    ndarray of float64, shape ``(ndim,)``

    Raises
    ------
    ValueError
        If ``spacing`` does not have ``ndim`` values, one is not positive and finite, or
        the largest is more than :data:`MAX_ANISOTROPY` times the smallest.
    """
    if spacing is None:
        return np.ones(ndim)
    try:
        sp = np.asarray(spacing, dtype=float)
    except (TypeError, ValueError):
        sp = None
    if sp is None or sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must have {ndim} positive values (one per spatial axis), got {spacing!r}")
    if sp.max() > MAX_ANISOTROPY * sp.min():
        # the per-axis pixel sizes of an object then differ by as much: `--spacing 1e-9 1 1`
        # asked the radius estimate for a 972 TiB filter bank
        raise ValueError(
            f"spacing {tuple(float(v) for v in sp)} is {sp.max() / sp.min():.3g}x anisotropic (at most "
            f"{MAX_ANISOTROPY:g}x); give the pixel size of every axis in one unit"
        )
    return sp


def _as_float(value: Any) -> float:
    """``float(value)``, or NaN where it is not a number (the checks then say what is wrong)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def check_object_radius(radius: Any, shape: tuple[int, ...], spacing: Any) -> float | None:
    """The one check of a given object radius: positive, finite, and not beyond the image.

    Parameters
    ----------
    radius : float or None
        Object radius in the units of ``spacing`` (None: to be estimated; passes).
    shape : tuple of int
        Spatial shape ``([Z,] Y, X)`` of the image.
    spacing : ndarray of float, shape ``(len(shape),)``
        Physical pixel size per axis (:func:`check_spacing`).

    Returns
    -------
    float or None

    Raises
    ------
    ValueError
        If ``radius`` is not a positive finite number, or is larger than the image's
        largest physical extent: no object of that size fits, and the segmentation's
        working grid and smoothing would grow with it (a radius of 1e12 asked for tens of
        GB before failing).
    """
    if radius is None:
        return None
    r = _as_float(radius)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"object_radius must be a positive number, got {radius!r}")
    extent = float(np.max(np.asarray(shape, float) * np.asarray(spacing, float)))
    if r > extent:
        dims = " x ".join(str(n) for n in shape)
        raise ValueError(
            f"object_radius {radius:g} is larger than the image ({dims} pixels, at most {extent:g} "
            "in the spacing's units); give the radius in the image's units (pixels where it has no spacing)"
        )
    return r


def check_threshold(threshold: Any) -> float | None:
    """The one check of a given foreground threshold: in (0, 1), the scale of the normalised
    image (automatic mode) and of the object probability (scribble mode). None passes.

    Raises
    ------
    ValueError
        If ``threshold`` is not a number strictly between 0 and 1.
    """
    if threshold is None:
        return None
    t = _as_float(threshold)
    if not (math.isfinite(t) and 0.0 < t < 1.0):
        raise ValueError(f"threshold must be in (0, 1), the normalised image's scale; got {threshold!r}")
    return t


def guess_rgb_axis(shape: tuple[int, ...], *, spacing: Any = None) -> int | None:
    """Channels-last RGB(A) guess for an array whose ``channel_axis`` was not given.

    An array of 3 axes whose last one has 3 or 4 entries and whose other two are longer
    than 16 is a ``(Y, X, 3|4)`` RGB(A) image, unless ``spacing`` has 3 values (then it is
    a volume); anything else has no channel axis. The segmentation entry point and the
    ``segment`` command guess with this; the MAE functions, which know the model's
    ``spatial_dims``, use :func:`resolve_channel_axis`.

    Returns
    -------
    int or None
        ``len(shape) - 1`` for RGB(A), else None.
    """
    rgb_like = len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:-1]) > 16
    return 2 if rgb_like and (spacing is None or len(spacing) == 2) else None


def guess_layer_channel_axis(shape: tuple[int, ...]) -> int | None:
    """Channel-axis guess for a napari image layer's data (which may also carry time).

    A short (2-6 entries) last axis, or the first axis of a 3-axis array, at most a quarter
    of the shortest long axis, holds channels. A short first axis of a 4-axis array is
    read as time, ``(T, Z, Y, X)``, not channels; pass the channel axis explicitly for
    ``(C, Z, Y, X)``. The widgets guess with this; the segmentation entry point with
    :func:`guess_rgb_axis`; the MAE functions, which know the model's ``spatial_dims``,
    with :func:`resolve_channel_axis`.

    Parameters
    ----------
    shape : tuple of int
        The layer data's shape.

    Returns
    -------
    int or None
        The channel axis, or None.
    """
    if len(shape) < 3:
        return None
    long_axes = [n for n in shape if n > 6]
    shortest_long = min(long_axes) if long_axes else 0
    candidates = (len(shape) - 1, 0) if len(shape) == 3 else (len(shape) - 1,)
    for axis in candidates:
        if 2 <= shape[axis] <= 6 and shortest_long >= 4 * shape[axis]:
            return axis
    return None


def resolve_channel_axis(
    shape: tuple[int, ...], *, channel_axis: int | None = None, spatial_dims: int | None = None
) -> tuple[int | None, int]:
    """Decide which axis holds channels and how many spatial axes there are.

    Parameters
    ----------
    shape : tuple of int
        Shape of the image.
    channel_axis : int or None
        The channel axis if known (negative values count from the end). ``None``
        means: guess, as described below.
    spatial_dims : {2, 3} or None
        Number of spatial axes if known (a model's ``spatial_dims``).

    Returns
    -------
    channel_axis : int or None
        Non-negative channel axis, or None for a single-channel image.
    spatial_dims : int
        2 or 3.

    Raises
    ------
    ValueError
        If the shape cannot be an image of the requested kind, or the channel
        axis is ambiguous (the message says which ``channel_axis`` to pass).

    Notes
    -----
    Guessing, when ``channel_axis`` is None: an array with ``spatial_dims`` axes
    has no channel axis; one with ``spatial_dims + 1`` axes has its channels last
    if the last axis has at most 4 entries (RGB/RGBA ``(Y, X, 3)``), else first
    if the first one has at most 4. Without ``spatial_dims``, a 2-axis array is
    2D, a 3-axis array whose last axis has 3 or 4 entries is RGB(A) 2D, any
    other 3-axis array is a 3D volume ``(Z, Y, X)``, and a 4-axis array is a
    multi-channel volume.
    """
    ndim = len(shape)
    if spatial_dims is not None and spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if channel_axis is not None:
        channel_axis = check_channel_axis(channel_axis, ndim)
        n_spatial = ndim - 1
        if spatial_dims is not None and n_spatial != spatial_dims:
            raise ValueError(
                f"image of shape {shape} with channel_axis={channel_axis} has {n_spatial} spatial axes, "
                f"but a {spatial_dims}D image is needed"
            )
        if n_spatial not in (2, 3):
            raise ValueError(
                f"image of shape {shape} with channel_axis={channel_axis} has {n_spatial} spatial axes; "
                "pass a 2D (Y, X) or 3D (Z, Y, X) image"
            )
        return channel_axis, n_spatial

    if spatial_dims is None:
        if ndim == 2:
            return None, 2
        if ndim == 3:
            if shape[-1] in (3, 4):
                return 2, 2
            return None, 3
        if ndim == 4:
            spatial_dims = 3
        else:
            raise ValueError(
                f"image of shape {shape} has {ndim} axes; pass a 2D (Y, X), 3D (Z, Y, X) image, "
                "with channel_axis= for a channel axis"
            )
    if ndim == spatial_dims:
        return None, spatial_dims
    if ndim == spatial_dims + 1:
        if shape[-1] <= _MAX_GUESSED_CHANNELS:
            return ndim - 1, spatial_dims
        if shape[0] <= _MAX_GUESSED_CHANNELS:
            return 0, spatial_dims
        raise ValueError(
            f"cannot tell the channel axis of an image of shape {shape} for a {spatial_dims}D model; "
            "pass channel_axis="
        )
    kind = "(Y, X)" if spatial_dims == 2 else "(Z, Y, X)"
    raise ValueError(
        f"image of shape {shape} has {ndim} axes, but a {spatial_dims}D model needs {kind} "
        f"or {kind} plus one channel axis"
    )


def as_channels_first(image: Any, *, channel_axis: int | None = None, spatial_dims: int | None = None) -> Any:
    """Validate ``image`` and return a channels-first view of it, without copying.

    Parameters
    ----------
    image : array_like, shape (Y, X), (Z, Y, X) or either with one channel axis
        numpy array, ``np.memmap``, dask array, or anything ``np.asarray`` takes.
        Any dtype that is bool, integer or floating point; any strides.
    channel_axis : int or None
        See :func:`resolve_channel_axis`.
    spatial_dims : {2, 3} or None
        See :func:`resolve_channel_axis`.

    Returns
    -------
    view : array, shape (C, *spatial)
        Same type and dtype as the input (numpy view or lazy dask array).

    Raises
    ------
    ValueError
        For an unsupported dtype (complex, object, strings), an empty image or
        an unusable shape; the message says what would work.
    """
    if not _is_dask(image) and not isinstance(image, np.ndarray):
        if hasattr(image, "detach"):  # torch tensor
            image = image.detach().cpu().numpy()
        image = np.asarray(image)
    _check_dtype(np.dtype(image.dtype))
    shape = tuple(int(s) for s in image.shape)
    if any(s == 0 for s in shape):
        raise ValueError(f"image of shape {shape} is empty")
    axis, n_spatial = resolve_channel_axis(shape, channel_axis=channel_axis, spatial_dims=spatial_dims)
    if axis is None:
        return image[None]
    if _is_dask(image):
        import dask.array as da

        return da.moveaxis(image, axis, 0)
    return np.moveaxis(image, axis, 0)


def to_channels_first(
    image: Any, *, channel_axis: int | None = None, spatial_dims: int | None = None
) -> np.ndarray:
    """Return ``image`` as a contiguous float32 array with channels first.

    Parameters
    ----------
    image : array_like, shape (Y, X), (Z, Y, X) or either with one channel axis
        Any bool, integer or floating-point dtype, any strides (negative strides
        too, which ``torch.from_numpy`` rejects). RGB ``(Y, X, 3)`` is taken as
        three channels.
    channel_axis, spatial_dims
        See :func:`resolve_channel_axis`.

    Returns
    -------
    out : ndarray of float32, shape (C, *spatial)
        A new C-contiguous array; bool becomes 0.0/1.0, integers their values
        (exact up to 2**24). NaN and inf are kept (see :func:`normalize_percentile`).

    Raises
    ------
    ValueError
        See :func:`as_channels_first`.
    """
    view = as_channels_first(image, channel_axis=channel_axis, spatial_dims=spatial_dims)
    return np.ascontiguousarray(np.asarray(view), dtype=np.float32)


def _subsample(channel: Any, max_samples: int) -> np.ndarray:
    """A regular, strided subsample of at most about ``max_samples`` values."""
    n = math.prod(channel.shape)
    if n <= max_samples:
        return np.asarray(channel).ravel()
    step = max(1, math.ceil((n / max_samples) ** (1.0 / channel.ndim)))
    return np.asarray(channel[(slice(None, None, step),) * channel.ndim]).ravel()


def _finite_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the finite values of ``x`` (normalised convolution); NaN where ``x`` is not finite.

    A plain Gaussian would spread each NaN over its whole kernel (4 sigma), so a volume
    with a few per cent of scattered NaN would keep only NaN-free pockets.
    """
    from scipy import ndimage as ndi

    x = np.asarray(x, dtype=np.float32)
    valid = np.isfinite(x)
    if valid.all():
        return ndi.gaussian_filter(x, sigma)
    num = ndi.gaussian_filter(np.where(valid, x, 0.0).astype(np.float32), sigma)
    den = ndi.gaussian_filter(valid.astype(np.float32), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, num / den, np.nan).astype(np.float32)


def _smoothed(channel: Any, sigma: float):
    """``channel``'s finite values smoothed by a Gaussian of ``sigma`` pixels (float32; dask stays lazy)."""
    if hasattr(channel, "map_overlap"):  # dask
        depth = int(math.ceil(4.0 * sigma)) + 1  # scipy's kernel reaches 4 sigma (truncate)
        return channel.astype(np.float32).map_overlap(
            _finite_gaussian, depth=depth, boundary="reflect", sigma=sigma, dtype=np.float32
        )
    return _finite_gaussian(channel, sigma)


def percentile_range(
    x: Any, lower: float = 1.0, upper: float = 99.8, *, max_samples: int = 1 << 20, smooth: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel lower and upper percentiles of the finite values of ``x``.

    Parameters
    ----------
    x : array, shape (C, *spatial)
        Channels first; numpy, memmap or dask. Large channels are read through a
        regular strided subsample of about ``max_samples`` values, so memmaps
        and dask arrays are not loaded whole.
    lower, upper : float
        Percentiles in [0, 100], ``lower < upper``.
    max_samples : int
        Values per channel above which the subsample is used.
    smooth : float
        Gaussian sigma, in pixels: the percentiles of each channel's finite values smoothed
        by it (the signal's range, not its pixel noise's tails; 0: of ``x`` itself). A dask
        channel is smoothed block by block with an overlap of 4 sigma (``map_overlap``), as
        ``scipy.ndimage.gaussian_filter`` smooths a whole array; a numpy or memmap channel
        is smoothed whole (a float32 copy of it).

    Returns
    -------
    lo, hi : ndarray of float64, shape (C,)
        In the units of ``x``. Where the two percentiles coincide (a sparse
        image), the channel's finite minimum and maximum are used instead; where
        the channel is constant, ``hi = lo + 1`` so that normalising gives 0 and
        denormalising gives the constant back exactly.

    Raises
    ------
    ValueError
        If the percentiles are out of order, ``smooth`` is negative or not finite, or a
        channel has no finite value.
    """
    if not (math.isfinite(smooth) and smooth >= 0):
        raise ValueError(f"smooth={smooth!r} must be a finite sigma >= 0 (pixels)")
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )
    lo = np.empty(x.shape[0])
    hi = np.empty(x.shape[0])
    for c in range(x.shape[0]):
        values = _subsample(_smoothed(x[c], smooth) if smooth > 0 else x[c], max_samples)
        if values.dtype == bool:
            values = values.astype(np.float32)
        if np.issubdtype(values.dtype, np.floating):
            values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"channel {c} has no finite pixel (all NaN or inf); nothing to normalise")
        if values.dtype.kind != "f":
            values = values.astype(np.float64)  # exact for integers; floats are used as they are
        lo[c], hi[c] = np.percentile(values, [lower, upper])
        if not hi[c] - lo[c] > 1e-12 * max(1.0, abs(lo[c])):
            # Sparse images (e.g. > 99.8 % background) have equal percentiles
            # but are not constant: fall back to the full range.
            lo[c], hi[c] = float(values.min()), float(values.max())
        if not hi[c] - lo[c] > 1e-12 * max(1.0, abs(lo[c])):
            hi[c] = lo[c] + 1.0
    return lo, hi


def normalize_percentile(
    x: Any, lower: float = 1.0, upper: float = 99.8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each channel so that its ``lower`` and ``upper`` percentiles become 0 and 1.

    ``x_norm = (x - lo) / (hi - lo)``, per channel, without clipping (as
    MONAI's ``ScaleIntensityRangePercentiles`` with ``clip=False``).

    Parameters
    ----------
    x : array, shape (C, *spatial)
        Channels first, any real dtype (see :func:`to_channels_first`).
    lower, upper : float
        Percentiles in [0, 100] computed over finite values only.

    Returns
    -------
    x_norm : ndarray of float32, shape (C, *spatial)
        Non-finite input pixels (NaN, inf) become 0, the lower percentile,
        so they cannot poison a model's input.
    lo, hi : ndarray of float64, shape (C,)
        The percentiles, for :func:`denormalize`.

    Raises
    ------
    ValueError
        See :func:`percentile_range`.
    """
    lo, hi = percentile_range(x, lower, upper)
    x_norm = np.array(x, dtype=np.float32, copy=True)
    apply_normalization(x_norm, lo, hi, out=x_norm)
    return x_norm, lo, hi


def apply_normalization(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """``(x - lo) / (hi - lo)`` per channel, with non-finite values set to 0.

    Parameters
    ----------
    x : ndarray, shape (C, *spatial)
    lo, hi : array_like, shape (C,)
    out : ndarray of float32, optional
        Written in place if given (may be ``x``).

    Returns
    -------
    ndarray of float32, shape (C, *spatial)
    """
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    for c in range(x.shape[0]):
        scale = np.float32(1.0 / (hi[c] - lo[c]))
        np.subtract(x[c], np.float32(lo[c]), out=out[c], casting="unsafe")
        out[c] *= scale
    out[~np.isfinite(out)] = 0.0
    return out


def denormalize(x: Any, lo: Any, hi: Any, *, channel_axis: int = 0) -> Any:
    """Invert :func:`normalize_percentile`: ``x * (hi - lo) + lo`` per channel.

    Parameters
    ----------
    x : ndarray or torch.Tensor, shape (C, *spatial) or (B, C, *spatial)
        Normalised values.
    lo, hi : array_like, shape (C,)
        From :func:`normalize_percentile` or :func:`percentile_range`.
    channel_axis : int
        Axis of ``x`` holding the channels: 0 for ``(C, ...)``, 1 for ``(B, C, ...)``.

    Returns
    -------
    Same type as ``x`` (float32 for numpy input), in the original intensity units.
    """
    lo = np.asarray(lo, dtype=np.float64).ravel()
    hi = np.asarray(hi, dtype=np.float64).ravel()
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    if hasattr(x, "detach"):
        import torch

        scale = torch.as_tensor(hi - lo, dtype=x.dtype, device=x.device).reshape(shape)
        offset = torch.as_tensor(lo, dtype=x.dtype, device=x.device).reshape(shape)
        return x * scale + offset
    x = np.asarray(x, dtype=np.float32)
    return x * (hi - lo).astype(np.float32).reshape(shape) + lo.astype(np.float32).reshape(shape)
