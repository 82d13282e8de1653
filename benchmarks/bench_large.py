"""Large-data check of :func:`napari_mae.segmentation.segment_instances`: tiles, stitching, memory.

The claim checked: an 8192 x 8192 image and a 200 x 1024 x 1024 volume segment in tiles
with overlap, stitched so that objects cut by tile borders get one label, within 8 GB.

Usage (from the repository root)::

    python benchmarks/bench_large.py                    # all cases, full size (~15-20 min on 2 cores)
    python benchmarks/bench_large.py --scale 0.25       # each side x 0.25 (~1 min)
    python benchmarks/bench_large.py --case 3d --json large.json

Cases (synthetic, seeded, with instance ground truth):

* ``2d``: 8192 x 8192 uint16, bright disks of radius 4-7 px: the full-resolution path
  (5 strips of 8192 x 1639 plus overlap).
* ``3d``: 200 x 1024 x 1024 uint16, balls of radius 4-7 px (24 tiles, cores of
  200 x 256 x 171).
* ``2d-large``: 8192 x 8192, disks of radius 12-20 px: segmented on a working grid shrunk
  about 2x (``info["working_shape"]``, 4096 x 4096, one tile there), and the labels
  brought back to full resolution.

Every case passes ``tile_shape``: the automatic core of ``segment_instances`` for the
nominal radius (``segmentation._auto_tile_core``), so that the tile borders are known
before the radius is estimated (objects placed on them would otherwise miss them).

Objects sit on a jittered grid (75 % of the cells, so some touch and some overlap: an
overlap goes to the object of the smaller normalised distance, a flat interface),
with a per-object brightness of 0.3-1.0 and a brighter middle, over an uneven
background, blurred (PSF sigma 1 px), with shot and read noise (~1500 photons at full
brightness). Besides, objects are placed deliberately along the predicted tile-core
borders (every other grid position, grid objects they would bury left out): single
objects centred on the border or touching pairs whose interface lies within a third of
a radius of it, half each, and one object on every tile corner; the same patterns on
control lines through the middle of the cores are their baseline. Image and ground
truth are drawn slab by slab from the object list, so neither needs more memory than
the case itself.

Each case runs in a fresh (spawned) process. Printed per case:

* wall time of ``segment_instances`` (and s per megapixel / megavoxel);
* the process's peak resident memory (``ru_maxrss``, imports and data included) against
  the target of 8 GB (8e9 bytes), and as a ratio to the input array's size: the peak
  above the post-import (and warm-up) baseline divided by the input bytes (the input
  measured in the same run); below ``--scale 1`` also the full-size peak projected from
  that ratio (an over-estimate: it scales the per-tile buffers too, whose share is
  larger in a small run);
* F1 and accuracy at IoU 0.5 over all objects (one-to-one matching at IoU >= 0.5 as in
  :func:`napari_mae.metrics.match_instances`, counted here slab by slab from a sparse
  contingency table, whose memory does not grow with the volume), and with
  ``match_instances`` itself on up to 4 crops centred
  on tile-core corners (1024 x 1024, 64 x 256 x 256); the first crop also segmented on
  its own, untiled: its score, its time per pixel, and its agreement with the tiled
  result (F1@0.5 between the two label images);
* ground-truth objects crossing a tile-core border against interior ones, and the placed
  patterns on borders against the same on the control lines (the baselines): matched at
  IoU 0.5; "one label": exactly one predicted label covers >= 10 % of the object while
  lying mostly (>= 50 %) inside it (a piece); "split": two or more pieces; "merged": no
  piece, but labels that lie mostly elsewhere cover it; "missed": no label covers 10 %;
* predicted fragments smaller than a quarter of the smallest object (each tile drops
  those, so they come from stitching or resampling), and how many touch a core border.

Below ``--scale 1`` the tile core shrinks with the image (``tile_shape`` = the core above
x scale, at least 64 px), so that the small run still has many tiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

GB = 1e9
TARGET_BYTES = 8 * GB
OCCUPANCY = 0.75  # fraction of grid cells holding an object
JITTER = 0.22  # centre jitter, fraction of the grid pitch
SPLIT_FRACTION = 0.1  # a predicted label "covers" a GT object when it holds this share of it
N_CROPS = 4

CASES = {
    "2d": {"shape": (8192, 8192), "radius": (4.0, 7.0), "cell": 16, "seed": 1},
    "3d": {"shape": (200, 1024, 1024), "radius": (4.0, 7.0), "cell": 14, "seed": 2},
    "2d-large": {"shape": (8192, 8192), "radius": (12.0, 20.0), "cell": 44, "seed": 3},
}
CROP = {2: (1024, 1024), 3: (64, 256, 256)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# --------------------------------------------------------------------------- tiling


def core_shape(shape, work_shape, tile_shape) -> list[int] | None:
    """Tile core on the working grid as ``segment_instances`` derives it from an explicit
    ``tile_shape`` (full-resolution pixels); None if untiled."""
    from napari_mae.segmentation.tiling import BLOCK_VOXELS as _BLOCK_VOXELS

    if tile_shape is None:
        if math.prod(work_shape) <= _BLOCK_VOXELS:
            return None
        raise ValueError("pass tile_shape: the automatic core depends on the estimated radius")
    t = [max(1, int(round(t * w / n))) for t, w, n in zip(tile_shape, work_shape, shape)]
    return [max(min(w, int(c)), 1) for w, c in zip(work_shape, t)]


def auto_tile_shape(shape, radius: float) -> list[int]:
    """The automatic tile core of ``segment_instances`` for objects of ``radius`` pixels,
    in full-resolution pixels (so that passing it reproduces the automatic tiling with
    borders known before the radius is estimated)."""
    from napari_mae.segmentation.scale import working_shape
    from napari_mae.segmentation.tiling import auto_tile_core as _auto_tile_core

    work = working_shape(shape, radius, [1.0] * len(shape))
    r_px = [radius * w / n for n, w in zip(shape, work)]
    core = _auto_tile_core(work, r_px)
    return [int(round(c * n / w)) for c, n, w in zip(core, shape, work)]


def core_borders(shape, work_shape, core) -> list[np.ndarray]:
    """Per axis, the core borders in full-resolution pixel edges: pixel ``i`` (centre
    ``i + 0.5``) lies after border ``B`` when ``i + 0.5 >= B``."""
    if core is None:
        return [np.zeros(0)] * len(shape)
    return [np.arange(c, w, c) * (n / w) for n, w, c in zip(shape, work_shape, core)]


# --------------------------------------------------------------------------- synthetic data


def make_objects(shape, radius, cell, borders, seed) -> dict:
    """Object centres (pixel-centre coordinates), radii, brightness and kind, sorted along axis 0.

    Kind: 0 on the jittered grid; 1 centred on a core border, 2 one of a touching pair
    whose interface lies near a border, 3 on a tile corner (where borders of several axes
    cross); 4, 5, 6 the same on control lines through the middle of the cores (the
    baseline: the same patterns where no tile border is). Grid objects that the placed
    ones would overlap much are left out.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    ndim = len(shape)
    r_lo, r_hi = radius
    counts = [max(1, round(n / cell)) for n in shape]
    pitch = np.array([n / c for n, c in zip(shape, counts)])
    axes_pos = [(np.arange(c) + 0.5) * p - 0.5 for c, p in zip(counts, pitch)]
    lines, on_border = [], []  # per axis: positions (pixel-centre coordinates), border or control
    for a, b in enumerate(borders):
        ends = np.r_[0.0, b, shape[a]]
        mids = ((ends[:-1] + ends[1:]) / 2)[np.diff(ends) >= 4 * pitch[a]] if b.size else np.zeros(0)
        lines.append(np.r_[b, mids] - 0.5)
        on_border.append(np.r_[np.ones(b.size, bool), np.zeros(mids.size, bool)])

    def along_line(a):  # every other grid position, at least one pitch from the lines of axis a
        pos = axes_pos[a][::2]
        return pos[np.min(np.abs(pos[:, None] - lines[a]), axis=1) >= pitch[a]] if lines[a].size else pos

    grid = np.stack(np.meshgrid(*axes_pos, indexing="ij"), -1).reshape(-1, ndim)
    grid = grid[rng.random(len(grid)) < OCCUPANCY]
    grid += rng.uniform(-JITTER, JITTER, grid.shape) * pitch
    centres, radii, kinds = [], [], []
    for n_axes in range(1, ndim + 1):
        for axes in itertools.combinations(range(ndim), n_axes):
            others = [a for a in range(ndim) if a not in axes]
            along = [along_line(a) for a in others]
            for pick in itertools.product(*[range(lines[a].size) for a in axes]):
                kind_border = {bool(on_border[a][i]) for a, i in zip(axes, pick)}
                if len(kind_border) > 1:
                    continue  # a border crossing a control line: neither pattern
                base = 0 if kind_border.pop() else 3
                pts = np.zeros((math.prod(len(p) for p in along), ndim))
                if others:
                    pts[:, others] = np.stack(np.meshgrid(*along, indexing="ij"), -1).reshape(-1, len(others))
                    pts[:, others] += rng.uniform(-JITTER, JITTER, (len(pts), len(others))) * pitch[others]
                pts[:, list(axes)] = [lines[a][i] for a, i in zip(axes, pick)]
                r = rng.uniform(r_lo, r_hi, (len(pts), 2))
                if n_axes > 1:  # one object on the corner
                    pts[:, list(axes)] += rng.uniform(-1, 1, (len(pts), n_axes))
                    centres.append(pts)
                    radii.append(r[:, 0])
                    kinds.append(np.full(len(pts), base + 3, np.int8))
                    continue
                a = axes[0]
                u = rng.random(len(pts))
                single = pts[u < 0.5]
                single[:, a] += rng.uniform(-1, 1, len(single))
                pair = u >= 0.5
                shift = rng.uniform(-0.3, 0.3, int(pair.sum())) * r[pair].min(axis=1)
                first, second = pts[pair].copy(), pts[pair].copy()
                first[:, a] += shift - 0.9 * r[pair, 0]  # interface at the line + shift
                second[:, a] += shift + 0.9 * r[pair, 1]
                centres += [single, first, second]
                radii += [r[u < 0.5, 0], r[pair, 0], r[pair, 1]]
                kinds += [
                    np.full(len(single), base + 1, np.int8),
                    np.full(2 * int(pair.sum()), base + 2, np.int8),
                ]
    placed = np.concatenate(centres) if centres else np.zeros((0, ndim))
    placed_r = np.concatenate(radii) if radii else np.zeros(0)
    grid_r = rng.uniform(r_lo, r_hi, len(grid))
    keep = np.ones(len(grid), bool)
    if len(placed):
        # Grid objects closer to a placed one than 0.9 (r_i + r_j) would bury it: out.
        near = cKDTree(grid).query_ball_point(placed, 0.9 * (placed_r + r_hi))
        for c, rp, idx in zip(placed, placed_r, near):
            idx = np.asarray(idx, int)
            keep[idx[np.linalg.norm(grid[idx] - c, axis=1) < 0.9 * (rp + grid_r[idx])]] = False
    c = np.concatenate([grid[keep], placed])
    rad = np.concatenate([grid_r[keep], placed_r])
    kind = np.concatenate([np.zeros(int(keep.sum()), np.int8), *kinds])
    inside = np.all((c >= 0) & (c <= np.array(shape) - 1), axis=1)
    order = np.argsort(c[inside, 0], kind="stable")
    return {
        "centre": c[inside][order],
        "radius": rad[inside][order],
        "kind": kind[inside][order],
        "brightness": rng.uniform(0.3, 1.0, int(inside.sum())),
    }


