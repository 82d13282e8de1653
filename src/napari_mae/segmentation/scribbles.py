"""Scribbles simulated from ground-truth labels, as a user would draw them.

Used by the segmentation benchmark (``benchmarks/bench_segmentation.py``) and the demo
(:mod:`napari_mae.demo`), so that both score the same scribbles on the same images.
Also :func:`ct_bone_labels`, the vertebra and rib instances of a TotalSegmentator class map,
and :func:`check_scribbles`, the one check of a user's scribbles for segmentation
(:func:`~napari_mae.segmentation.segment.segment_instances`) and fine-tuning
(:func:`~napari_mae.segmentation.finetune.check_finetune_inputs`), with
:func:`intensity_like`, the one rule that tells an intensity image from labels (scribbles,
corrected objects, the label images ``napari-mae evaluate`` scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "INTENSITY_MIN_VALUES",
    "INTENSITY_REGIONS_PER_VALUE",
    "MAX_STROKE_IDS",
    "check_scribbles",
    "check_stroke_classes",
    "ct_bone_labels",
    "intensity_like",
    "simulate_scribbles",
]


def simulate_scribbles(
    gt: np.ndarray,
    *,
    n_objects: int = 5,
    n_background: int = 5,
    seed: int = 0,
    max_fraction: float = 0.02,
    background_where: np.ndarray | None = None,
) -> np.ndarray:
    """Short strokes inside about ``n_objects`` objects (label 2) and in the background (1).

    Each object stroke is a straight line through the object's innermost pixel along a
    random direction, clipped to the object shrunk by one pixel (3D: in that pixel's Z
    plane). Background strokes are lines of about two object diameters at random
    background places at least 2 pixels from any object, clipped to the background. The
    total is capped at ``max_fraction`` of the pixels (strokes are dropped from the end).
    ``background_where`` (bool, ``gt.shape``) restricts where background strokes start
    (CT: inside the body, as a user would scribble soft tissue rather than air).

    Parameters
    ----------
    gt : ndarray of int, shape ``([Z,] Y, X)``
        Instance ground truth.

    Returns
    -------
    ndarray of uint8, shape ``gt.shape``
    """
    from skimage.draw import line

    rng = np.random.default_rng(seed)
    out = np.zeros(gt.shape, np.uint8)
    ids = np.unique(gt)
    ids = ids[ids > 0]
    if ids.size == 0:
        return out
    sizes = ndi.sum(np.ones(gt.shape), gt, ids)
    big = ids[sizes >= np.median(sizes) * 0.5]
    chosen = rng.choice(big, size=min(n_objects, big.size), replace=False)
    diam = (
        2 * np.sqrt(np.median(sizes) / np.pi)
        if gt.ndim == 2
        else 2 * np.cbrt(np.median(sizes) * 3 / 4 / np.pi)
    )
    strokes = []
    slices = ndi.find_objects(gt)
    for obj in chosen:
        sl = slices[obj - 1]
        sub = ndi.binary_erosion(gt[sl] == obj)
        if ndi.distance_transform_edt(sub).max() < 2:  # thin object (a rib): no erosion
            sub = gt[sl] == obj
        dist = ndi.distance_transform_edt(sub)
        c = np.unravel_index(np.argmax(dist), sub.shape)
        plane = sub[c[0]] if gt.ndim == 3 else sub
        cy, cx = c[-2:]
        theta = rng.uniform(0, np.pi)
        half = max(1.0, dist.max() * 1.5)
        y0, x0 = cy - half * np.sin(theta), cx - half * np.cos(theta)
        y1, x1 = cy + half * np.sin(theta), cx + half * np.cos(theta)
        rr, cc = line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
        keep = (rr >= 0) & (rr < plane.shape[0]) & (cc >= 0) & (cc < plane.shape[1])
        rr, cc = rr[keep], cc[keep]
        keep = plane[rr, cc]
        rr, cc = rr[keep] + sl[-2].start, cc[keep] + sl[-1].start
        idx = (np.full(rr.shape, c[0] + sl[0].start), rr, cc) if gt.ndim == 3 else (rr, cc)
        strokes.append((idx, 2))
    bg_ok = ~ndi.binary_dilation(gt > 0, iterations=2)
    cand = np.flatnonzero(bg_ok if background_where is None else bg_ok & background_where)
    for _ in range(n_background if cand.size else 0):
        p = np.unravel_index(rng.choice(cand), gt.shape)
        theta = rng.uniform(0, np.pi)
        half = diam
        cy, cx = p[-2:]
        rr, cc = line(
            int(round(cy - half * np.sin(theta))),
            int(round(cx - half * np.cos(theta))),
            int(round(cy + half * np.sin(theta))),
            int(round(cx + half * np.cos(theta))),
        )
        keep = (rr >= 0) & (rr < gt.shape[-2]) & (cc >= 0) & (cc < gt.shape[-1])
        rr, cc = rr[keep], cc[keep]
        idx = (np.full(rr.shape, p[0]), rr, cc) if gt.ndim == 3 else (rr, cc)
        keep = bg_ok[idx]
        idx = tuple(i[keep] for i in idx)
        strokes.append((idx, 1))
    budget = int(max_fraction * gt.size)
    for idx, value in strokes:
        if np.count_nonzero(out) + idx[0].size > budget:
            continue
        out[idx] = value
    return out


def ct_bone_labels(class_labels: np.ndarray, class_map: dict[str, str] | str | Path) -> np.ndarray:
    """Keep the vertebra and rib ids of a TotalSegmentator ``total`` class map.

    Parameters
    ----------
    class_labels : ndarray of int, shape (Z, Y, X)
        TotalSegmentator class ids.
    class_map : dict or path
        ``{"id": "name"}`` (the ``total`` entry of ``class_map.json``) or the path of a
        JSON file holding it (either the dict itself or ``{"total": {...}}``).

    Returns
    -------
    ndarray of int32, same shape
        The ids named ``vertebrae_*`` or ``rib_*`` kept (each bone its own instance),
        everything else 0.
    """
    if not isinstance(class_map, dict):
        class_map = json.loads(Path(class_map).read_text())
        class_map = class_map.get("total", class_map)
    bone_ids = [int(k) for k, v in class_map.items() if str(v).startswith(("vertebrae_", "rib_"))]
    return np.where(np.isin(class_labels, bone_ids), class_labels, 0).astype(np.int32)


#: More distinct values than this, on a mostly painted array, may be an intensity image, not strokes.
MAX_STROKE_IDS = 32

#: Labels with at most this many distinct non-zero values are never taken for an intensity image
#: (a binary or few-class mask may be in many pieces).
INTENSITY_MIN_VALUES = 8

#: More separate regions per distinct value than this, on average, is an intensity image.
#: Measured on ../shared/data: every label image there has at most 1.4 regions per id (a
#: TotalSegmentator class map; DSB 2018 instance labels 1.0-1.01), every intensity image there
#: at least 44 (DSB 2018 dev), 45 (DSB 2018 train), 168 (3D microscopy, CT, MR).
INTENSITY_REGIONS_PER_VALUE = 10


def intensity_like(labels) -> str | None:
    """Whether an integer array looks like an intensity image rather than labels; why if so.

    Labels paint each id as one region (an object, a class's few pieces); an intensity image
    repeats each grey level in many separate places (noise, every object's rim). The rule:
    more than :data:`INTENSITY_MIN_VALUES` distinct non-zero values, each in more than
    :data:`INTENSITY_REGIONS_PER_VALUE` separate regions on average (regions of equal value
    connected through faces, edges or corners: ``skimage.measure.label`` with full
    connectivity). It does not look at 0 or at how many ids there are: instance labels may
    hold thousands of ids, cover every pixel (dense cells) or none of the background.

    Parameters
    ----------
    labels : ndarray of int or bool, shape ``([Z,] Y, X)``
        Integer ids (0: background, not counted as a value).

    Returns
    -------
    str or None
        None for labels; for an intensity image, a phrase for a message (the numbers of
        values and regions).
    """
    from skimage.measure import label as connected_regions

    a = np.asarray(labels)
    if a.dtype == bool or a.size == 0:
        return None
    values = np.unique(a)
    n_values = int(np.count_nonzero(values))
    if n_values <= INTENSITY_MIN_VALUES:
        return None
    # np.unique above, skimage's connected regions here: one sort and one pass each
    n_regions = int(connected_regions(a, background=0, connectivity=a.ndim).max())
    if n_regions <= INTENSITY_REGIONS_PER_VALUE * n_values:
        return None
    return (
        f"{n_values} distinct values (values {int(values[0])}..{int(values[-1])}) scattered over "
        f"{n_regions} separate regions, {n_regions / n_values:.0f} per value (labels have about one per id)"
    )


def check_scribbles(
    scribbles,
    shape,
    *,
    name: str = "scribbles",
    require_both: bool = True,
) -> np.ndarray:
    """The one check of a scribble array, for segmentation and fine-tuning alike.

    Parameters
    ----------
    scribbles : array-like of int, bool or integer-valued float, shape ``shape``
        0 = unlabelled, 1 = background, 2 and above = object.
    shape : tuple of int
        The image's spatial shape, ``([Z,] Y, X)``.
    name : str
        How the messages name the array (``"scribbles 0"`` for the first of several).
    require_both : bool
        Refuse an array without a background stroke or without an object stroke (False:
        the caller checks that over several arrays, see :func:`check_stroke_classes`).

    Returns
    -------
    ndarray of an integer dtype, shape ``shape``
        The input itself when it is of an integer dtype, uint8 for bool, else int64.

    Raises
    ------
    ValueError
        Another shape than ``shape``; non-integer values (NaN, 0.5); negative values; an
        intensity image given as scribbles (more than half the pixels painted, under a
        tenth of them background (1), with more than :data:`MAX_STROKE_IDS` distinct values
        that :func:`intensity_like` finds scattered: strokes leave most pixels 0 and use a
        few ids, a full annotation paints much of it background and each of its ids is one
        region); with ``require_both``, no background or no object stroke.
    """
    s = np.asarray(scribbles)
    shape = tuple(int(n) for n in shape)
    if s.shape != shape:
        raise ValueError(f"{name} have shape {s.shape}, but the image's spatial shape is {shape}")
    if not (np.issubdtype(s.dtype, np.integer) or s.dtype == bool):
        if not (np.issubdtype(s.dtype, np.floating) and np.all(np.isfinite(s)) and np.all(np.mod(s, 1) == 0)):
            raise ValueError(
                f"{name} must be integer labels (0 unlabelled, 1 background, 2.. objects), not {s.dtype} "
                "values with fractions or NaN"
            )
        s = s.astype(np.int64)
    elif s.dtype == bool:
        s = s.astype(np.uint8)
    if s.size and s.min() < 0:
        raise ValueError(
            f"{name} hold negative values (smallest {int(s.min())}); they must be non-negative "
            "(0 unlabelled, 1 background, 2.. objects)"
        )
    painted = np.count_nonzero(s)
    # A full annotation (background 1 everywhere, one id per object) is mostly painted
    # with many ids too, but its background label holds a large share of the painted
    # pixels; in an intensity image, value 1 is one grey level among many. The gate keeps
    # np.unique and the region count of intensity_like (both a pass over the array) off
    # the usual few-stroke arrays, which are checked on every run.
    if painted > s.size / 2 and np.count_nonzero(s == 1) < 0.1 * painted:
        n_ids = np.unique(s).size
        why = intensity_like(s) if n_ids > MAX_STROKE_IDS else None
        if why is not None:
            raise ValueError(
                f"{name} look like an intensity image, not strokes: {painted / s.size:.0%} of the pixels "
                f"are painted, with {why}; "
                "scribbles are 0 unlabelled, 1 background, 2.. objects (whole objects you corrected go to "
                "the corrected labels: --labels in finetune)"
            )
    if require_both:
        check_stroke_classes(bool((s == 1).any()), bool((s >= 2).any()), name=name)
    return s


def check_stroke_classes(has_background: bool, has_object: bool, *, name: str = "scribbles") -> None:
    """Refuse scribbles without a background stroke or without an object stroke.

    Parameters
    ----------
    has_background, has_object : bool
        Whether any label 1, and any label 2 or above, is painted (over all the arrays of
        a run together).
    name : str
        How the message names the scribbles.

    Raises
    ------
    ValueError
        Naming the missing kind of stroke.
    """
    if has_background and has_object:
        return
    if not has_object and not has_background:
        missing = "object stroke (label >= 2) and no background stroke (label 1)"
        where = "inside an object and one on the background"
    elif not has_object:
        missing, where = "object stroke (label >= 2)", "inside an object"
    else:
        missing, where = "background stroke (label 1)", "on the background"
    raise ValueError(
        f"{name} need both background (label 1) and object (label >= 2) strokes and hold no {missing}: "
        f"paint at least one stroke {where}"
    )
