"""Object size and the working grid: the lengths every step of the classical pipeline
derives from.

* :func:`estimate_object_radius`: scale-space Laplacian of Gaussian (Lindeberg 1998: the
  scale-normalised response of a disk of radius r peaks at ``sigma = r / sqrt(ndim)``),
  computed by FFT on a pyramid of grids (:func:`max_log_response`), read at its strongest
  local maxima, cross-checked against the per-component radii of a first-pass Otsu
  foreground (:func:`component_radii`).
* :func:`working_shape`: where the radius spans more than 8 pixels along an axis, the
  pipeline runs on a copy shrunk so that it spans 8 (:func:`downsample`,
  :func:`downsample_scribbles`), and the labels come back with a linearly interpolated
  outline (:func:`upsample_labels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from napari_mae._progress import ProgressCallback, report
from napari_mae.segmentation.params import SegmentationParams

__all__ = [
    "component_radii",
    "downsample",
    "downsample_scribbles",
    "estimate_object_radius",
    "max_log_response",
    "upsample_labels",
    "working_shape",
]


def component_radii(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per connected component: maximum of the spacing-aware distance transform, and the
    radius of the disk (2D) or ball (3D) of the same area/volume, both physical.

    Parameters
    ----------
    mask : ndarray of bool, shape ``([Z,] Y, X)``
    spacing : ndarray of float, shape ``(mask.ndim,)``

    Returns
    -------
    max_distance, equivalent_radius : ndarray of float, shape ``(n_components,)``
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    dist = ndi.distance_transform_edt(mask, sampling=spacing)
    # Per-label maximum by an unbuffered ufunc: ndi.maximum sorts the labels first and
    # took a tenth of a whole segmentation; the same values, ~10x faster.
    mx = np.zeros(n + 1)
    np.maximum.at(mx, lab.ravel(), dist.ravel())
    mx = mx[1:]
    vol = np.bincount(lab.ravel())[1:] * float(np.prod(spacing))
    r_eq = np.sqrt(vol / np.pi) if mask.ndim == 2 else np.cbrt(3.0 * vol / (4.0 * np.pi))
    return mx, r_eq


def estimate_object_radius(
    image: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    foreground: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Estimate the typical object radius of a bright-on-dark image.

    Scale-space LoG: for radii on a geometric grid, the scale-normalised response
    ``-sigma^2 LoG(sigma)`` with ``sigma = r / sqrt(ndim)`` (per axis in pixels from the
    physical ``spacing``); the radius is the median best scale at the strongest local
    maxima of the response (Lindeberg 1998, the blob detector of
    :func:`skimage.feature.blob_log`), times 0.87, the bias of that detector on disks.
    It is cross-checked against the median per-component radius of a first-pass
    foreground (equivalent-sphere radius, capped at twice the distance-transform maximum): textured large nuclei make the LoG pick
    texture spots, and merged foreground inflates the distance estimate, so where the two
    disagree by more than a factor 1.5 the LoG estimate wins unless it is smaller than a
    third of the foreground estimate with foreground covering little of the image.

    Parameters
    ----------
    image : ndarray of float, shape ``([Z,] Y, X)``
        Bright objects on a dark background, about ``[0, 1]``.
    spacing : sequence of float or None
        Physical pixel size per axis (pixels if None).
    foreground : ndarray of bool or None
        First-pass foreground; default Otsu of the image smoothed by one pixel.
    progress : callable or None
        ``progress(done, total, message)``, called once per scale; raise
        :class:`napari_mae._progress.Cancelled` from it to stop.

    Returns
    -------
    dict
        ``radius`` (physical units), ``radius_px`` (per axis, pixels), ``radius_log`` and
        ``radius_foreground`` (the two estimates, physical; None where that estimate found
        nothing: no blob scale, no foreground component).
    """

    ndim = image.ndim
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, float)
    extent = np.array(image.shape) * sp
    r_min = 1.0 * sp.min()
    # The largest scale: a sixth of the image's second-largest extent (its smaller side in
    # 2D). In 3D not the smallest extent: a stack of few slices does not bound the objects'
    # size in-plane, and a 31-slice volume of nuclei 5.7 voxels in radius had its scale range
    # end at 5.2, so the LoG median sat on the last scale and never counted.
    r_max = max(3 * r_min, np.sort(extent)[-2] / 6.0)
    radii = np.geomspace(max(r_min, 2.0 * sp.min()), r_max, 14)
    # Big inputs: a full-resolution crop of about 2 M pixels (striding would lose small
    # objects); of five candidates (centre and the quadrants' centres), the one with the
    # most intensity variance, i.e. the most objects.
    spi = sp
    img = image
    if image.size > 2e6:
        side = [min(n, int(round((2e6) ** (1.0 / ndim)))) for n in image.shape]
        cands = []
        for fr in ([0.5] * ndim, [0.25] * ndim, [0.75] * ndim, [0.25, 0.75] + [0.5] * (ndim - 2),
                   [0.75, 0.25] + [0.5] * (ndim - 2)):  # fmt: skip
            st = [int(min(max(f * n - w / 2, 0), n - w)) for f, n, w in zip(fr, image.shape, side)]
            cands.append(tuple(slice(a, a + w) for a, w in zip(st, side)))
        crop = max(cands, key=lambda c: float(np.var(image[c][(slice(None, None, 4),) * ndim])))
        img = image[crop]
        if foreground is not None and foreground.shape == image.shape:
            foreground = foreground[crop]  # the same crop (indexing it whole raised)
    r_log = _log_radius(img, radii, spi, progress)
    r_fg = _foreground_radius(_first_foreground(img, foreground), spi)
    if r_log == 0.0 and ndim == 3 and foreground is None:
        # Volumes where the LoG found no blob scale: again on the volume smoothed by one
        # voxel per axis. The finest scales of a volume (2 voxels in-plane, under one
        # voxel along a coarse Z) can be dominated by voxel noise: the LoG median lands
        # on the finest scale, and the Otsu foreground breaks into specks (a 3D nuclei
        # volume plus 15 % noise measured 0.39x its true radius; 0.84x smoothed). Smoothing
        # by one voxel hardly moves the size of objects several voxels wide, so the
        # smoothed estimate is taken only where it differs by more than 1.5x, i.e. where
        # the first one measured noise (taking it always moved a CT's bone radius by 4 %
        # and cost its scribble segmentation most of its F1).
        smooth = ndi.gaussian_filter(img.astype(np.float32, copy=False), 1.0)
        s_r = _foreground_radius(_first_foreground(smooth, None), spi)
        if r_fg > 0 and s_r > 0 and not (1 / 1.5 <= s_r / r_fg <= 1.5):
            # the LoG again only where the smoothed estimate is taken
            r_log, r_fg = _log_radius(smooth, radii, spi, None), s_r
    r = r_log
    if r_log > 0 and r_fg > 0:
        ratio = r_fg / r_log
        if 1 / 1.5 <= ratio <= 1.5:
            r = math.sqrt(r_fg * r_log)
    elif r_log <= 0:
        r = r_fg
    if r <= 0:
        r = 4.0 * sp.min()
    return {
        "radius": float(r),
        "radius_px": tuple(float(r / s) for s in sp),
        "radius_log": r_log if r_log > 0 else None,
        "radius_foreground": r_fg if r_fg > 0 else None,
    }


