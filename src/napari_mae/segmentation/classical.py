"""Adaptive instance segmentation of 2D images and 3D volumes (nuclei, cells, bones).

The pipeline, every length derived from an object radius estimated per image in physical
units (pass ``spacing``), so that object size, brightness and density may change from one
image to the next:

1. **Input**: any real dtype, NaN ignored, RGB / multichannel reduced to one channel
   (grey for RGB, first principal component otherwise), percentile normalisation, and
   polarity detection so dark objects on a bright background (brightfield, stained
   tissue) are inverted to bright-on-dark.
2. **Object radius**: scale-space Laplacian of Gaussian (Lindeberg 1998: the
   scale-normalised response of a disk of radius r peaks at ``sigma = r / sqrt(ndim)``),
   read at its strongest local maxima, cross-checked against the per-component maximum
   of the distance transform of a first-pass Otsu foreground.
3. **Foreground**: without scribbles, white top-hat background subtraction with a box of
   3 radii (the largest single gain measured on the dev data: it repairs the skewed
   histograms of dense images on which Otsu alone marks half the image), then Otsu scaled
   by 0.7 (2D) / 0.85 (3D), which keeps dim objects beside bright ones.
   With scribbles (0 = unlabelled, 1 = background, 2.. = objects), a random forest on
   :func:`napari_mae.features.multiscale_features` (+ MAE features if a model is given)
   predicts background / object-boundary / object-interior; the boundary class is taught
   from the edges of the automatic objects that the scribbles confirm, and the automatic
   result fills in pseudo-labels far from any scribble (scribbles override them). Object
   and background strokes weigh the same whatever their lengths; the probability is cut
   at 0.5, or at its Otsu threshold where that is well below 0.5 (thin, rare objects).
   Where the object strokes are far shorter than the automatic radius and lie in automatic
   objects that background strokes cross too (a CT: the body found, the bones meant), the
   radius is taken from the strokes and the boundary term is left out.
4. **Working resolution**: where the radius spans more than 8 pixels along an axis, steps
   3-4 run on a copy shrunk so that it spans 8 (anti-aliased), and the labels come back
   with a linearly interpolated outline: every length is relative to the radius, so the
   full grid of a 40-pixel nucleus adds cost (4x-25x in the DSB images), not accuracy.
5. **Instances**: seeded watershed of the spacing-aware Euclidean distance transform
   (combined with the boundary probability when there is one), seeds from its h-maxima
   with h scaled to the radius; holes filled, fragments below a fraction of the expected
   object volume dropped, labels consecutive uint32.
6. **Large inputs** run tile by tile with an overlap of several object diameters, with the
   global parameters (normalisation, polarity, radius, threshold) estimated once; an
   object belongs to the tile whose core holds its centre, so objects cut by tile
   borders get one label.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from napari_mae._progress import ProgressCallback, report
from napari_mae.features import as_float_image, filter_bank

__all__ = [
    "estimate_object_radius",
    "working_shape",
    "segment_instances",
    "detect_polarity",
]

_PREDICT_ROWS = 2**17  # forest predictions per chunk (a progress report, i.e. a chance to stop, each)
# Scribble classifier: a random forest on at most 8000 rows: pseudo-labels 2 % of the
# pixels within [1000, 4000], scribbled pixels at most 4000 (fitting cost grows with the
# rows, accuracy hardly: 0.742 with 8000 + 20000 vs 0.721 here on a quarter of the DSB
# images). Extremely randomised trees fit 5x faster but found fewer CT bones (F1@0.5 over
# four seeds 0.19-0.44 vs 0.35-0.47); bootstraps of half the rows halve the fitting time
# but lost 0.015 on the DSB images in scribble mode.
_N_TREES = 24
_MODEL_COMPONENTS = 12  # PCA channels of MAE features (DSB: within 0.003 of 24 channels, at half the cost)
_PSEUDO_FRACTION = 0.02
_PSEUDO_RANGE = (1000, 4000)
_MAX_SCRIBBLED = 4000
_PARALLEL_ROWS = 2**18  # predict with all cores above this many pixels (thread start-up costs below)
_BLOCK_VOXELS = 2**23  # segment in tiles above ~8 M voxels (2896^2 or 203^3)
_TILE_VOXELS = 2**24  # target size of one tile with its margins (4096^2 or 256^3)

# Lengths as fractions of the estimated object radius, tuned on the dev data (see
# benchmarks/bench_segmentation.py); none depends on a particular image.
PARAMS = {
    "smooth": 0.12,  # Gaussian pre-smoothing sigma / r
    "background": 1.5,  # half side of the grey-opening box / r
    "gamma": 1.0,  # threshold on top-hat ** gamma (< 1 lifts dim objects)
    "threshold_scale": 0.7,  # multiplies the Otsu threshold (2D)
    # 3D: the axial point-spread function is 2-3x longer than the lateral one, so blur
    # spreads each object over its neighbours; cut higher (measured: 0.55 -> 0.66 on the
    # 3D dev volume, while 2D drops 0.64 -> 0.61 at this value).
    "threshold_scale_3d": 0.85,
    "h": 0.1,  # h-maxima depth of distance-transform seeds / r
    "dist_smooth": 0.1,  # smoothing of the distance transform / r
    "min_size": 0.25,  # smallest object kept / expected object volume
    "intensity": 0.5,  # weight of the normalised intensity in the watershed landscape (x r)
    "low_probability": 0.4,  # scribble mode: Otsu of P(object) below this replaces 0.5
    # Working resolution: axes on which the object radius spans more pixels than this are
    # downsampled to it (never upsampled), segmented there and the labels brought back.
    "working_radius_px": 8.0,
}


# --------------------------------------------------------------------------- input


def _to_single_channel(x: np.ndarray, rgb: bool) -> np.ndarray:
    """``(C, *spatial)`` -> ``(*spatial)``: luminance for RGB, first principal component otherwise."""
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


def _remove_isolated_outliers(img: np.ndarray, delta: float = 0.5) -> int:
    """Single pixels far outside the normalised range that differ from *all* their
    neighbours by more than ``delta`` (camera hot or dead pixels, cosmic-ray hits) take the
    value of their brightest (darkest) neighbour, in place; returns how many.

    Ten saturated pixels in a 16-bit image put Otsu's threshold and the blob detector on
    them and left no nucleus found; a median filter would fix that too but also blur every
    small object, so only pixels above 1 + ``delta`` or below -``delta`` (after the
    1-99.8 % percentile normalisation) are examined, with their 3^ndim neighbourhood.
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


