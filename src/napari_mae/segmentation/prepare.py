"""Input preparation shared by both segmentation pipelines.

One normalised channel with bright objects, from any real dtype, RGB or multichannel
input: per-channel percentile normalisation (:func:`napari_mae.segmentation.features.as_float_image`),
one channel (luminance for RGB, first principal component otherwise), isolated hot or
dead pixels repaired, and dark-on-bright images inverted. The classical pipeline and the
learned decoder (at training and at inference) see the same image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "bright_single_channel",
    "detect_polarity",
    "prepare_image",
    "remove_isolated_outliers",
    "to_single_channel",
]


def to_single_channel(x: np.ndarray, rgb: bool) -> np.ndarray:
    """One channel of a normalised channels-first image.

    Parameters
    ----------
    x : ndarray of float32, shape ``(C, [Z,] Y, X)``
        Percentile-normalised (about ``[0, 1]``).
    rgb : bool
        Whether the channels are R, G, B (, A).

    Returns
    -------
    ndarray of float, shape ``x.shape[1:]``
        The only channel, the luminance for RGB (the weights of
        :func:`skimage.color.rgb2gray`), else the first principal component, oriented so
        that it grows with the channels' sum and scaled to its 1-99.8 % percentiles.
    """
    if x.shape[0] == 1:
        return x[0]
    if rgb:
        w = np.array([0.2125, 0.7154, 0.0721], np.float32)[: x.shape[0]]  # skimage.color.rgb2gray
        return np.tensordot(w / w.sum(), x[:3], axes=1)
    flat = x.reshape(x.shape[0], -1)
    sub = flat[:, :: max(1, flat.shape[1] // 200_000)]
    cov = np.cov(sub)
    _, vecs = np.linalg.eigh(cov)
    v = vecs[:, -1]
    if v.sum() < 0:
        v = -v
    out = np.tensordot(v.astype(np.float32), x, axes=1)
    lo, hi = np.percentile(out[:: max(1, out.size // 1_000_000)], [1, 99.8])
    return (out - lo) / (hi - lo) if hi > lo else out * 0


def remove_isolated_outliers(img: np.ndarray, delta: float = 0.5) -> int:
    """Repair isolated hot or dead pixels in place; return how many.

    Single pixels far outside the normalised range that differ from *all* their
    neighbours by more than ``delta`` (camera hot or dead pixels, cosmic-ray hits) take the
    value of their brightest (darkest) neighbour. Ten saturated pixels in a 16-bit image
    put Otsu's threshold and the blob detector on them and left no nucleus found; a median
    filter would fix that too but also blur every small object, so only pixels above
    1 + ``delta`` or below -``delta`` (after the 1-99.8 % percentile normalisation) are
    examined, with their 3^ndim neighbourhood.

    Parameters
    ----------
    img : ndarray of float, shape ``([Z,] Y, X)``, C-contiguous
        Normalised image, modified in place.
    delta : float
        Margin outside ``[0, 1]`` and against every neighbour.
    """
    cand = np.flatnonzero((img > 1.0 + delta) | (img < -delta))
    if cand.size == 0:
        return 0
    coords = np.stack(np.unravel_index(cand, img.shape), axis=1)  # (k, ndim)
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * img.ndim, indexing="ij"), -1).reshape(-1, img.ndim)
    offsets = offsets[np.any(offsets != 0, axis=1)]  # (3^ndim - 1, ndim)
    nb = coords[:, None, :] + offsets[None]  # (k, n_nb, ndim)
    nb = np.clip(nb, 0, np.asarray(img.shape) - 1)
    vals = img[tuple(nb[..., d] for d in range(img.ndim))]  # (k, n_nb)
    v = img.ravel()[cand]
    hi, lo = vals.max(axis=1), vals.min(axis=1)
    hot, cold = v > hi + delta, v < lo - delta
    flat = img.reshape(-1)  # a view: img is C-contiguous here
    flat[cand[hot]] = hi[hot]
    flat[cand[cold]] = lo[cold]
    return int(hot.sum() + cold.sum())


def detect_polarity(image: np.ndarray) -> bool:
    """Whether objects are brighter than the background.

    The background is taken to be the mode of the intensity histogram (objects cover
    less than half of most microscopy and CT images); objects are bright when that mode
    lies in the lower half of the 1st-99th percentile range.

    Parameters
    ----------
    image : ndarray of float, shape ``([Z,] Y, X)`` (or the valid pixels, flattened)

    Returns
    -------
    bool
        True for bright objects on a dark background (fluorescence).
    """
    v = np.ravel(image)
    v = v[:: max(1, v.size // 1_000_000)]
    lo, hi = np.percentile(v, [1, 99])
    if hi <= lo:
        return True
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=64, range=(lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(float), 1.5)
    mode = edges[np.argmax(hist)]
    return bool(mode - lo <= hi - mode)


def prepare_image(
    image: np.ndarray,
    *,
    channel_axis: int | None = None,
    bright_objects: bool | None = None,
    scribbles: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """One normalised channel with bright objects: what both pipelines segment.

    Per-channel 1-99.8 % percentile normalisation (non-finite pixels to 0, the low
    percentile), RGB to luminance (other channels to their first principal component),
    isolated hot/dead pixels repaired, and dark objects on a bright background inverted.

    Parameters
    ----------
    image : ndarray, shape ``([Z,] Y, X)`` or with a channel axis
        Any real dtype.
    channel_axis : int or None
        Axis holding channels (3 or 4 of them: RGB).
    bright_objects : bool or None
        Polarity; detected when None (:func:`detect_polarity` on the finite pixels, or
        from the strokes, see :func:`bright_single_channel`).
    scribbles : ndarray of int or None, shape: the spatial axes of ``image``
        Strokes that decide the polarity when ``bright_objects`` is None.

    Returns
    -------
    prepared : ndarray of float32, shape: the spatial axes of ``image``
    info : dict
        ``bright_objects``, ``invalid`` (bool mask of the non-finite pixels),
        ``outlier_pixels``.

    Raises
    ------
    ValueError
        See :func:`napari_mae.segmentation.features.as_float_image`.
    """
    from napari_mae.segmentation.features import as_float_image

    arr = np.asarray(image)
    x, invalid, _ = as_float_image(arr, channel_axis=channel_axis)
    rgb = channel_axis is not None and arr.shape[channel_axis] in (3, 4)
    return bright_single_channel(x, invalid, rgb=rgb, bright_objects=bright_objects, scribbles=scribbles)


def bright_single_channel(
    x: np.ndarray,
    invalid: np.ndarray,
    *,
    rgb: bool,
    bright_objects: bool | None = None,
    scribbles: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """:func:`prepare_image` after the normalisation: one channel, outliers, polarity.

    Parameters
    ----------
    x : ndarray of float32, shape ``(C, [Z,] Y, X)``
        From :func:`napari_mae.segmentation.features.as_float_image`.
    invalid : ndarray of bool, shape ``x.shape[1:]``
        Its non-finite pixels.
    rgb : bool
        Whether the channels are R, G, B (, A).
    bright_objects : bool or None
        Polarity; None: from the strokes where ``scribbles`` are given (objects brighter
        than the background strokes?), else :func:`detect_polarity` on the valid pixels.
    scribbles : ndarray of int or None, shape ``x.shape[1:]``
        0 unlabelled, 1 background, 2.. objects; both kinds present.

    Returns
    -------
    prepared, info
        As :func:`prepare_image`.
    """
    img = to_single_channel(x, rgb)
    n_outliers = remove_isolated_outliers(img)
    if bright_objects is None and scribbles is not None:
        bright_objects = bool(np.median(img[scribbles >= 2]) >= np.median(img[scribbles == 1]))
    elif bright_objects is None:
        bright_objects = detect_polarity(img[~invalid] if invalid.any() else img)
    if not bright_objects:
        img = 1.0 - img
    return img.astype(np.float32, copy=False), {
        "bright_objects": bool(bright_objects),
        "invalid": invalid,
        "outlier_pixels": int(n_outliers),
    }
