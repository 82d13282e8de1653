"""Seeds, watershed, relabelling and hole filling: the instance steps both pipelines share.

The classical pipeline separates objects by a seeded watershed of the distance transform
of its foreground (:func:`distance_watershed`); the learned one by a watershed of the
decoder's boundary distance from its centre seeds
(:func:`napari_mae.segmentation.learned.instances_from_maps`). Both drop fragments with
:func:`remove_small_labels` and number objects with :func:`relabel`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from napari_mae._progress import ProgressCallback, report, sub_progress
from napari_mae.segmentation.params import SegmentationParams

__all__ = [
    "boundary_trust",
    "distance_watershed",
    "fill_holes_per_label",
    "h_maxima",
    "relabel",
    "remove_small_labels",
]


def relabel(labels: np.ndarray, dtype=np.uint32) -> np.ndarray:
    """Labels renumbered 1..n in the order of their values, 0 kept as background.

    Parameters
    ----------
    labels : ndarray of non-negative int, any shape
    dtype : numpy dtype
        Of the result.

    Returns
    -------
    ndarray of ``dtype``, shape ``labels.shape``
    """
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels.astype(np.uint32, copy=False))[0].astype(dtype, copy=False)


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set to 0, in place, the labels of fewer than ``min_size`` pixels (voxels); return ``labels``.

    Parameters
    ----------
    labels : ndarray of non-negative int, any shape
    min_size : int
    """
    areas = np.bincount(labels.ravel())
    small = areas < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