def _log_radius(img, radii, spi, progress) -> float:
    """The LoG radius estimate (physical; 0.0: no blob scale found)."""
    best, best_arg = max_log_response(img, radii, spi, progress)
    size = tuple(max(3, int(2 * round(1.25 * radii[0] / s)) + 1) for s in spi)
    local_max = (best == ndi.maximum_filter(best, size=size)) & (best > 0)
    # Strong local maxima: at least half the 99.9th percentile of the response map.
    peaks = local_max & (best > 0.5 * np.percentile(best, 99.9))
    if peaks.any():
        pts, resp = np.argwhere(local_max), best[local_max]  # every maximum, row-major
        blob = _blob_like(best, pts, radii[best_arg[local_max]], spi)
        # Most of the strongest maxima on ridges: a bright line or sheet (a membrane-like
        # streak through a nuclei volume put the median on the streak's width, 0.33x the
        # nuclei's radius). Where the maxima as a whole are still mostly blobs (a streak
        # among objects), read the scale at the strongest blob-like ones instead. A
        # network of ridges (membrane-stained cells: under half of all maxima blob-like,
        # where a streak through nuclei keeps over 80 %) keeps the plain estimate.
        if blob[peaks[local_max]].mean() < 0.5 and blob.mean() >= BLOB_MAXIMA_FRACTION:
            pts, resp = pts[blob], resp[blob]
            pts = pts[resp > 0.5 * np.percentile(resp, 99.9)]
            peaks = np.zeros_like(peaks)
            peaks[tuple(pts.T)] = True
    r_log = 0.0
    if peaks.any():
        k_med = int(np.median(best_arg[peaks]))
        # A median at the end of the scale range means no blob scale was found (noise
        # at the finest scale, or densely packed objects): leave it to the foreground.
        if 0 < k_med < len(radii) - 1:
            r_log = float(radii[k_med]) * 0.87
    report(progress, len(radii), len(radii) + 1, "estimating object size")
    return r_log


