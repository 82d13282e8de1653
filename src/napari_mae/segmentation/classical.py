"""The classical pipeline: adaptive instance segmentation without a trained network.

Every length derives from an object radius estimated per image in physical units
(:mod:`~napari_mae.segmentation.scale`), so that object size, brightness and density may
change from one image to the next. On the prepared image (one channel, bright objects:
:mod:`~napari_mae.segmentation.prepare`):

1. **Foreground**: without scribbles, white top-hat background subtraction with a box of
   3 radii (the largest single gain measured on the dev data: it repairs the skewed
   histograms of dense images on which Otsu alone marks half the image), then Otsu scaled
   by 0.7 (2D) / 0.85 (3D), which keeps dim objects beside bright ones.
   With scribbles (0 = unlabelled, 1 = background, 2.. = objects), a random forest on
   :func:`~napari_mae.segmentation.features.filter_bank` (+ MAE features if a model is
   given) predicts background / object-boundary / object-interior; the boundary class is
   taught from the edges of the automatic objects that the scribbles confirm, and the
   automatic result fills in pseudo-labels far from any scribble (scribbles override
   them). Object and background strokes weigh the same whatever their lengths; the
   probability is cut at 0.5, or at its Otsu threshold where that is well below 0.5 (thin,
   rare objects). Where the object strokes are far shorter than the automatic radius and
   lie in automatic objects that background strokes cross too (a CT: the body found, the
   bones meant), the radius is taken from the strokes and the boundary term is left out.
2. **Working resolution**: where the radius spans more than 8 pixels along an axis, the
   steps run on a shrunk copy (:func:`~napari_mae.segmentation.scale.working_shape`): every
   length is relative to the radius, so the full grid of a 40-pixel nucleus adds cost
   (4x-25x in the DSB images), not accuracy.
3. **Instances**: seeded watershed of the spacing-aware distance transform (combined with
   the boundary probability when there is one; :mod:`~napari_mae.segmentation.watershed`).
4. **Large inputs** run tile by tile (:mod:`~napari_mae.segmentation.tiling`) with an
   overlap of several object diameters, with the global parameters (normalisation,
   polarity, radius, threshold) estimated once; an object belongs to the tile whose core
   holds its centre, so objects cut by tile borders get one label.

:func:`segment_classical` runs these steps; :func:`napari_mae.segmentation.segment_instances`
is the entry point that prepares the image and estimates the radius first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from napari_mae._progress import ProgressCallback, report, sub_progress
from napari_mae.segmentation.features import filter_bank
from napari_mae.segmentation.params import DEFAULT_PARAMS, SegmentationParams
from napari_mae.segmentation.scale import (
    component_radii,
    downsample,
    downsample_scribbles,
    upsample_labels,
    working_shape,
)
from napari_mae.segmentation.tiling import BLOCK_VOXELS, auto_tile_core, tile_margin, tile_slices
from napari_mae.segmentation.watershed import distance_watershed, fill_holes_per_label, relabel

__all__ = ["segment_classical"]

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


def _strokes_disagree(
    img: np.ndarray,
    scribbles: np.ndarray,
    r: float,
    spacing: np.ndarray,
    params: SegmentationParams = DEFAULT_PARAMS,
) -> bool:
    """Whether most object-stroke pixels lie in automatic objects (connected components of
    the automatic foreground at radius ``r``) that background strokes cross as well."""
    top, thr = _auto_foreground(img, r, spacing, None, params=params)
    comp, _ = ndi.label(top > thr)
    in_bg = np.unique(comp[scribbles == 1])
    obj = comp[scribbles >= 2]
    return bool(np.mean(np.isin(obj, in_bg[in_bg > 0])) >= 0.5)


def _box_size(r: float, factor: float, spacing: np.ndarray, shape) -> tuple[int, ...]:
    return tuple(int(min(n, max(3, 2 * round(factor * r / s) + 1))) for s, n in zip(spacing, shape))


def _background(
    img: np.ndarray,
    r: float,
    spacing: np.ndarray,
    progress=None,
    *,
    params: SegmentationParams = DEFAULT_PARAMS,
) -> np.ndarray:
    """Grey opening with a box of ``2 * params.background`` (3) object radii: the
    background under the objects.

    scipy's flat rectangular min/max filters are separable and cost O(1) per pixel
    whatever the box size (skimage's white_tophat with a disk of radius 2.5 r does not
    scale to 40-pixel nuclei); the box rather than the disk changes the estimate little
    for a background that varies slowly.
    """
    size = _box_size(r, params.background, spacing, img.shape)
    # ndi.grey_opening is exactly this pair; split so that a caller may stop between.
    low = ndi.grey_erosion(img, size=size)
    report(progress, 1, 2, "background")
    return ndi.grey_dilation(low, size=size)


def _smooth(
    img: np.ndarray, r: float, spacing: np.ndarray, params: SegmentationParams = DEFAULT_PARAMS
) -> np.ndarray:
    sig = np.maximum(params.smooth * r / spacing, 0.5)
    return ndi.gaussian_filter(img, sig)


def _auto_foreground(
    img: np.ndarray,
    r: float,
    sp: np.ndarray,
    threshold: float | None,
    progress=None,
    *,
    params: SegmentationParams = DEFAULT_PARAMS,
):
    """Background-subtracted, smoothed image and its Otsu (or given) threshold."""
    from skimage.filters import threshold_otsu

    report(progress, 0, 4, "foreground")
    sm = _smooth(img, r, sp, params)
    report(progress, 1, 4, "foreground")
    top = sm - _background(sm, r, sp, sub_progress(progress, 250, 750), params=params)
    report(progress, 3, 4, "foreground")
    if params.gamma != 1.0:
        top = np.maximum(top, 0) ** params.gamma
    if threshold is None:
        scale = params.threshold_scale_3d if img.ndim == 3 else params.threshold_scale
        threshold = float(threshold_otsu(top.ravel())) * scale if np.ptp(top) > 0 else float("inf")
        if np.isfinite(threshold) and _thin_fraction(top > threshold, r, sp) > params.thin_foreground:
            # A bright thin structure above everything else took Otsu's upper class:
            # separate the objects from the background among the pixels below it.
            below = top[top < threshold]
            if below.size and np.ptp(below) > 0:
                threshold = float(threshold_otsu(below)) * scale
    return top, float(threshold)


def _thin_fraction(mask: np.ndarray, r: float, sp: np.ndarray) -> float:
    """Fraction of ``mask``'s volume in components whose distance maximum is under ``r / 2``."""
    max_distance, r_eq = component_radii(mask, np.asarray(sp, dtype=float))
    if not max_distance.size:
        return 0.0
    volume = r_eq**mask.ndim
    return float(volume[max_distance < 0.5 * float(np.mean(r))].sum() / volume.sum())


