"""Benchmark of :func:`napari_mae.segmentation.segment_instances` against scikit-image baselines.

Run from the repository root (2 CPU cores: about 5-10 minutes for everything)::

    python benchmarks/bench_segmentation.py                 # all modes, all data
    python benchmarks/bench_segmentation.py --every 4       # every 4th DSB image (quick)
    python benchmarks/bench_segmentation.py --modes auto scribbles --no-ct

Data: ``../shared/data`` (or ``$NAPARI_MAE_SHARED_DATA``): the 68 DSB 2018 fluorescence
images (2D) and the Arabidopsis nuclei volume (3D, voxel 0.2837 x 0.1268 x 0.1268 um),
both with instance ground truth, and the TotalSegmentator CT (vertebrae and ribs).

Rows, all in this process on the same images:

* ``otsu+watershed`` (baseline): Gaussian (1 px), Otsu, distance transform, peaks at a
  fixed minimum distance of 5 pixels, watershed (the scikit-image gallery recipe).
* ``trainable segmenter`` (baseline): :func:`skimage.feature.multiscale_basic_features`
  + :func:`skimage.future.fit_segmenter` (random forest) on the simulated scribbles,
  then the same watershed.
* ``auto``: ``segment_instances(image, spacing=...)``.
* ``scribbles``: the same with the simulated scribbles.
* ``scribbles+model``: the same with MAE encoder features (``default-2d``/``default-3d``
  if bundled, else an untrained ``tiny-2d``/``tiny-3d`` preset; the row says which).

Simulated scribbles (:func:`simulate_scribbles`): deterministic (seeded per image), one
short straight stroke inside each of about 5 objects and about 5 strokes in the
background, at most 2 % of the pixels. Scores: dataset-level accuracy@0.5 =
TP / (TP + FP + FN) and F1@0.5 (summed over images), and seconds per megapixel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_mae.metrics import match_instances, summarize_matches
from napari_mae.segmentation import segment_instances

ROOT = Path(__file__).resolve().parents[1]
SPACING_3D = (0.2837, 0.1268, 0.1268)


def data_dir() -> Path:
    env = os.environ.get("NAPARI_MAE_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- scribbles


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


# --------------------------------------------------------------------------- baselines


def _watershed_fixed(fg: np.ndarray, spacing) -> np.ndarray:
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(fg, sampling=spacing)
    lab, _ = ndi.label(fg)
    coords = peak_local_max(dist, min_distance=5, labels=lab, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return watershed(-dist, markers, mask=fg)


def baseline_otsu(image: np.ndarray, spacing=None) -> np.ndarray:
    from skimage.filters import gaussian, threshold_otsu

    sm = gaussian(image.astype(np.float32), 1.0)
    return _watershed_fixed(sm > threshold_otsu(sm), spacing)


def baseline_trainable(image: np.ndarray, scribbles: np.ndarray, spacing=None) -> np.ndarray:
    from skimage.feature import multiscale_basic_features
    from skimage.future import fit_segmenter, predict_segmenter
    from sklearn.ensemble import RandomForestClassifier

    feats = multiscale_basic_features(image.astype(np.float32), sigma_min=1, sigma_max=16)
    clf = RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10, max_samples=0.05, random_state=0)
    clf = fit_segmenter(scribbles, feats, clf)
    pred = predict_segmenter(feats, clf)
    return _watershed_fixed(pred == 2, spacing)


# --------------------------------------------------------------------------- runner


def _model_spec(ndim: int):
    """Bundled default model if present, else a fresh (untrained) preset."""
    from napari_mae.model import load_model

    name = f"default-{ndim}d"
    try:
        return load_model(name), name
    except Exception:  # noqa: BLE001 - any failure to find the bundled model means "none bundled"
        preset = f"tiny-{ndim}d"
        return load_model(preset), f"{preset} (untrained preset: no bundled {name})"


def run_set(items, modes, spacing=None, ndim=2, log=print):
    """Score every mode on ``items`` = list of (name, image, gt); return {mode: summary}."""
    results = {m: [] for m in modes}
    seconds = dict.fromkeys(modes, 0.0)
    pixels = 0
    model = model_name = None
    if "scribbles+model" in modes:
        model, model_name = _model_spec(ndim)
    for _name, image, gt in items:
        scrib = simulate_scribbles(gt, seed=0)
        pixels += gt.size
        for mode in modes:
            t0 = time.perf_counter()
            if mode == "otsu+watershed":
                pred = baseline_otsu(image, spacing)
            elif mode == "trainable segmenter":
                pred = baseline_trainable(image, scrib, spacing)
            elif mode == "auto":
                pred, _ = segment_instances(image, spacing=spacing)
            elif mode == "scribbles":
                pred, _ = segment_instances(image, scribbles=scrib, spacing=spacing)
            elif mode == "scribbles+model":
                pred, _ = segment_instances(image, scribbles=scrib, spacing=spacing, model=model)
            else:
                raise ValueError(mode)
            seconds[mode] += time.perf_counter() - t0
            results[mode].append(match_instances(gt, pred))
    out = {}
    for mode in modes:
        s = summarize_matches(results[mode])
        s["s_per_mpix"] = seconds[mode] / (pixels / 1e6)
        out[mode] = s
    if model_name:
        out["scribbles+model"]["model"] = model_name
    return out


def load_dsb(root: Path, every: int):
    import tifffile

    files = sorted((root / "dsb2018_fluo_nuclei_2d" / "images").glob("*.tif"))[::every]
    return [
        (f.stem, tifffile.imread(f), tifffile.imread(root / "dsb2018_fluo_nuclei_2d" / "labels" / f.name))
        for f in files
    ]


def load_3d(root: Path):
    import tifffile

    f = root / "arabidopsis_nuclei_3d" / "images" / "1135_mini.tif"
    return [(f.stem, tifffile.imread(f), tifffile.imread(root / "arabidopsis_nuclei_3d" / "labels" / f.name))]


def run_ct(root: Path, log=print) -> dict:
    """Vertebrae and ribs of the sample CT from a few bone/background scribbles: F1@0.5.

    Strokes in 8 bones and 8 background strokes inside the body (HU > -500).
    """
    from napari_mae.io.readers import read_image

    folder = root / "totalsegmentator_ct_mr_3d"
    image, spacing, _ = read_image(folder / "images" / "example_ct_sm.nii.gz")
    ref, _, _ = read_image(folder / "labels" / "example_ct_sm.nii.gz")
    names = json.loads((folder / "class_map.json").read_text())["total"]
    bone_ids = [int(k) for k, v in names.items() if v.startswith(("vertebrae_", "rib_"))]
    gt = np.where(np.isin(ref, bone_ids), ref, 0).astype(np.int32)
    scrib = simulate_scribbles(gt, seed=0, n_objects=8, n_background=8, background_where=image > -500)
    t0 = time.perf_counter()
    pred, info = segment_instances(image, scribbles=scrib, spacing=spacing)
    dt = time.perf_counter() - t0
    m = match_instances(gt, pred)
    m["seconds"] = dt
    m["n_reference"] = int(len(np.unique(gt)) - 1)
    m["radius"] = info["radius"]
    return m


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="use every N-th DSB image (default all)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["otsu+watershed", "trainable segmenter", "auto", "scribbles", "scribbles+model"],
    )
    parser.add_argument("--no-2d", action="store_true")
    parser.add_argument("--no-3d", action="store_true")
    parser.add_argument("--no-ct", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    root = data_dir()
    if not root.is_dir():
        print(f"shared data not found at {root}", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", category=UserWarning)
    all_results = {}
    print(
        f"{'set':<10} {'mode':<22} {'acc@0.5':>8} {'F1@0.5':>7} {'prec':>6} {'recall':>6} {'s/MPix':>7}  note"
    )
    sets = []
    if not args.no_2d:
        sets.append(("DSB 2D", load_dsb(root, args.every), None, 2))
    if not args.no_3d:
        sets.append(("nuclei 3D", load_3d(root), SPACING_3D, 3))
    for set_name, items, spacing, ndim in sets:
        res = run_set(items, args.modes, spacing=spacing, ndim=ndim)
        all_results[set_name] = res
        for mode, s in res.items():
            note = s.get("model", "")
            print(
                f"{set_name:<10} {mode:<22} {s['accuracy']:8.3f} {s['f1']:7.3f} {s['precision']:6.3f} "
                f"{s['recall']:6.3f} {s['s_per_mpix']:7.2f}  {note}",
                flush=True,
            )
        if "trainable segmenter" in res and "scribbles+model" in res:
            ratio = res["scribbles+model"]["s_per_mpix"] / res["trainable segmenter"]["s_per_mpix"]
            print(
                f"{set_name:<10} time ratio scribbles+model / trainable segmenter: {ratio:.2f} (target <= 2)"
            )
    if not args.no_ct:
        ct = run_ct(root)
        all_results["CT bones"] = ct
        print(
            f"CT (vertebrae + ribs, {ct['n_reference']} reference objects, scribbles): F1@0.5 {ct['f1']:.3f}, "
            f"acc@0.5 {ct['accuracy']:.3f}, {ct['n_pred']} predicted, {ct['seconds']:.1f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