#: A maximum of the LoG response is blob-like when the smallest magnitude of its
#: Hessian's eigenvalues is at least this fraction of the largest, all of them negative:
#: the curvature test of Lowe (2004, section 4.1) that rejects edges, per dimension. A
#: line or sheet has one or two eigenvalues near zero; an ellipsoid of aspect ``a`` has a
#: ratio of about ``1 / a**2``, so this keeps objects up to about 3x as long as wide.
BLOB_CURVATURE_RATIO = 0.1

#: Where most of the strongest LoG maxima are ridges, the scale is read at the blob-like
#: maxima only when at least this fraction of all maxima is blob-like (a streak through
#: objects), not in a network of ridges (cell membranes).
BLOB_MAXIMA_FRACTION = 0.75


def _blob_like(response: np.ndarray, points: np.ndarray, radii: np.ndarray, spacing) -> np.ndarray:
    """Whether each maximum of a response map is a blob rather than a ridge.

    The Hessian of ``response`` at each point, by central finite differences with a step
    of half the point's radius per axis (physical units, so anisotropic voxels count
    right). Only the maxima are tested: :func:`skimage.feature.hessian_matrix` would filter
    the whole image at every scale (six full-volume filters per scale in 3D) for a few
    hundred points.

    Parameters
    ----------
    response : ndarray of float, shape ``([Z,] Y, X)``
    points : ndarray of int, shape ``(n, ndim)``
    radii : ndarray of float, shape ``(n,)``
        Physical radius at each point.
    spacing : sequence of float
        Physical pixel size per axis.

    Returns
    -------
    ndarray of bool, shape ``(n,)``
    """
    sp = np.asarray(spacing, dtype=float)
    n, nd = points.shape
    step = np.maximum(1, np.round(np.asarray(radii)[:, None] / (2 * sp[None]))).astype(int)  # (n, nd)
    hi = np.array(response.shape) - 1

    def at(offset):
        q = np.clip(points + offset, 0, hi)
        return response[tuple(q.T)].astype(float)

    centre = at(0)
    hess = np.zeros((n, nd, nd))
    unit = [np.eye(nd, dtype=int)[d] * step for d in range(nd)]  # (n, nd) offsets per axis
    for d in range(nd):
        hd = step[:, d] * sp[d]
        hess[:, d, d] = (at(unit[d]) + at(-unit[d]) - 2 * centre) / hd**2
        for e in range(d + 1, nd):
            he = step[:, e] * sp[e]
            cross = (
                at(unit[d] + unit[e]) - at(unit[d] - unit[e]) - at(unit[e] - unit[d]) + at(-unit[d] - unit[e])
            )
            hess[:, d, e] = hess[:, e, d] = cross / (4 * hd * he)
    eig = np.linalg.eigvalsh(hess)  # (n, nd), ascending
    mag = np.abs(eig)
    return (eig[:, -1] < 0) & (mag.min(axis=1) >= BLOB_CURVATURE_RATIO * np.maximum(mag.max(axis=1), 1e-12))


def _first_foreground(img: np.ndarray, foreground: np.ndarray | None) -> np.ndarray:
    """The given first-pass foreground, or Otsu of ``img`` smoothed by one pixel."""
    from skimage.filters import threshold_otsu

    if foreground is None:
        sm = ndi.gaussian_filter(img, 1.0)
        # Flattened: the same histogram, without scikit-image's "looks like RGB" warning for
        # volumes whose last axis has 3 or 4 planes.
        return sm > threshold_otsu(sm.ravel()) if np.ptp(sm) > 0 else np.zeros(img.shape, bool)
    if foreground.shape != img.shape:
        raise ValueError("foreground must have the image's shape")
    return foreground