def _segment_block(
    img, sp, r, threshold, scrib, model, progress, refine_radius=False, auto_wrong=False,
    *, params: SegmentationParams = DEFAULT_PARAMS,
):  # fmt: skip
    """Segment one block; return (labels, threshold used, radius used).

    ``auto_wrong``: the automatic objects are not the user's (see :func:`_strokes_disagree`),
    so the boundary class, taught from their edges, is left out of the watershed.

    ``progress`` gets ``(done, 1000, message)`` (see :func:`napari_mae._progress.sub_progress`).
    """
    a, b = (150, 700) if scrib is not None else (250, 250)  # progress: foreground, classifier
    top, thr = _auto_foreground(
        img, r, sp, threshold if scrib is None else None, sub_progress(progress, 0, a), params=params
    )
    fg = top > thr
    boundary = None
    if scrib is not None:
        prob_obj, boundary = _scribble_probabilities(
            img, fg, scrib, sp, r, model, sub_progress(progress, a, b), params=params
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
            thr = otsu if otsu < params.low_probability else 0.5
        fg = prob_obj > thr
        if refine_radius and fg.any():
            # The scribble-taught foreground says more about object size than the
            # automatic first pass (which may have found, e.g., the whole body in a CT).
            m, r_eq = component_radii(fg, sp)
            ok = m >= 1.5 * sp.min()
            if ok.any():
                r = float(np.median(np.minimum(r_eq, 2 * m)[ok]))
    report(progress, b, 1000, "separating objects")
    if auto_wrong:
        boundary = None  # measured on the sample CT: bones F1@0.5 0.34 with it, 0.47 without
    labels = distance_watershed(
        fg, r, sp, boundary=boundary, intensity=top if scrib is None else None, params=params,
        progress=sub_progress(progress, b, 970),
    )  # fmt: skip
    labels = fill_holes_per_label(labels, sub_progress(progress, 970, 1000))
    return labels, thr, r


def _scribble_probabilities(img, auto_fg, scrib, sp, r, model, progress, *, params=DEFAULT_PARAMS):
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
    feats = filter_bank(img[None], sigmas, sp, progress=sub_progress(progress, 0, 400))
    if model is not None:
        from napari_mae.models.mae import load_model
        from napari_mae.segmentation.features import model_features

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
            progress=sub_progress(progress, 400, 500),
        )
        feats = np.concatenate([feats, mf], axis=-1)

    # Pseudo-labels from the automatic segmentation.
    auto = distance_watershed(auto_fg, r, sp, params=params, progress=sub_progress(progress, 500, 650))
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