# --------------------------------------------------------------------------- progress


def _sub_progress(progress: ProgressCallback | None, lo: float, hi: float, total: int = 1000):
    """A callback mapping a step's own ``(done, total)`` onto ``[lo, hi]`` of ``total``.

    Every long step reports through one of these, so that a caller that cancels from the
    callback (the widget's Stop) is heard within a fraction of a second while the overall
    ``done / total`` keeps rising.
    """
    if progress is None:
        return None

    def sub(done: int, sub_total: int, message: str = "") -> None:
        frac = min(max(done / sub_total, 0.0), 1.0) if sub_total > 0 else 0.0
        report(progress, int(lo + (hi - lo) * frac), total, message)

    return sub


# --------------------------------------------------------------------------- size


def _component_radii(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per connected component: maximum of the spacing-aware distance transform, and the
    radius of the disk (2D) or ball (3D) of the same area/volume, both physical."""
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
        ``radius`` (physical units), ``radius_px`` (per axis, pixels), ``radius_log``,
        ``radius_foreground`` (physical, 0 when undefined).
    """
    from skimage.filters import threshold_otsu

    ndim = image.ndim
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, float)
    extent = np.array(image.shape) * sp
    r_min = 1.0 * sp.min()
    r_max = max(3 * r_min, extent.min() / 6.0)
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
    best, best_arg = _max_log_response(img, radii, spi, progress)
    size = tuple(max(3, int(2 * round(1.25 * radii[0] / s)) + 1) for s in spi)
    # Strong local maxima: at least half the 99.9th percentile of the response map.
    peaks = (best == ndi.maximum_filter(best, size=size)) & (best > 0.5 * np.percentile(best, 99.9))
    r_log = 0.0
    if peaks.any():
        k_med = int(np.median(best_arg[peaks]))
        # A median at the end of the scale range means no blob scale was found (noise
        # at the finest scale, or densely packed objects): leave it to the foreground.
        if 0 < k_med < len(radii) - 1:
            r_log = float(radii[k_med]) * 0.87
    report(progress, len(radii), len(radii) + 1, "estimating object size")
    if foreground is None:
        sm = ndi.gaussian_filter(img, 1.0)
        # Flattened: the same histogram, without scikit-image's "looks like RGB" warning for
        # volumes whose last axis has 3 or 4 planes.
        fg = sm > threshold_otsu(sm.ravel()) if np.ptp(sm) > 0 else np.zeros(img.shape, bool)
    else:
        fg = foreground if foreground.shape == img.shape else None
        if fg is None:
            raise ValueError("foreground must have the image's shape")
    m, r_eq = _component_radii(fg, spi)
    ok = m >= 1.5 * spi.min()
    # Per component, the equivalent-sphere radius, capped at twice the distance-transform
    # maximum: irregular (elongated, lobed) objects get their volume's radius, whereas a
    # clump of touching objects, whose distance maximum stays one object's radius, does not
    # count as one big object.
    r_fg = float(np.median(np.minimum(r_eq, 2 * m)[ok])) if ok.any() else 0.0
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
        "radius_log": r_log,
        "radius_foreground": r_fg,
    }


def _max_log_response(img: np.ndarray, radii: np.ndarray, spacing: np.ndarray, progress=None):
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


def _stroke_radius(scribbles: np.ndarray, spacing: np.ndarray) -> float:
    """Half the median physical length of the object strokes (labels >= 2), 0 if none.

    A stroke drawn inside an object is at most about its diameter long, so this bounds
    the radius the user means from above; it is used where the automatic estimate is far
    larger (e.g. a CT, whose blob detector finds the body while the strokes are in bones).
    """
    lab, n = ndi.label(scribbles >= 2, structure=np.ones((3,) * scribbles.ndim, bool))
    if n == 0:
        return 0.0
    lengths = [max((sl.stop - sl.start) * s for sl, s in zip(box, spacing)) for box in ndi.find_objects(lab)]
    return 0.5 * float(np.median(lengths))


def _strokes_disagree(img: np.ndarray, scribbles: np.ndarray, r: float, spacing: np.ndarray) -> bool:
    """Whether most object-stroke pixels lie in automatic objects (connected components of
    the automatic foreground at radius ``r``) that background strokes cross as well."""
    top, thr = _auto_foreground(img, r, spacing, None)
    comp, _ = ndi.label(top > thr)
    in_bg = np.unique(comp[scribbles == 1])
    obj = comp[scribbles >= 2]
    return bool(np.mean(np.isin(obj, in_bg[in_bg > 0])) >= 0.5)