def _foreground_radius(fg: np.ndarray, spi: np.ndarray) -> float:
    """Median per-component radius of a first-pass foreground (physical; 0.0 if none)."""
    m, r_eq = component_radii(fg, spi)
    ok = m >= 1.5 * spi.min()
    # Per component, the equivalent-sphere radius, capped at twice the distance-transform
    # maximum: irregular (elongated, lobed) objects get their volume's radius, whereas a
    # clump of touching objects, whose distance maximum stays one object's radius, does not
    # count as one big object.
    r_fg = float(np.median(np.minimum(r_eq, 2 * m)[ok])) if ok.any() else 0.0
    return r_fg


def max_log_response(img: np.ndarray, radii: np.ndarray, spacing: np.ndarray, progress=None):
    """Per pixel, the strongest scale-normalised ``-LoG`` response over ``radii`` and its index.

    LoG by FFT (scipy's spatial gaussian_laplace costs O(sigma) per pixel and dominated the
    run time for large objects): one forward transform of the image, symmetrically padded
    by 1.5 of the largest sigma (reflect borders as scipy's; the periodic copy is then 3
    sigma away, weight exp(-4.5) ~ 1 %, too little to move a peak); then, per scale, one
    inverse transform on a grid coarsened by 2, 4, ... along each axis where sigma exceeds
    4 pixels along it: the spectrum is cropped to the coarse grid's band, which is exact
    because the Gaussian of >= 2 coarse pixels has no energy left beyond it. The per-grid
    maxima are brought back by linear interpolation. Single precision throughout.

    ``img`` is ``([Z,] Y, X)`` float; ``radii`` physical, ascending; returns ``best``
    (float32, the image's shape) and ``best_arg`` (int16 indices into ``radii``).
    """
    from scipy import fft as sfft

    ndim = img.ndim
    sig_px = [np.asarray(r / math.sqrt(ndim) / spacing) for r in radii]
    # Coarsening per axis and scale: 2**level with sigma / 2**level in [2, 4) pixels.
    levels = [tuple(int(2 ** max(0, math.floor(math.log2(max(v, 1.0) / 2.0)))) for v in s) for s in sig_px]
    f_max = np.max(np.asarray(levels), axis=0)
    # Padded size: >= 1.5 sigma_max each side, a multiple of the coarsest factor, FFT-friendly.
    padded_shape, pads = [], []
    for n, sm, fm in zip(img.shape, np.max(np.asarray(sig_px), axis=0), f_max):
        fm = int(fm)
        p = int(min(math.ceil(1.5 * sm), n - 1))
        p = -(-p // fm) * fm  # a multiple of every factor: pixel 0 falls on every coarse grid
        m = fm * sfft.next_fast_len(-(-(n + 2 * p) // fm), real=True)
        padded_shape.append(m)
        pads.append((p, m - n - p))
    padded = np.pad(img.astype(np.float32, copy=False), pads, mode="symmetric")
    spec = sfft.rfftn(padded, workers=1)  # complex64, padded_shape[:-1] + (padded_shape[-1] // 2 + 1,)
    best = best_arg = None
    done = 0
    for factor in sorted(set(levels), key=lambda fa: float(np.prod(fa))):
        ks = [k for k, fa in enumerate(levels) if fa == factor]
        shape = tuple(m // fa for m, fa in zip(padded_shape, factor))
        # Band of the coarse grid: low positive and negative frequencies on the full axes,
        # the first half on the last (real) axis; scaled for irfftn's 1 / size.
        sub = spec
        for ax, (m, n_c) in enumerate(zip(padded_shape[:-1], shape[:-1])):
            if n_c != m:
                half = n_c // 2
                sub = np.concatenate(
                    [sub.take(range(half), ax), sub.take(range(m - (n_c - half), m), ax)], ax
                )
        sub = sub[..., : shape[-1] // 2 + 1] * np.float32(np.prod(shape) / np.prod(padded_shape))
        freqs = [sfft.fftfreq(n).astype(np.float32) for n in shape[:-1]] + [
            sfft.rfftfreq(shape[-1]).astype(np.float32)
        ]
        grids = np.meshgrid(*freqs, indexing="ij", sparse=True)
        omega2 = [(np.float32(2 * np.pi) * g) ** 2 for g in grids]  # coarse-pixel units
        # Coarse sample j is fine (padded) pixel j * f: the image's pixels 0..n-1 lie on
        # coarse samples p0 / f .. p0 / f + (n - 1) / f.
        inner = tuple(
            slice(p0 // fa, min(p0 // fa + -(-(n - 1) // fa) + 1, c))
            for (p0, _), n, fa, c in zip(pads, img.shape, factor, shape)
        )
        lvl_best = lvl_arg = None
        for k in ks:
            report(progress, done, len(radii) + 1, "estimating object size")
            done += 1
            sig = radii[k] / math.sqrt(ndim)
            s_lvl = np.maximum(sig_px[k], 0.5) / np.asarray(factor)
            # -LoG in full-resolution pixel units (d/dx_full = d/dx_coarse / f) has the
            # transfer function sum_i omega_i^2 / f_i^2 G(omega); times the physical
            # sigma^2, -ndi.gaussian_laplace(img, s_px) * sig**2.
            gauss = np.exp(sum(np.float32(-0.5 * sl**2) * w2 for w2, sl in zip(omega2, s_lvl)))
            lap = sum(w2 / np.float32(fa**2) for w2, fa in zip(omega2, factor))
            resp = sfft.irfftn(sub * (lap * (gauss * np.float32(sig**2))), s=shape, workers=1)[inner]
            if lvl_best is None:
                lvl_best, lvl_arg = resp, np.full(resp.shape, k, np.int16)
            else:
                upd = resp > lvl_best
                lvl_best[upd] = resp[upd]
                lvl_arg[upd] = k
        if any(fa > 1 for fa in factor):
            lvl_best = _to_grid(lvl_best, factor, img.shape, order=1)
            lvl_arg = _to_grid(lvl_arg, factor, img.shape, order=0)
        if best is None:
            best, best_arg = np.ascontiguousarray(lvl_best), np.ascontiguousarray(lvl_arg)
        else:
            upd = lvl_best > best
            best[upd] = lvl_best[upd]
            best_arg[upd] = lvl_arg[upd]
    return best, best_arg


def _to_grid(coarse: np.ndarray, factor: Sequence[int], shape: tuple[int, ...], order: int) -> np.ndarray:
    """Values sampled every ``factor`` pixels (coarse sample j at fine pixel j f) at the
    fine pixels of ``shape``: linear (order 1) or nearest (order 0) interpolation."""
    coords = [np.arange(n) / fa for n, fa in zip(shape, factor)]
    if order == 0:
        idx = [np.clip(np.round(c).astype(np.intp), 0, m - 1) for c, m in zip(coords, coarse.shape)]
        return coarse[np.ix_(*idx)]
    return _interp_linear(coarse, coords)


def _interp_linear(values: np.ndarray, coords: Sequence[np.ndarray]) -> np.ndarray:
    """``values`` at the grid of per-axis coordinates ``coords`` (in index units of
    ``values``; clipped to its extent), separable linear interpolation, float32.

    Axis by axis with ``take``: the memory is that of the output, where
    :func:`scipy.ndimage.map_coordinates` would need a coordinate array per output pixel.
    """
    out = values
    for ax, c in enumerate(coords):
        m = out.shape[ax]
        c = np.clip(c, 0, m - 1)
        lo = np.minimum(np.floor(c).astype(np.intp), max(m - 2, 0))
        hi = np.minimum(lo + 1, m - 1)
        w = (c - lo).astype(np.float32).reshape([-1 if i == ax else 1 for i in range(out.ndim)])
        out = out.take(lo, ax) * (1 - w) + out.take(hi, ax) * w
    return out.astype(np.float32, copy=False)


def working_shape(
    shape: Sequence[int],
    radius: float,
    spacing: Sequence[float],
    *,
    params: SegmentationParams | None = None,
) -> tuple[int, ...]:
    """Grid on which objects of ``radius`` are segmented: axes where the radius spans more
    than ``params.working_radius_px`` (8) pixels are shrunk so that it spans that many.

    Every step of the pipeline is defined relative to the object radius, so nothing is
    gained by segmenting a 40-pixel nucleus at full resolution except cost (quadratic in
    2D, cubic in 3D); Cellpose resizes to a fixed object diameter for the same reason.
    Never upsamples, and shrinks anisotropic volumes towards isotropic voxels.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape ``([Z,] Y, X)`` in pixels.
    radius : float
        Object radius in physical units of ``spacing``.
    spacing : sequence of float
        Pixel size per axis.
    params : SegmentationParams or None
        Default :class:`~napari_mae.segmentation.params.SegmentationParams`.

    Returns
    -------
    tuple of int
        The working shape (equal to ``shape`` when no axis is shrunk).
    """
    target = (params or SegmentationParams()).working_radius_px
    out = []
    for n, s in zip(shape, spacing):
        r_px = radius / float(s)
        out.append(int(n) if r_px <= target else max(1, int(round(n * target / r_px))))
    return tuple(out)


def downsample(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Anti-aliased linear resampling to ``shape`` (:func:`skimage.transform.resize`)."""
    from skimage.transform import resize

    return resize(img, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def _nearest_index(n_from: int, n_to: int) -> np.ndarray:
    """For each of ``n_to`` pixel centres, the index of the ``n_from``-grid pixel holding it."""
    return np.minimum(((np.arange(n_to) + 0.5) * (n_from / n_to)).astype(np.intp), n_from - 1)


def downsample_scribbles(scribbles: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scribbles on the working grid: every stroke pixel marks the working pixel holding it
    (thin strokes survive, which nearest-neighbour sampling would skip); where strokes of
    different classes meet in one working pixel, the object stroke wins."""
    out = np.zeros(shape, scribbles.dtype)
    idx = np.nonzero(scribbles)
    w_idx = tuple(
        np.minimum((i * (m / n)).astype(np.intp), m - 1) for i, n, m in zip(idx, scribbles.shape, shape)
    )
    vals = scribbles[idx]
    order = np.argsort(vals, kind="stable")  # later writes win: background (1) first
    out[tuple(i[order] for i in w_idx)] = vals[order]
    return out


def upsample_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Labels from the working grid back to ``shape``.

    The foreground outline is the linear interpolation of the working-grid foreground
    cut at one half (a smooth outline rather than the working pixels' staircase); each
    pixel of it takes the label of the working pixel holding it, or, where that is
    background, the nearest label. Done in slabs along the first axis (about 2 M output
    pixels each, plus a halo for the nearest-label search), so the memory beyond the
    output is a few slabs whatever the size; labels stay consecutive.
    """
    n0 = shape[0]
    halo = int(math.ceil(shape[0] / labels.shape[0])) + 1
    rows = max(1, int(2**21 // max(1, int(np.prod(shape[1:])))))
    out = np.empty(shape, np.uint32)
    near = [_nearest_index(m, n) for m, n in zip(labels.shape, shape)]
    fg_coarse = (labels > 0).astype(np.float32)
    present = np.zeros(int(labels.max()) + 1, bool)
    for a in range(0, n0, rows):
        b = min(a + rows, n0)
        a_h, b_h = max(a - halo, 0), min(b + halo, n0)
        fg = _interp_rows(fg_coarse, shape, a_h, b_h) > 0.5
        slab = labels[np.ix_(near[0][a_h:b_h], *near[1:])]
        slab[~fg] = 0
        gaps = fg & (slab == 0)
        if gaps.any() and slab.any():
            idx = ndi.distance_transform_edt(slab == 0, return_distances=False, return_indices=True)
            slab[gaps] = slab[tuple(i[gaps] for i in idx)]
            del idx
        core = slab[a - a_h : a - a_h + (b - a)]
        out[a:b] = core
        present[core.ravel()] = True
    present[0] = True
    if not present.all():  # an object lost to the outline (a one-pixel sliver): renumber
        lut = (np.cumsum(present) - 1).astype(np.uint32)
        for a in range(0, n0, rows):
            out[a : a + rows] = lut[out[a : a + rows]]
    return out


def _interp_rows(coarse: np.ndarray, shape: tuple[int, ...], a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` (first axis) of ``coarse`` resampled linearly to ``shape``, pixel
    centres aligned as in :func:`skimage.transform.resize` (edges held constant)."""
    rows = [np.arange(a, b)] + [np.arange(n) for n in shape[1:]]
    return _interp_linear(coarse, [(i + 0.5) * (m / n) - 0.5 for i, m, n in zip(rows, coarse.shape, shape)])