def _paint(objects, shape, a: int, b: int):
    """Rows ``[a, b)`` along axis 0 (may reach outside the image): squared normalised
    distance to the owning object and its label (index + 1), 0 outside objects."""
    c, rad = objects["centre"], objects["radius"]
    r_max = float(rad.max()) + 1
    lo, hi = np.searchsorted(c[:, 0], [a - r_max, b + r_max])
    slab = (b - a, *shape[1:])
    best = np.full(slab, np.inf, np.float32)
    lab = np.zeros(slab, np.uint32)
    for i in range(lo, hi):
        ci = c[i] - np.r_[a, np.zeros(len(shape) - 1)]
        r = rad[i]
        box = tuple(slice(max(math.ceil(x - r), 0), min(math.floor(x + r) + 1, n)) for x, n in zip(ci, slab))
        if any(s.start >= s.stop for s in box):
            continue
        d2 = sum(((g - x) / r) ** 2 for g, x in zip(np.ogrid[box], ci)).astype(np.float32)
        sub = best[box]
        m = (d2 < 1) & (d2 < sub)
        sub[m] = d2[m]
        lab[box][m] = i + 1
    return best, lab


def _slab_rows(shape, voxels: int = 2**22) -> int:
    return max(1, voxels // math.prod(shape[1:]))


def render_image(objects, shape, seed) -> np.ndarray:
    """uint16 image: background + objects, blurred (sigma 1 px), shot and read noise."""
    ndim = len(shape)
    rng0 = np.random.default_rng(seed)
    ph = rng0.uniform(0, 1, 2)
    image = np.empty(shape, np.uint16)
    pad = 4
    amp = np.r_[0.0, objects["brightness"]].astype(np.float32)
    rows = _slab_rows(shape)
    for k, z0 in enumerate(range(0, shape[0], rows)):
        z1 = min(z0 + rows, shape[0])
        best, lab = _paint(objects, shape, z0 - pad, z1 + pad)
        signal = amp[lab] * (1 - 0.3 * np.where(lab > 0, best, 0))
        del best, lab
        grids = np.ogrid[tuple(slice(0, n) for n in signal.shape)]
        u = [(g + (z0 - pad if j == 0 else 0)) / n for j, (g, n) in enumerate(zip(grids, shape))]
        uy, ux = u[-2], u[-1]
        bg = 0.09 + 0.05 * np.cos(2 * np.pi * (1.3 * uy + ph[0])) * np.cos(2 * np.pi * (0.9 * ux + ph[1]))
        bg = bg + 0.05 * ux + (0.03 * u[0] if ndim == 3 else 0)
        signal = ndi.gaussian_filter(signal + bg.astype(np.float32), 1.0, mode="nearest")[pad:-pad]
        rng = np.random.default_rng([seed, k])
        photons = 1500 * signal
        noise = rng.standard_normal(photons.shape, dtype=np.float32)
        counts = (
            100
            + photons
            + np.sqrt(photons) * noise
            + 4 * rng.standard_normal(photons.shape, dtype=np.float32)
        )
        image[z0:z1] = np.clip(counts, 0, 65535)
    return image


def render_labels(objects, shape) -> np.ndarray:
    """Instance ground truth, uint32: object ``i`` of ``objects`` is label ``i + 1``."""
    labels = np.empty(shape, np.uint32)
    rows = _slab_rows(shape)
    for z0 in range(0, shape[0], rows):
        z1 = min(z0 + rows, shape[0])
        labels[z0:z1] = _paint(objects, shape, z0, z1)[1]
    return labels


# --------------------------------------------------------------------------- scoring


def contingency(gt: np.ndarray, pred: np.ndarray):
    """Sparse overlap table: (gt id, pred id, pixel count) for every overlapping pair, 0 included."""
    n_p = int(pred.max()) + 1
    rows = _slab_rows(gt.shape)
    us, cs = [], []
    for z0 in range(0, gt.shape[0], rows):
        code = gt[z0 : z0 + rows].astype(np.int64) * n_p + pred[z0 : z0 + rows]
        u, c = np.unique(code, return_counts=True)
        us.append(u)
        cs.append(c)
    u, inv = np.unique(np.concatenate(us), return_inverse=True)
    cnt = np.bincount(inv, weights=np.concatenate(cs)).astype(np.int64)
    return u // n_p, u % n_p, cnt


def sparse_match(g, p, cnt, n_gt_ids: int, n_pred_ids: int) -> dict:
    """One-to-one matching at IoU >= 0.5 (greedy by IoU, unique above 0.5) from the table."""
    area_g = np.bincount(g, weights=cnt, minlength=n_gt_ids + 1)
    area_p = np.bincount(p, weights=cnt, minlength=n_pred_ids + 1)
    obj = (g > 0) & (p > 0)
    gg, pp, cc = g[obj], p[obj], cnt[obj]
    iou = cc / (area_g[gg] + area_p[pp] - cc)
    cand = np.flatnonzero(iou >= 0.5)
    cand = cand[np.argsort(-iou[cand], kind="stable")]
    matched_g = np.zeros(n_gt_ids + 1, bool)
    matched_p = np.zeros(n_pred_ids + 1, bool)
    for j in cand:
        if not matched_g[gg[j]] and not matched_p[pp[j]]:
            matched_g[gg[j]] = matched_p[pp[j]] = True
    covers = cc >= SPLIT_FRACTION * area_g[gg]
    n_cover = np.bincount(gg[covers], minlength=n_gt_ids + 1)
    # A piece of a GT object: a predicted label covering >= 10 % of it, and mostly inside it
    # (a neighbour's label that spills over a shifted interface is not a piece).
    n_piece = np.bincount(gg[covers & (2 * cc >= area_p[pp])], minlength=n_gt_ids + 1)
    n_gt, n_pred, tp = int((area_g[1:] > 0).sum()), int((area_p[1:] > 0).sum()), int(matched_g.sum())
    fp, fn = n_pred - tp, n_gt - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "accuracy": tp / max(tp + fp + fn, 1),
        "_matched": matched_g,
        "_n_cover": n_cover,
        "_n_piece": n_piece,
        "_area_g": area_g,
        "_area_p": area_p,
    }