# --------------------------------------------------------------------------- foreground


def _box_size(r: float, factor: float, spacing: np.ndarray, shape) -> tuple[int, ...]:
    return tuple(int(min(n, max(3, 2 * round(factor * r / s) + 1))) for s, n in zip(spacing, shape))


def _background(img: np.ndarray, r: float, spacing: np.ndarray, progress=None) -> np.ndarray:
    """Grey opening with a box of ``2 * PARAMS["background"]`` (3) object radii: the
    background under the objects.

    scipy's flat rectangular min/max filters are separable and cost O(1) per pixel
    whatever the box size (skimage's white_tophat with a disk of radius 2.5 r does not
    scale to 40-pixel nuclei); the box rather than the disk changes the estimate little
    for a background that varies slowly.
    """
    size = _box_size(r, PARAMS["background"], spacing, img.shape)
    # ndi.grey_opening is exactly this pair; split so that a caller may stop between.
    low = ndi.grey_erosion(img, size=size)
    report(progress, 1, 2, "background")
    return ndi.grey_dilation(low, size=size)


def _smooth(img: np.ndarray, r: float, spacing: np.ndarray) -> np.ndarray:
    sig = np.maximum(PARAMS["smooth"] * r / spacing, 0.5)
    return ndi.gaussian_filter(img, sig)


# --------------------------------------------------------------------------- instances