def _segment_tiled(
    img, sp, r, threshold, scrib, model, progress, tile_shape=None, *, auto_wrong=False,
    params: SegmentationParams = DEFAULT_PARAMS,
):  # fmt: skip
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
    margin = tile_margin(r_px)
    if tile_shape is None:
        core = auto_tile_core(img.shape, r_px, scribbles=scrib is not None)
    else:
        core = [max(min(n, int(t)), 1) for n, t in zip(img.shape, tile_shape)]
    auto_threshold = threshold
    if threshold is None:
        # Global Otsu on a strided copy of the background-subtracted image (also for the
        # tiles of a scribble run that hold no strokes).
        step = max(1, int(round((img.size / 4e6) ** (1.0 / ndim))))
        sub = img[(slice(None, None, step),) * ndim]
        top, auto_threshold = _auto_foreground(sub, r, sp * step, None, params=params)
        del top, sub
    out = np.zeros(img.shape, np.uint32)
    tiles = list(tile_slices(img.shape, core, margin))
    next_id = 1
    tile_thresholds: list[float] = []
    scribble_thresholds: list[float] = []
    for k, (outer, inner, _) in enumerate(tiles):
        report(progress, k, len(tiles), "segmenting tiles")
        tile_progress = sub_progress(progress, k, k + 1, len(tiles))
        s_t = None if scrib is None else scrib[outer]
        if s_t is not None and not ((s_t == 1).any() and (s_t >= 2).any()):
            s_t = None  # a tile without both kinds of strokes falls back to the automatic rule
        lab, thr_used, _ = _segment_block(
            img[outer], sp, r, threshold if s_t is not None else auto_threshold, s_t, model, tile_progress,
            auto_wrong=auto_wrong and s_t is not None, params=params,
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
            if box is None or not all(sl.start <= ci < sl.stop for ci, sl in zip(c, inner)):
                continue
            obj = (lab[box] == i) & (region[box] == 0)
            if obj.any():
                region[box][obj] = next_id
                next_id += 1
    report(progress, len(tiles), len(tiles), "segmenting tiles")
    thr = float(np.median(scribble_thresholds)) if scribble_thresholds else float(auto_threshold)
    return relabel(out), thr, len(tiles), tuple(tile_thresholds)


def segment_classical(
    img: np.ndarray,
    spacing: np.ndarray,
    radius: float,
    *,
    scribbles: np.ndarray | None = None,
    model=None,
    estimated_radius: bool = True,
    threshold: float | None = None,
    tile_shape: Sequence[int] | None = None,
    params: SegmentationParams = DEFAULT_PARAMS,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict]:
    """Labels of a prepared image by the classical pipeline.

    Parameters
    ----------
    img : ndarray of float32, shape ``([Z,] Y, X)``
        One channel, normalised to about [0, 1], bright objects
        (:func:`napari_mae.segmentation.prepare.prepare_image`).
    spacing : ndarray of float, shape ``(img.ndim,)``
        Physical pixel size per axis.
    radius : float
        Object radius, physical units.
    scribbles : ndarray of int64 or None, shape ``img.shape``
        Checked strokes (0 unlabelled, 1 background, 2.. objects, both kinds present).
    model : MaskedAutoencoder, str or None
        MAE whose encoder features join the scribble classifier.
    estimated_radius : bool
        Whether ``radius`` was estimated (then the strokes and the scribble-taught
        foreground may replace it) rather than given.
    threshold : float or None
        As :func:`napari_mae.segmentation.segment_instances`.
    tile_shape : sequence of int or None
        Core tile shape in pixels of ``img``; None: automatic above ``BLOCK_VOXELS``.
    params : SegmentationParams
    progress : callable or None
        ``progress(done, 100, message)`` from 19 to 100.

    Returns
    -------
    labels : ndarray of uint32, shape ``img.shape``
        Consecutive labels.
    info : dict
        ``threshold``, ``working_shape``, ``tiles``, and where they apply
        ``tile_thresholds``, ``radius_strokes``, ``radius_image``, ``radius_auto`` with
        the ``radius``/``radius_px`` that replaced the given one.

    Raises
    ------
    ValueError
        If ``tile_shape`` does not have one value per axis.
    """
    sp = np.asarray(spacing, float)
    r = float(radius)
    scrib = scribbles
    ndim = img.ndim
    info: dict = {"tiles": 1}
    auto_wrong = False  # the automatic objects are not the user's (see _strokes_disagree)
    if scrib is not None and estimated_radius:
        # Object strokes much shorter than the automatic diameter, *and* the automatic
        # objects that hold them hold background strokes too: the image-wide estimate
        # found other things than the user's objects (a CT's body, not its bones); take
        # the strokes' size. Short strokes in objects the automatic pass got right (a
        # click-sized stroke in a nucleus) leave the estimate alone.
        r_strokes = _stroke_radius(scrib, sp)
        info["radius_strokes"] = r_strokes
        # The same rule for tiled and untiled inputs (it was skipped above BLOCK_VOXELS).
        if 0 < r_strokes < 0.5 * r and _strokes_disagree(img, scrib, r, sp, params):
            auto_wrong = True
            info.update(radius_image=r)
            r = max(r_strokes, sp.min())
            info.update(radius=r, radius_px=tuple(r / s for s in sp))

    if tile_shape is not None and len(tile_shape) != ndim:
        raise ValueError(f"tile_shape must have {ndim} values, got {tuple(tile_shape)}")
    full_shape = img.shape
    full_sp = sp
    work_shape = working_shape(full_shape, r, sp, params=params)
    info["working_shape"] = work_shape
    if work_shape != full_shape:
        report(progress, 19, 100, "resampling")
        sp = sp * np.asarray(full_shape) / np.asarray(work_shape)
        img = downsample(img, work_shape)
        scrib = None if scrib is None else downsample_scribbles(scrib, work_shape)
        if tile_shape is not None:
            tile_shape = [
                max(1, int(round(t * w / n))) for t, w, n in zip(tile_shape, work_shape, full_shape)
            ]
    seg_progress = sub_progress(progress, 20, 97, 100)
    if img.size > BLOCK_VOXELS or tile_shape is not None:
        labels, thr, info["tiles"], info["tile_thresholds"] = _segment_tiled(
            img, sp, r, threshold, scrib, model, seg_progress, tile_shape, auto_wrong=auto_wrong,
            params=params,
        )  # fmt: skip
    else:
        labels, thr, r_used = _segment_block(
            img, sp, r, threshold, scrib, model, seg_progress, estimated_radius,
            auto_wrong=auto_wrong, params=params,
        )  # fmt: skip
        if r_used != r:
            info.update(radius_auto=r, radius=r_used, radius_px=tuple(r_used / s for s in full_sp))
    if labels.shape != full_shape:
        report(progress, 97, 100, "resampling")
        labels = upsample_labels(labels, full_shape)
    info["threshold"] = float(thr)
    return labels, info