def _crossing(boxes, borders, slack: float = 0.0) -> np.ndarray:
    """Per box, whether it has pixels on both sides of a border (``slack`` widens the box)."""
    ndim = len(borders)
    ok = np.array([b is not None for b in boxes])
    st = np.array([[s.start for s in b] if b is not None else [0] * ndim for b in boxes], float)
    sp = np.array([[s.stop for s in b] if b is not None else [0] * ndim for b in boxes], float)
    out = np.zeros(len(boxes), bool)
    for a, bs in enumerate(borders):
        if bs.size:
            out |= np.searchsorted(bs, st[:, a] + 0.5 - slack) != np.searchsorted(bs, sp[:, a] - 0.5 + slack)
    return out & ok


def _crops(shape, borders) -> list[tuple[slice, ...]]:
    """Up to N_CROPS windows of CROP size centred on the tile-core corners nearest the centre."""
    ndim = len(shape)
    size = [min(s, n) for s, n in zip(CROP[ndim], shape)]
    axes = [bs if bs.size else np.array([n / 2]) for bs, n in zip(borders, shape)]
    pts = sorted(itertools.product(*axes), key=lambda q: sum((x - n / 2) ** 2 for x, n in zip(q, shape)))
    crops = []
    for q in pts[:N_CROPS]:
        st = [int(min(max(round(x) - w // 2, 0), n - w)) for x, w, n in zip(q, size, shape)]
        crop = tuple(slice(s, s + w) for s, w in zip(st, size))
        if crop not in crops:
            crops.append(crop)
    return crops


# --------------------------------------------------------------------------- one case


def run_case(args: tuple) -> dict:
    """Generate, segment, score one case, in its own process."""
    name, scale = args
    import warnings

    from napari_mae.metrics import match_instances, summarize_matches
    from napari_mae.segmentation import segment_instances, working_shape

    warnings.filterwarnings("ignore", category=UserWarning)
    spec = CASES[name]
    full = spec["shape"]
    ndim = len(full)
    # Warm-up on a small input, tiled, so that lazily imported modules count in the baseline.
    warm_shape = (48,) * ndim
    warm_objects = make_objects(warm_shape, spec["radius"], spec["cell"], [np.zeros(0)] * ndim, 0)
    segment_instances(render_image(warm_objects, warm_shape, 0), tile_shape=(24,) * ndim)
    rss_imports = _rss_bytes()
    shape = tuple(max(int(round(n * scale)), 2 * spec["cell"]) for n in full)
    r_mid = float(np.mean(spec["radius"]))
    # The automatic core for the nominal radius, given explicitly (see auto_tile_shape).
    tile_shape = auto_tile_shape(full, r_mid)
    if scale < 1:
        tile_shape = [max(64, int(round(c * scale))) for c in tile_shape]
    expected_work = working_shape(shape, r_mid, [1.0] * ndim)
    expected_borders = core_borders(shape, expected_work, core_shape(shape, expected_work, tile_shape))

    t0 = time.perf_counter()
    objects = make_objects(shape, spec["radius"], spec["cell"], expected_borders, spec["seed"])
    image = render_image(objects, shape, spec["seed"])
    t_gen = time.perf_counter() - t0

    rss_before, maxrss_before = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    pred, info = segment_instances(image, tile_shape=tile_shape)
    t_seg = time.perf_counter() - t0
    maxrss = _maxrss_bytes()

    work = tuple(info["working_shape"])
    core = core_shape(shape, work, tile_shape)
    borders = core_borders(shape, work, core)
    n_tiles_expected = math.prod(math.ceil(w / c) for w, c in zip(work, core)) if core else 1
    crops = _crops(shape, borders)
    t0 = time.perf_counter()
    ref_pred, ref_info = segment_instances(image[crops[0]])  # the first crop alone, untiled
    t_ref = time.perf_counter() - t0
    image_bytes = image.nbytes
    del image

    t0 = time.perf_counter()
    gt = render_labels(objects, shape)
    n_gt_ids, n_pred_ids = len(objects["radius"]), int(pred.max())
    g, p, cnt = contingency(gt, pred)
    full_match = sparse_match(g, p, cnt, n_gt_ids, n_pred_ids)
    crop_scores = [match_instances(gt[c], pred[c]) for c in crops]
    crop_sparse_tp = [sparse_match(*contingency(gt[c], pred[c]), n_gt_ids, n_pred_ids)["tp"] for c in crops]
    ref_score = match_instances(gt[crops[0]], ref_pred)
    agreement = match_instances(ref_pred, pred[crops[0]])

    gt_boxes = ndi.find_objects(gt)
    gt_boxes += [None] * (n_gt_ids - len(gt_boxes))
    cross = _crossing(gt_boxes, borders)
    present = full_match["_area_g"][1:] > 0
    kind = objects["kind"]
    n_cover, n_piece = full_match["_n_cover"][1:], full_match["_n_piece"][1:]
    matched = full_match["_matched"][1:]

    def group(sel) -> dict:
        sel = sel & present
        n = int(sel.sum())
        return {
            "n": n,
            "matched": int((matched & sel).sum()),
            "one_label": int(((n_piece == 1) & sel).sum()),
            "split": int(((n_piece >= 2) & sel).sum()),
            "merged": int(((n_piece == 0) & (n_cover > 0) & sel).sum()),
            "missed": int(((n_cover == 0) & sel).sum()),
        }

    vol_min = (math.pi if ndim == 2 else 4 / 3 * math.pi) * spec["radius"][0] ** ndim
    area_p = full_match["_area_p"][1:]
    frag = (area_p > 0) & (area_p < 0.25 * vol_min)
    pred_boxes = ndi.find_objects(pred)
    frag_border = _crossing([b if f else None for b, f in zip(pred_boxes, frag)], borders, slack=1.0)
    t_score = time.perf_counter() - t0
    return {
        "case": name,
        "shape": shape,
        "input_bytes": image_bytes,
        "full_input_bytes": math.prod(full) * 2,
        "radius_range": spec["radius"],
        "n_objects": int(present.sum()),
        "n_placed": int(((kind >= 1) & (kind <= 3) & present).sum()),
        "tile_shape": tile_shape,
        "core": core,
        "tiles": int(info["tiles"]),
        "tiles_expected": n_tiles_expected,
        "working_shape": work,
        "border_offset": (
            max(
                (float(np.abs(e - b).max()) for e, b in zip(expected_borders, borders) if b.size), default=0.0
            )
            if all(e.size == b.size for e, b in zip(expected_borders, borders))
            else None
        ),
        "radius": float(info["radius"]),
        "seconds_generate": t_gen,
        "seconds_segment": t_seg,
        "seconds_score": t_score,
        "seconds_reference": t_ref,
        "reference_pixels": int(ref_pred.size),
        "reference_tiles": int(ref_info["tiles"]),
        "rss_imports": rss_imports,
        "rss_before": rss_before,
        "maxrss_before": maxrss_before,
        "maxrss": maxrss,
        "all": {k: v for k, v in full_match.items() if not k.startswith("_")},
        "crops": summarize_matches(crop_scores),
        "crop_sparse_agrees": [s["tp"] for s in crop_scores] == crop_sparse_tp,
        "crop_0": crop_scores[0],
        "crop_0_alone": ref_score,
        "crop_0_agreement": agreement,
        "crop_0_slices": [(s.start, s.stop) for s in crops[0]],
        "interior": group(~cross & (kind == 0)),
        "crossing": group(cross & (kind == 0)),
        **{f"kind_{k}": group(kind == k) for k in range(1, 7)},
        "fragments": int(frag.sum()),
        "fragments_at_border": int(frag_border.sum()),
        "fragment_px": 0.25 * vol_min,
    }


# --------------------------------------------------------------------------- report


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:6.2f} %" if n else "     - "


def report(r: dict, scale: float) -> None:
    shape = "x".join(map(str, r["shape"]))
    mpix = math.prod(r["shape"]) / 1e6
    unit = "MPix" if len(r["shape"]) == 2 else "MVox"
    print(
        f"\n== {r['case']}: {shape} uint16 ({r['input_bytes'] / 2**20:.0f} MiB), {r['n_objects']:,} objects of "
        f"radius {r['radius_range'][0]:g}-{r['radius_range'][1]:g} px, {r['n_placed']:,} placed on tile-core borders =="
    )
    work = "x".join(map(str, r["working_shape"]))
    core = "x".join(map(str, r["core"])) if r["core"] else "-"
    how = "automatic" if r["tile_shape"] is None else f"tile_shape={r['tile_shape']}"
    print(
        f"segment_instances: {r['seconds_segment']:.1f} s = {r['seconds_segment'] / mpix:.2f} s/{unit}; "
        f"{r['tiles']} tiles ({how}), core {core} on the working grid {work}, radius {r['radius']:.1f} px"
        + (
            ""
            if r["tiles"] == r["tiles_expected"]
            else f"  [expected {r['tiles_expected']} tiles: core borders below may be off]"
        )
    )
    if r["border_offset"] is None or r["border_offset"] > 1:
        off = (
            "other borders"
            if r["border_offset"] is None
            else f"borders up to {r['border_offset']:.0f} px away"
        )
        print(f"  (the objects were placed on the borders predicted before segmenting: {off})")
    extra = r["maxrss"] - r["rss_imports"]
    ratio = extra / r["input_bytes"]
    verdict = "ok" if r["maxrss"] <= TARGET_BYTES else "OVER TARGET"
    print(
        f"peak RSS {r['maxrss'] / GB:.2f} GB (target 8 GB: {verdict}); above the {r['rss_imports'] / GB:.2f} GB "
        f"after imports: {extra / GB:.2f} GB = {ratio:.1f}x the input; "
        f"before the call {r['rss_before'] / GB:.2f} GB"
        + (" (the peak was reached before the call)" if r["maxrss"] == r["maxrss_before"] else "")
    )
    if scale < 1:
        proj = r["rss_imports"] + ratio * r["full_input_bytes"]
        print(f"  projected at scale 1 (linear in the input; fixed costs scaled too): {proj / GB:.1f} GB")
    a = r["all"]
    print(
        f"all objects:  F1@0.5 {a['f1']:.3f}, acc@0.5 {a['accuracy']:.3f} "
        f"(tp {a['tp']:,}, fp {a['fp']:,}, fn {a['fn']:,}; {a['n_pred']:,} predicted)"
    )
    c, c0, alone = r["crops"], r["crop_0"], r["crop_0_alone"]
    print(
        f"{c['n_images']} crop(s) on tile corners (match_instances): F1@0.5 {c['f1']:.3f}, acc@0.5 "
        f"{c['accuracy']:.3f}; crop 1 {c0['f1']:.3f} / {c0['accuracy']:.3f}, the same crop segmented alone "
        f"{alone['f1']:.3f} / {alone['accuracy']:.3f} in {r['seconds_reference']:.1f} s "
        f"({r['seconds_reference'] / (r['reference_pixels'] / 1e6):.2f} s/{unit}); tiled vs alone agree at "
        f"F1@0.5 {r['crop_0_agreement']['f1']:.3f}"
        + ("" if r["crop_sparse_agrees"] else "  [sparse counting DISAGREES with match_instances]")
    )
    print(
        f"{'GT objects':<34} {'n':>8} {'IoU>=0.5':>9} {'one label':>9} {'split':>9} {'merged':>9} {'missed':>9}"
    )
    for key, label in (
        ("interior", "grid: interior (baseline)"),
        ("crossing", "grid: crossing a tile-core border"),
        ("kind_4", "centred mid-core (baseline)"),
        ("kind_1", "centred on a core border"),
        ("kind_5", "touching pair mid-core (baseline)"),
        ("kind_2", "touching pair at a core border"),
        ("kind_6", "on mid-core crossings (baseline)"),
        ("kind_3", "on a tile corner"),
    ):
        s = r[key]
        print(
            f"{label:<34} {s['n']:>8,} {_pct(s['matched'], s['n']):>9} {_pct(s['one_label'], s['n']):>9} "
            f"{_pct(s['split'], s['n']):>9} {_pct(s['merged'], s['n']):>9} {_pct(s['missed'], s['n']):>9}"
        )
    print(
        f"predicted fragments under {r['fragment_px']:.0f} px: {r['fragments']}, "
        f"{r['fragments_at_border']} of them touching a core border"
    )
    print(f"(data generated in {r['seconds_generate']:.1f} s, scored in {r['seconds_score']:.1f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--scale", type=float, default=1.0, help="factor on each side (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    names = list(CASES) if args.case == "all" else [args.case]
    print(
        f"napari-mae large-data check: scale {args.scale:g}, {os.cpu_count()} CPUs; "
        f"target: peak RSS <= 8 GB (8e9 bytes) per case, objects cut by tile borders get one label"
    )
    ctx = mp.get_context("spawn")
    results = []
    for name in names:
        t0 = time.perf_counter()
        with ctx.Pool(1) as pool:
            r = pool.apply(run_case, ((name, args.scale),))
        r["seconds_total"] = time.perf_counter() - t0
        report(r, args.scale)
        results.append(r)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