def _instances(
    fg: np.ndarray,
    r: float,
    spacing: np.ndarray,
    *,
    boundary: np.ndarray | None = None,
    intensity: np.ndarray | None = None,
    h_factor: float | None = None,
    min_frac: float | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Seeded watershed of the spacing-aware distance transform inside ``fg``."""
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    h_factor = PARAMS["h"] if h_factor is None else h_factor
    min_frac = PARAMS["min_size"] if min_frac is None else min_frac
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
    dist = ndi.gaussian_filter(dist, np.maximum(PARAMS["dist_smooth"] * r / spacing, 0.5))
    land = dist
    if intensity is not None and PARAMS["intensity"] > 0:
        # Nuclei are brighter in the middle than where two touch: add the intensity,
        # scaled to its 99th percentile inside the foreground, as r * weight.
        ref = np.percentile(intensity[fg], 99) if fg.any() else 1.0
        land = dist + PARAMS["intensity"] * r * np.clip(intensity / max(ref, 1e-6), 0, 1.5)
    if boundary is not None:
        land = dist * (1.0 - boundary)
    h = max(h_factor * r, 0.5 * spacing.min())
    report(progress, 4, 8, msg)
    seeds = _h_maxima(land, h, _sub_progress(progress, 500, 625))
    report(progress, 5, 8, msg)
    markers, _ = ndi.label(seeds & fg)
    labels = watershed(-land, markers, mask=fg)
    report(progress, 7, 8, msg)
    # Drop fragments, fill holes per object, relabel consecutively.
    areas = np.bincount(labels.ravel())
    small = areas < min_size
    small[0] = False
    labels[small[labels]] = 0
    return _relabel(labels)


def _h_maxima(image: np.ndarray, h: float, progress: ProgressCallback | None = None) -> np.ndarray:
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


def _relabel(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels.astype(np.uint32, copy=False))[0].astype(np.uint32)


def _fill_holes_per_label(labels: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    report(progress, 1, 2, "filling holes")
    if holes.any():
        # Holes take the label of the nearest object (all holes are enclosed by objects).
        idx = ndi.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
        labels = labels.copy()
        labels[holes] = labels[tuple(i[holes] for i in idx)]
    return labels


# --------------------------------------------------------------------------- working resolution


def working_shape(shape: Sequence[int], radius: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid on which objects of ``radius`` are segmented: axes where the radius spans more
    than ``PARAMS["working_radius_px"]`` pixels are shrunk so that it spans that many.

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

    Returns
    -------
    tuple of int
        The working shape (equal to ``shape`` when no axis is shrunk).
    """
    target = PARAMS["working_radius_px"]
    out = []
    for n, s in zip(shape, spacing):
        r_px = radius / float(s)
        out.append(int(n) if r_px <= target else max(1, int(round(n * target / r_px))))
    return tuple(out)


def _downsample(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Anti-aliased linear resampling to ``shape`` (:func:`skimage.transform.resize`)."""
    from skimage.transform import resize

    return resize(img, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def _nearest_index(n_from: int, n_to: int) -> np.ndarray:
    """For each of ``n_to`` pixel centres, the index of the ``n_from``-grid pixel holding it."""
    return np.minimum(((np.arange(n_to) + 0.5) * (n_from / n_to)).astype(np.intp), n_from - 1)


def _downsample_scribbles(scribbles: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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


def _upsample_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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


# --------------------------------------------------------------------------- public


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=float)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must have {ndim} positive values (one per spatial axis), got {spacing!r}")
    return sp


def _check_scribbles(scribbles, shape) -> np.ndarray | None:
    if scribbles is None:
        return None
    s = np.asarray(scribbles)
    if s.shape != tuple(shape):
        raise ValueError(f"scribbles must have the image's spatial shape {tuple(shape)}, got {s.shape}")
    if (
        not np.issubdtype(s.dtype, np.integer)
        and s.dtype != bool
        and not (np.all(np.isfinite(s)) and np.all(np.mod(s, 1) == 0))
    ):
        raise ValueError("scribbles must be integer labels (0 unlabelled, 1 background, 2.. objects)")
    s = s.astype(np.int64)
    if (s < 0).any():
        raise ValueError("scribbles must be non-negative (0 unlabelled, 1 background, 2.. objects)")
    has_bg = bool((s == 1).any())
    has_fg = bool((s >= 2).any())
    if not (has_bg and has_fg):
        raise ValueError(
            "scribbles need both background (label 1) and object (label >= 2) strokes; "
            f"got background={'yes' if has_bg else 'no'}, objects={'yes' if has_fg else 'no'}"
        )
    return s


def segment_instances(
    image: np.ndarray,
    *,
    scribbles: np.ndarray | None = None,
    method: str = "auto",
    model=None,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    object_radius: float | None = None,
    threshold: float | None = None,
    bright_objects: bool | None = None,
    tile_shape: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict]:
    """Segment every object of a 2D image or 3D volume as its own label.

    Parameters
    ----------
    image : ndarray, shape ``([Z,] Y, X)``, ``(Y, X, 3)`` RGB, or with ``channel_axis``
        Any real dtype (uint8/uint16/int32/float32/float64 give the same labels); NaN
        pixels are ignored (never labelled). An RGB image is recognised by a last axis
        of length 3 or 4 on a 3-dimensional array whose other axes are both longer than 16
        and with no ``spacing`` of length 3; otherwise pass ``channel_axis``.
    scribbles : ndarray of int or None, shape ``image.shape[spatial]``
        0 = unlabelled, 1 = background, 2.. = object classes (all merged into
        "object"). None for the automatic mode.
    method : {"auto", "learned", "classical"}
        ``"learned"``: the MAE encoder's instance decoder
        (:func:`napari_mae.segmentation.learned.segment_learned`; volumes from their
        orthogonal planes); ``"classical"``: the filter-bank pipeline (with scribbles, the
        scribble classifier); ``"auto"``: learned when ``model`` is a segmentation model and
        there are no scribbles, classical otherwise (the bundled decoder is not the default:
        on the dev sets it scores below the classical pipeline, see the README).
        ``info["method"]`` says which ran.
    model : str, path, model or None
        With the learned method, the segmentation model: a segmentation checkpoint or
        ``"default-2d"`` (bundled; the default of ``method="learned"``). With the classical method and scribbles,
        an MAE whose encoder features join the scribble classifier (see
        :func:`napari_mae.features.multiscale_features`); ignored without scribbles.
    spacing : sequence of float or None
        Physical pixel size per spatial axis, e.g. ``(0.28, 0.13, 0.13)`` um (Z, Y, X).
        Radii are then reported in the same unit. None means isotropic 1.
    channel_axis : int or None
        Axis of ``image`` holding channels.
    object_radius : float or None
        Typical object radius in physical units; estimated when None.
    threshold : float or None
        Foreground threshold on the background-subtracted, normalised image (automatic
        mode) or on the object probability (scribble mode, default 0.5); estimated
        (Otsu) when None.
    bright_objects : bool or None
        Polarity; detected when None (dark-on-bright images are inverted).
    tile_shape : sequence of int or None
        Core tile shape in pixels for tiled processing; None tiles automatically above
        about 8 M pixels (on the working grid): tiles of about 16 M pixels (4096^2,
        256^3; half that with scribbles) including margins of 6 object radii, with equal
        cores that divide each axis.
    progress : callable or None
        ``progress(done, total, message)``; raise :class:`napari_mae._progress.Cancelled`
        from it to stop.

    Returns
    -------
    labels : ndarray of uint32, shape ``image.shape[spatial]``
        0 = background, objects 1..n consecutive.
    info : dict
        ``n_objects``, ``radius`` (physical), ``radius_px`` (per axis), ``radius_log``,
        ``radius_foreground``, ``threshold``, ``bright_objects``, ``spacing``, ``mode``
        ("automatic" / "scribbles"), ``working_shape`` (the grid segmented, see
        :func:`working_shape`), ``tiles``, and ``message`` (non-empty when the
        result is empty for a reason, e.g. a constant image); ``method`` ("learned" /
        "classical"), and for the learned method ``model``, ``scale`` (resampling factor
        per axis), ``passes`` and ``radius_found`` (the median radius of the objects the
        decoder found, physical units).

    Raises
    ------
    ValueError
        If the image is empty or not 2D/3D, ``channel_axis`` is out of range, ``spacing``
        is malformed, ``object_radius`` is not positive, the scribbles have the wrong
        shape, negative values or lack either background or object strokes, ``method`` is
        unknown, or ``method="learned"`` is given scribbles.
    napari_mae.io.checkpoint.CheckpointError
        ``method="learned"`` with a ``model`` that is not a segmentation model.
    """
    if method not in ("auto", "learned", "classical"):
        raise ValueError(f"method={method!r} must be 'auto', 'learned' or 'classical'")
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError(f"the image is empty (shape {arr.shape})")
    if channel_axis is not None and not -arr.ndim <= channel_axis < arr.ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for an array of {arr.ndim} dims")
    if channel_axis is None and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        spatial_guess = arr.shape[:-1]
        if min(spatial_guess) > 16 and (spacing is None or len(spacing) == 2):
            channel_axis = -1
    rgb = channel_axis is not None and arr.shape[channel_axis] in (3, 4)
    x, invalid, _ = as_float_image(arr, channel_axis=channel_axis)
    shape = x.shape[1:]
    ndim = len(shape)
    sp = _check_spacing(spacing, ndim)
    scrib = _check_scribbles(scribbles, shape)
    if object_radius is not None and not (np.isfinite(object_radius) and object_radius > 0):
        raise ValueError(f"object_radius must be a positive number, got {object_radius!r}")
    if method == "learned" and scrib is not None:
        raise ValueError("the learned method takes no scribbles; use method='classical' for scribbles")
    net = None
    if scrib is None and (method == "learned" or (method == "auto" and model is not None)):
        net = _learned_model(model, method == "learned")
    info: dict = {
        "mode": "scribbles" if scrib is not None else "automatic",
        "method": "learned" if net is not None else "classical",
        "spacing": tuple(float(s) for s in sp),
        "message": "",
        "tiles": 1,
    }
    empty = np.zeros(shape, np.uint32)
    valid = ~invalid
    if not valid.any() or all(np.ptp(x[c][valid]) == 0 for c in range(x.shape[0])):
        info.update(
            n_objects=0,
            radius=float("nan"),
            radius_px=(float("nan"),) * ndim,
            threshold=float("nan"),
            bright_objects=True,
            message="image is constant or empty: no objects",
        )
        return empty, info
    report(progress, 0, 100, "preparing")
    img = _to_single_channel(x, rgb)
    del x
    n_outliers = _remove_isolated_outliers(img)
    if n_outliers:
        info["outlier_pixels"] = n_outliers
    if bright_objects is None and scrib is not None:
        # The strokes say which is which: objects brighter than the background strokes?
        bright_objects = bool(np.median(img[scrib >= 2]) >= np.median(img[scrib == 1]))
    elif bright_objects is None:
        bright_objects = detect_polarity(img[valid] if invalid.any() else img)
    if not bright_objects:
        img = 1.0 - img
    img = img.astype(np.float32, copy=False)
    info["bright_objects"] = bool(bright_objects)

    report(progress, 2, 100, "estimating object size")
    if object_radius is None:
        est = estimate_object_radius(img, sp, progress=_sub_progress(progress, 2, 20, 100))
    else:
        r = float(object_radius)
        est = {"radius": r, "radius_px": tuple(r / s for s in sp), "radius_log": float("nan"),
               "radius_foreground": float("nan")}  # fmt: skip
    r = est["radius"]
    info.update(est)
    if net is not None:
        return _finish_learned(img, net, sp, r, invalid, info, progress)
    auto_wrong = False  # the automatic objects are not the user's (see _strokes_disagree)
    if scrib is not None and object_radius is None:
        # Object strokes much shorter than the automatic diameter, *and* the automatic
        # objects that hold them hold background strokes too: the image-wide estimate
        # found other things than the user's objects (a CT's body, not its bones); take
        # the strokes' size. Short strokes in objects the automatic pass got right (a
        # click-sized stroke in a nucleus) leave the estimate alone.
        r_strokes = _stroke_radius(scrib, sp)
        info["radius_strokes"] = r_strokes
        # The same rule for tiled and untiled inputs (it was skipped above _BLOCK_VOXELS).
        if 0 < r_strokes < 0.5 * r and _strokes_disagree(img, scrib, r, sp):
            auto_wrong = True
            r = max(r_strokes, sp.min())
            info.update(radius_image=est["radius"], radius=r, radius_px=tuple(r / s for s in sp))

    if tile_shape is not None and len(tile_shape) != ndim:
        raise ValueError(f"tile_shape must have {ndim} values, got {tuple(tile_shape)}")
    full_shape = img.shape
    work_shape = working_shape(full_shape, r, sp)
    info["working_shape"] = work_shape
    if work_shape != full_shape:
        report(progress, 19, 100, "resampling")
        sp = sp * np.asarray(full_shape) / np.asarray(work_shape)
        img = _downsample(img, work_shape)
        scrib = None if scrib is None else _downsample_scribbles(scrib, work_shape)
        if tile_shape is not None:
            tile_shape = [
                max(1, int(round(t * w / n))) for t, w, n in zip(tile_shape, work_shape, full_shape)
            ]
    seg_progress = _sub_progress(progress, 20, 97, 100)
    if img.size > _BLOCK_VOXELS or tile_shape is not None:
        labels, thr, info["tiles"], tile_thresholds = _segment_tiled(
            img, sp, r, threshold, scrib, model, seg_progress, tile_shape, auto_wrong=auto_wrong
        )
        info["tile_thresholds"] = tile_thresholds
    else:
        refine = object_radius is None
        labels, thr, r_used = _segment_block(
            img, sp, r, threshold, scrib, model, seg_progress, refine,
            auto_wrong=auto_wrong,
        )  # fmt: skip
        if r_used != r:
            info.update(radius_auto=r, radius=r_used, radius_px=tuple(r_used / s for s in info["spacing"]))
    if labels.shape != full_shape:
        report(progress, 97, 100, "resampling")
        labels = _upsample_labels(labels, full_shape)
    if invalid.any():
        labels[invalid] = 0
        labels = _relabel(labels)
    info["threshold"] = float(thr)
    info["n_objects"] = int(labels.max())
    if info["n_objects"] == 0 and not info["message"]:
        info["message"] = "no object above the threshold"
    report(progress, 100, 100, "done")
    return labels, info


def _learned_model(model, required: bool):
    """The segmentation model for the learned method, or None to fall back to the classical one."""
    from napari_mae.segmentation.learned import cached_segmenter

    spec = "default-2d" if model is None else model
    try:
        return cached_segmenter(spec)
    except Exception:
        if required:
            raise
        return None  # no bundled weights, or an MAE (not a segmentation) checkpoint


def _finish_learned(img, net, sp, r, invalid, info, progress):
    """Labels of the learned method on the prepared image; fills ``info``."""
    from napari_mae.segmentation.learned import segment_learned

    report(progress, 20, 100, "learned decoder")
    labels, extra = segment_learned(
        img, net, net.decoder_config.object_radius, spacing=sp, radius=r,
        progress=_sub_progress(progress, 20, 97, 100),
    )  # fmt: skip
    labels = labels.astype(np.uint32, copy=False)
    if invalid.any():
        labels[invalid] = 0
    labels = _relabel(labels)
    info.update(extra)
    info["model"] = getattr(net, "source", "model")
    info["threshold"] = float("nan")
    info["working_shape"] = tuple(int(round(n * f)) for n, f in zip(img.shape, extra["scale"], strict=True))
    info["n_objects"] = int(labels.max())
    if info["n_objects"] == 0 and not info["message"]:
        info["message"] = "the decoder found no object"
    report(progress, 100, 100, "done")
    return labels, info


def _auto_foreground(img: np.ndarray, r: float, sp: np.ndarray, threshold: float | None, progress=None):
    """Background-subtracted, smoothed image and its Otsu (or given) threshold."""
    from skimage.filters import threshold_otsu

    report(progress, 0, 4, "foreground")
    sm = _smooth(img, r, sp)
    report(progress, 1, 4, "foreground")
    top = sm - _background(sm, r, sp, _sub_progress(progress, 250, 750))
    report(progress, 3, 4, "foreground")
    if PARAMS["gamma"] != 1.0:
        top = np.maximum(top, 0) ** PARAMS["gamma"]
    if threshold is None:
        scale = PARAMS["threshold_scale_3d"] if img.ndim == 3 else PARAMS["threshold_scale"]
        threshold = float(threshold_otsu(top.ravel())) * scale if np.ptp(top) > 0 else float("inf")
    return top, float(threshold)


def _segment_block(img, sp, r, threshold, scrib, model, progress, refine_radius=False, auto_wrong=False):
    """Segment one block; return (labels, threshold used, radius used).

    ``auto_wrong``: the automatic objects are not the user's (see :func:`_strokes_disagree`),
    so the boundary class, taught from their edges, is left out of the watershed.

    ``progress`` gets ``(done, 1000, message)`` (see :func:`_sub_progress`).
    """
    a, b = (150, 700) if scrib is not None else (250, 250)  # progress: foreground, classifier
    top, thr = _auto_foreground(
        img, r, sp, threshold if scrib is None else None, _sub_progress(progress, 0, a)
    )
    fg = top > thr
    boundary = None
    if scrib is not None:
        prob_obj, boundary = _scribble_probabilities(
            img, fg, scrib, sp, r, model, _sub_progress(progress, a, b)
        )
        if threshold is not None:
            thr = float(threshold)
        else:
            # 0.5, or Otsu's threshold on the probability map where that is clearly lower:
            # thin or rare objects (ribs in a CT) get low object probabilities from a
            # forest that sees mostly background. Not where it is only a little lower:
            # on dense nuclei that merges neighbours (3D dev volume: 0.60 at 0.5, 0.55 at
            # Otsu's 0.47).
            from skimage.filters import threshold_otsu

            otsu = float(threshold_otsu(prob_obj.ravel())) if np.ptp(prob_obj) > 0 else 0.5
            thr = otsu if otsu < PARAMS["low_probability"] else 0.5
        fg = prob_obj > thr
        if refine_radius and fg.any():
            # The scribble-taught foreground says more about object size than the
            # automatic first pass (which may have found, e.g., the whole body in a CT).
            m, r_eq = _component_radii(fg, sp)
            ok = m >= 1.5 * sp.min()
            if ok.any():
                r = float(np.median(np.minimum(r_eq, 2 * m)[ok]))
    report(progress, b, 1000, "separating objects")
    if auto_wrong:
        boundary = None  # measured on the sample CT: bones F1@0.5 0.34 with it, 0.47 without
    labels = _instances(
        fg, r, sp, boundary=boundary, intensity=top if scrib is None else None,
        progress=_sub_progress(progress, b, 970),
    )  # fmt: skip
    labels = _fill_holes_per_label(labels, _sub_progress(progress, 970, 1000))
    return labels, thr, r


def _scribble_probabilities(img, auto_fg, scrib, sp, r, model, progress):
    """Random forest on pixel features: P(object) and P(boundary) everywhere.

    Training pixels: every scribbled pixel (1 -> background, >=2 -> object interior),
    plus a pseudo-labelled subsample of the automatic result (interior, a ring on object
    edges labelled "boundary", and background) taken only away from scribbles, with
    automatic objects that contain a background stroke dropped. Scribbled pixels are
    weighted so that they carry as much weight as all pseudo-labels together.
    """
    from sklearn.ensemble import RandomForestClassifier

    sigmas = [r * f for f in (0.125, 0.25, 0.5, 1.0, 2.0)]
    sigmas = [max(s, 0.5 * sp.min()) for s in sigmas]
    feats = filter_bank(img[None], sigmas, sp, progress=_sub_progress(progress, 0, 400))
    if model is not None:
        from napari_mae.features import model_features
        from napari_mae.models.mae import load_model

        m = load_model(model) if not hasattr(model, "encoder_features") else model
        # Show the model objects at a size where one patch spans about one diameter (one
        # token per object), and at half that (context); never upsampled. One patch per
        # radius cost 4x more with no gain (DSB quarter: 0.717 vs 0.718).
        patch = float(np.min(np.atleast_1d(m.config.patch_size)))
        zoom = float(np.clip(0.5 * patch / float(np.min(r / sp)), 0.25, 1.0))
        mf = model_features(
            img[None],
            m,
            scales=(zoom, zoom / 2),
            n_components=_MODEL_COMPONENTS,
            progress=_sub_progress(progress, 400, 500),
        )
        feats = np.concatenate([feats, mf], axis=-1)

    # Pseudo-labels from the automatic segmentation.
    auto = _instances(auto_fg, r, sp, progress=_sub_progress(progress, 500, 650))
    bad = np.unique(auto[scrib == 1])
    bad = bad[bad > 0]
    if auto.max():
        # Automatic objects whose mean intensity is nearer the background strokes' than
        # the object strokes' are not what the user means by "object" (in a CT, the
        # automatic first pass finds the body, the user means bone): no pseudo-label.
        med_obj = float(np.median(img[scrib >= 2]))
        med_bg = float(np.median(img[scrib == 1]))
        means = np.asarray(ndi.mean(img, auto, np.arange(1, auto.max() + 1)))
        unlike = np.flatnonzero(np.abs(means - med_obj) > np.abs(means - med_bg)) + 1
        bad = np.union1d(bad, unlike)
    ring_w = max(1, int(round(0.2 * r / sp.min())))
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(auto, mode="inner")
    edges = ndi.binary_dilation(edges, iterations=max(1, ring_w // 2)) & (auto > 0)
    target = np.full(img.shape, -1, np.int8)
    target[auto == 0] = 0
    target[auto > 0] = 2
    target[edges] = 1
    if bad.size:
        # Automatic objects that a background stroke crosses are wrong: no pseudo-label.
        target[np.isin(auto, bad)] = -1
    near = ndi.binary_dilation(scrib > 0, iterations=max(1, int(round(0.5 * r / sp.min()))))
    target[near] = -1
    rng = np.random.default_rng(0)
    pseudo = np.flatnonzero(target.ravel() >= 0)
    n_pseudo = int(np.clip(_PSEUDO_FRACTION * img.size, *_PSEUDO_RANGE))
    if pseudo.size > n_pseudo:
        pseudo = rng.choice(pseudo, n_pseudo, replace=False)
    s_idx = np.flatnonzero(scrib.ravel() > 0)
    s_lab = np.where(scrib.ravel()[s_idx] == 1, 0, 2)
    if s_idx.size > _MAX_SCRIBBLED:
        keep = rng.choice(s_idx.size, _MAX_SCRIBBLED, replace=False)
        s_idx, s_lab = s_idx[keep], s_lab[keep]
    idx = np.concatenate([pseudo, s_idx])
    y = np.concatenate([target.ravel()[pseudo], s_lab])
    # Object and background strokes carry half the pseudo-labels' weight each, whatever
    # their lengths (a few short strokes in thin objects against long background strokes
    # would otherwise teach the forest that almost everything is background).
    n_obj = max(1, int(np.count_nonzero(s_lab == 2)))
    n_bg = max(1, s_idx.size - n_obj)
    w_s = np.where(s_lab == 2, max(1.0, 0.5 * pseudo.size / n_obj), max(1.0, 0.5 * pseudo.size / n_bg))
    w = np.concatenate([np.ones(pseudo.size), w_s])
    flat = feats.reshape(-1, feats.shape[-1])
    # A few thousand rows: one thread (joblib's thread pool polls every 10 ms, which cost
    # more than the trees) and one fit (~0.1-0.3 s, short enough between two chances to stop).
    report(progress, 650, 1000, "fitting the classifier")
    clf = RandomForestClassifier(
        n_estimators=_N_TREES, max_depth=10, min_samples_leaf=2, n_jobs=1, random_state=0
    ).fit(flat[idx], y, sample_weight=w)
    classes = list(clf.classes_)
    if flat.shape[0] > _PARALLEL_ROWS:
        clf.set_params(n_jobs=-1)
    proba = np.zeros((flat.shape[0], 3), np.float32)
    chunk = _PREDICT_ROWS
    for st in range(0, flat.shape[0], chunk):
        report(progress, 750 + 250 * st // flat.shape[0], 1000, "predicting")
        p = clf.predict_proba(flat[st : st + chunk])
        for j, c in enumerate(classes):
            proba[st : st + chunk, c] = p[:, j]
    proba = proba.reshape(img.shape + (3,))
    p_obj = proba[..., 1] + proba[..., 2]
    p_bnd = proba[..., 1]
    return p_obj, p_bnd


# --------------------------------------------------------------------------- tiling


def _tile_slices(shape, core, margin):
    for starts in itertools.product(*[range(0, n, c) for n, c in zip(shape, core)]):
        outer, inner_core, dst = [], [], []
        for st, c, m, n in zip(starts, core, margin, shape):
            stop = min(st + c, n)
            o0, o1 = max(st - m, 0), min(stop + m, n)
            outer.append(slice(o0, o1))
            inner_core.append((st - o0, stop - o0))
            dst.append(slice(o0, o1))
        yield tuple(outer), inner_core


def _tile_margin(r_px) -> list[int]:
    """Overlap on each side of a tile core: 6 object radii (+2) per axis, in pixels."""
    return [int(math.ceil(6 * rp)) + 2 for rp in r_px]


def _auto_tile_core(shape, r_px, *, scribbles: bool = False) -> list[int]:
    """Automatic tile core (pixels per axis) for objects of ``r_px`` pixels radius.

    The number of tiles per axis that processes the fewest voxels in all (cores plus
    their 6-radius margins, which are processed twice) with every tile (core + margins)
    at most ``_TILE_VOXELS`` voxels (half that with scribbles, whose features take ~150
    bytes a voxel); cores are equal and divide each axis, so there is no sliver tile at
    the far end. (Fixed-size cubes spent most of the time on overlap: on a
    200 x 1024 x 1024 volume, 72 tiles processed 2.9x the volume; this choice, 1.6x.)
    """
    budget = _TILE_VOXELS if not scribbles else _TILE_VOXELS // 2
    margin = _tile_margin(r_px)
    # Candidate tile counts per axis (1 .. enough for cores of ~16 pixels), all combinations.
    cands = [np.arange(1, max(1, min(n // 16, 256)) + 1) for n in shape]
    cores = [-(-n // t) for n, t in zip(shape, cands)]
    outers = [
        np.where(t == 1, n, np.minimum(n, c + 2 * m)) for n, t, c, m in zip(shape, cands, cores, margin)
    ]
    grids = np.meshgrid(*[o.astype(float) for o in outers], indexing="ij", sparse=True)
    counts = np.meshgrid(*[t.astype(float) for t in cands], indexing="ij", sparse=True)
    tile_vox = np.prod(np.broadcast_arrays(*grids), axis=0)
    work = tile_vox * np.prod(np.broadcast_arrays(*counts), axis=0)
    work[tile_vox > budget] = np.inf
    if not np.isfinite(work).any():  # margins alone exceed the budget: the smallest tiles
        work = tile_vox
    best = np.unravel_index(int(np.argmin(work)), work.shape)
    return [int(c[i]) for c, i in zip(cores, best)]


def _segment_tiled(img, sp, r, threshold, scrib, model, progress, tile_shape=None, *, auto_wrong=False):
    """Tile-wise segmentation with global parameters, stitched by object centres.

    The automatic threshold is estimated once on the whole (background-subtracted) image,
    so every tile cuts at the same level, tiles without both kinds of strokes included.
    Tiles with strokes follow the untiled scribble rules (``auto_wrong`` as decided on the
    whole image). Tiles overlap by 3 object diameters; an object is kept from the tile
    whose core holds its centroid, and written only where the output is still empty, so
    an object cut by a core border is taken whole from one tile.

    Returns ``(labels, threshold, n_tiles, tile_thresholds)``: the threshold is the
    global one where every tile used it, else the median of the scribble tiles' (each
    tile's in ``tile_thresholds``; it used to be the last tile's).
    """
    ndim = img.ndim
    r_px = r / sp
    margin = _tile_margin(r_px)
    if tile_shape is None:
        core = _auto_tile_core(img.shape, r_px, scribbles=scrib is not None)
    else:
        core = [max(min(n, int(t)), 1) for n, t in zip(img.shape, tile_shape)]
    auto_threshold = threshold
    if threshold is None:
        # Global Otsu on a strided copy of the background-subtracted image (also for the
        # tiles of a scribble run that hold no strokes).
        step = max(1, int(round((img.size / 4e6) ** (1.0 / ndim))))
        sub = img[(slice(None, None, step),) * ndim]
        top, auto_threshold = _auto_foreground(sub, r, sp * step, None)
        del top, sub
    out = np.zeros(img.shape, np.uint32)
    tiles = list(_tile_slices(img.shape, core, margin))
    next_id = 1
    tile_thresholds: list[float] = []
    scribble_thresholds: list[float] = []
    for k, (outer, inner) in enumerate(tiles):
        report(progress, k, len(tiles), "segmenting tiles")
        tile_progress = _sub_progress(progress, k, k + 1, len(tiles))
        s_t = None if scrib is None else scrib[outer]
        if s_t is not None and not ((s_t == 1).any() and (s_t >= 2).any()):
            s_t = None  # a tile without both kinds of strokes falls back to the automatic rule
        lab, thr_used, _ = _segment_block(
            img[outer], sp, r, threshold if s_t is not None else auto_threshold, s_t, model, tile_progress,
            auto_wrong=auto_wrong and s_t is not None,
        )  # fmt: skip
        tile_thresholds.append(float(thr_used))
        if s_t is not None:
            scribble_thresholds.append(float(thr_used))
        if lab.max() == 0:
            continue
        n = int(lab.max())
        com = ndi.center_of_mass(np.ones(lab.shape), lab, np.arange(1, n + 1))
        boxes = ndi.find_objects(lab)
        region = out[outer]  # a view: writes go to ``out``
        for i, (c, box) in enumerate(zip(com, boxes), start=1):
            if box is None or not all(lo <= ci < hi for ci, (lo, hi) in zip(c, inner)):
                continue
            obj = (lab[box] == i) & (region[box] == 0)
            if obj.any():
                region[box][obj] = next_id
                next_id += 1
    report(progress, len(tiles), len(tiles), "segmenting tiles")
    thr = float(np.median(scribble_thresholds)) if scribble_thresholds else float(auto_threshold)
    return _relabel(out), thr, len(tiles), tuple(tile_thresholds)