def distance_watershed(
    fg: np.ndarray,
    r: float,
    spacing: np.ndarray,
    *,
    boundary: np.ndarray | None = None,
    intensity: np.ndarray | None = None,
    h_factor: float | None = None,
    min_frac: float | None = None,
    params: SegmentationParams | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Instances of a foreground: seeded watershed of its spacing-aware distance transform.

    Holes in ``fg`` are filled and components below ``min_frac`` of the expected object
    volume dropped; the distance transform (smoothed by ``params.dist_smooth`` radii) is
    the landscape, plus the normalised ``intensity`` (x ``params.intensity`` radii: nuclei
    are brighter in the middle than where two touch), or times ``1 - boundary``; seeds are
    its h-maxima of depth ``h_factor`` radii.

    Parameters
    ----------
    fg : ndarray of bool, shape ``([Z,] Y, X)``
    r : float
        Object radius, physical units of ``spacing``.
    spacing : ndarray of float, shape ``(fg.ndim,)``
    boundary : ndarray of float or None, shape ``fg.shape``
        P(boundary) in [0, 1] (scribble mode); takes precedence over ``intensity``.
    intensity : ndarray of float or None, shape ``fg.shape``
        Background-subtracted image (automatic mode).
    h_factor, min_frac : float or None
        Seed depth and smallest object (fraction of the expected volume); default
        ``params.h`` and ``params.min_size``.
    params : SegmentationParams or None
        Default :class:`~napari_mae.segmentation.params.SegmentationParams`.
    progress : callable or None
        ``progress(done, total, message)``.

    Returns
    -------
    ndarray of uint32, shape ``fg.shape``
        0 background, objects 1..n consecutive.
    """
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    prm = params or SegmentationParams()
    h_factor = prm.h if h_factor is None else h_factor
    min_frac = prm.min_size if min_frac is None else min_frac
    ndim = fg.ndim
    vol_px = (4.0 / 3.0 * math.pi if ndim == 3 else math.pi) * r**ndim / float(np.prod(spacing))
    min_size = max(2, int(min_frac * vol_px))
    msg = "separating objects"
    report(progress, 0, 8, msg)
    fg = ndi.binary_fill_holes(fg)
    report(progress, 1, 8, msg)
    fg = remove_small_objects(fg, max_size=min_size)
    if not fg.any():
        return np.zeros(fg.shape, np.uint32)
    report(progress, 2, 8, msg)
    dist = ndi.distance_transform_edt(fg, sampling=spacing)
    report(progress, 3, 8, msg)
    dist = ndi.gaussian_filter(dist, np.maximum(prm.dist_smooth * r / spacing, 0.5))
    land = dist
    if intensity is not None and prm.intensity > 0:
        # Nuclei are brighter in the middle than where two touch: add the intensity,
        # scaled to its 99th percentile inside the foreground, as r * weight.
        ref = np.percentile(intensity[fg], 99) if fg.any() else 1.0
        land = dist + prm.intensity * r * np.clip(intensity / max(ref, 1e-6), 0, 1.5)
    if boundary is not None:
        land = dist * (1.0 - boundary * boundary_trust(dist, r, spacing))
    h = max(h_factor * r, 0.5 * spacing.min())
    report(progress, 4, 8, msg)
    seeds = h_maxima(land, h, sub_progress(progress, 500, 625))
    report(progress, 5, 8, msg)
    markers, _ = ndi.label(seeds & fg)
    labels = watershed(-land, markers, mask=fg)
    report(progress, 7, 8, msg)
    return relabel(remove_small_labels(labels, min_size))  # fragments dropped, consecutive


def boundary_trust(dist: np.ndarray, r: float, spacing: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of P(boundary) in the watershed landscape ``dist * (1 - P(boundary))``.

    Full weight farther than one radius from the array's border. Nearer the border, only
    where the distance transform is below half a radius (the necks between touching
    objects), fading to none at one radius. Two things meet there: the features the
    boundary forest sees within a radius of the border are computed on mirrored
    intensities, so its P(boundary) rises to 0.3-0.5 inside objects cut by the border
    (issue 12.6: a nucleus in a corner of the 2D sample); and the distance transform of
    such an object grows towards the border (outside the array is not background), so
    a small P(boundary) times that large distance made a dip deeper than the seeds' h:
    two seeds, one object cut along a straight line. Counting the border as background
    instead removed those splits but merged touching border nuclei (3D dev volume).

    Parameters
    ----------
    dist : ndarray of float, shape ``([Z,] Y, X)``
        Distance transform of the foreground, physical units.
    r : float
        Object radius, physical units.
    spacing : ndarray of float, shape ``(dist.ndim,)``

    Returns
    -------
    ndarray of float, shape ``dist.shape``
    """
    to_border = np.full(dist.shape, np.inf)
    for ax, (n, s) in enumerate(zip(dist.shape, spacing)):
        i = np.arange(n)
        d_ax = (np.minimum(i, n - 1 - i) * s).reshape([-1 if k == ax else 1 for k in range(dist.ndim)])
        to_border = np.minimum(to_border, d_ax)
    return np.maximum(np.clip(to_border / r, 0.0, 1.0), np.clip(2.0 - 2.0 * dist / r, 0.0, 1.0))


def h_maxima(image: np.ndarray, h: float, progress: ProgressCallback | None = None) -> np.ndarray:
    """:func:`skimage.morphology.h_maxima` of a float image, with progress between its steps.

    The same computation as scikit-image's (reconstruction by dilation of ``image - h``
    under ``image``, the algorithm of :func:`skimage.morphology.reconstruction`: sort,
    rank, then one pass over a linked list), split so that a caller can stop between the
    steps, each a fraction of the whole (the whole took ~1 s on a 100^3 volume). Falls back
    to scikit-image's function where its private helpers are not found.
    """
    try:
        return _h_maxima_steps(image, h, progress)
    except (ImportError, AttributeError, TypeError, ValueError):
        # scikit-image's private helper moved or changed its signature (tested against the
        # public function in tests/core/test_segmentation.py): the same result, one step.
        from skimage.morphology import h_maxima

        return h_maxima(np.asarray(image, np.float64), h)


def _h_maxima_steps(image: np.ndarray, h: float, progress: ProgressCallback | None) -> np.ndarray:
    from skimage.morphology._grayreconstruct import reconstruction_loop

    image = np.asarray(image, np.float64)
    if h > np.ptp(image):
        return np.zeros(image.shape, np.uint8)
    seed = image - h - 2 * np.finfo(image.dtype).resolution * np.abs(image)
    ndim = image.ndim
    footprint = np.ones((3,) * ndim, bool)
    footprint[(1,) * ndim] = False
    dims = (2,) + tuple(n + 2 for n in image.shape)
    inside = tuple(slice(1, 1 + n) for n in image.shape)
    images = np.full(dims, np.min(seed), np.float64)
    images[(0, *inside)] = seed
    images[(1, *inside)] = image
    isize = images.size
    signed = np.result_type(np.min_scalar_type(-isize), np.int32)
    unsigned = np.dtype(signed.char.upper())
    value_stride = np.array(images.strides[1:]) // images.dtype.itemsize
    image_stride = images.strides[0] // images.dtype.itemsize
    offsets = np.mgrid[(slice(-1, 2),) * ndim][:, footprint].T
    nb_strides = np.array([np.sum(value_stride * o) for o in offsets], signed)
    images = images.reshape(-1)
    report(progress, 1, 5, "seeds")
    # Stable sort: the landscapes here have large ties (the background), on which
    # numpy's default introsort was 4x slower; the reconstruction does not depend on the
    # order of equal values.
    ascending = np.argsort(images, kind="stable").astype(signed, copy=False)
    index_sorted = ascending[::-1]
    prev = np.full(isize, -1, signed)
    nxt = np.full(isize, -1, signed)
    prev[index_sorted[1:]] = index_sorted[:-1]
    nxt[index_sorted[:-1]] = index_sorted[1:]
    report(progress, 2, 5, "seeds")
    # Ranks of the values from the same sort (skimage's ``rank_order`` sorts again: this
    # halves the cost; same ranks).
    sorted_values = images[ascending]
    first = np.empty(isize, bool)
    first[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    value_map = sorted_values[first]
    value_rank = np.empty(isize, unsigned)
    value_rank[ascending] = np.cumsum(first, dtype=unsigned) - 1
    del sorted_values, first
    report(progress, 3, 5, "seeds")
    reconstruction_loop(value_rank, prev, nxt, nb_strides, index_sorted[0], image_stride)
    report(progress, 4, 5, "seeds")
    rec = value_map[value_rank[:image_stride]].reshape(dims[1:])[inside]
    return ((image - rec) >= h).astype(np.uint8)


def fill_holes_per_label(labels: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
    """Holes of the foreground (background enclosed by objects) take the nearest object's label.

    Parameters
    ----------
    labels : ndarray of int, shape ``([Z,] Y, X)``

    Returns
    -------
    ndarray, the dtype and shape of ``labels`` (a copy where there were holes)
    """
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    report(progress, 1, 2, "filling holes")
    if holes.any():
        # Holes take the label of the nearest object (all holes are enclosed by objects).
        idx = ndi.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
        labels = labels.copy()
        labels[holes] = labels[tuple(i[holes] for i in idx)]
    return labels
