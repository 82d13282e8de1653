"""Benchmark of :func:`napari_mae.segmentation.segment_instances` against scikit-image baselines.

Run from the repository root (2 CPU cores: about 2 minutes for everything)::

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
* ``auto``: ``segment_instances(image, spacing=..., method="classical")``, the classical
  pipeline's automatic mode (``method="auto"``, the default, runs the bundled decoder on 2D
  images: ``benchmarks/bench_learned.py --part dsb`` measures it).
* ``scribbles``: the same with the simulated scribbles.
* ``scribbles+model``: the same with MAE encoder features (``default-2d``/``default-3d``
  if bundled, else an untrained ``tiny-2d``/``tiny-3d`` preset; the row says which).

Simulated scribbles (:func:`napari_mae.scribbles.simulate_scribbles`, shared with the
demo so that both score the same scribbles): deterministic (seeded per image), one
short straight stroke inside each of about 5 objects and about 5 strokes in the
background, at most 2 % of the pixels. Scores: dataset-level accuracy@0.5 =
TP / (TP + FP + FN) and F1@0.5 (summed over images), and seconds per megapixel: wall
clock (``s/MPix``) and process CPU time of all threads (``cpu``; on a shared machine the
ratio of CPU times is the steadier figure, since other jobs lengthen wall time unevenly).
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
from napari_mae.scribbles import ct_bone_labels, simulate_scribbles
from napari_mae.segmentation import segment_instances

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("NAPARI_MAE_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


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
    from napari_mae.models.mae import load_model

    name = f"default-{ndim}d"
    try:
        return load_model(name), name
    except Exception:  # noqa: BLE001 - any failure to find the bundled model means "none bundled"
        preset = f"tiny-{ndim}d"
        return load_model(preset), f"{preset} (untrained preset: no bundled {name})"


def run_set(items, modes, spacing=None, ndim=2, log=print):
    """Score every mode on ``items`` = list of (name, image, gt); return {mode: summary}."""
    results = {m: [] for m in modes}
    names = [name for name, _, _ in items]
    seconds = dict.fromkeys(modes, 0.0)
    cpu_seconds = dict.fromkeys(modes, 0.0)
    pixels = 0
    model = model_name = None
    if "scribbles+model" in modes:
        model, model_name = _model_spec(ndim)
    for _name, image, gt in items:
        scrib = simulate_scribbles(gt, seed=0)
        pixels += gt.size
        for mode in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "otsu+watershed":
                pred = baseline_otsu(image, spacing)
            elif mode == "trainable segmenter":
                pred = baseline_trainable(image, scrib, spacing)
            elif mode == "auto":
                pred, _ = segment_instances(image, spacing=spacing, method="classical")
            elif mode == "scribbles":
                pred, _ = segment_instances(image, scribbles=scrib, spacing=spacing)
            elif mode == "scribbles+model":
                pred, _ = segment_instances(image, scribbles=scrib, spacing=spacing, model=model)
            else:
                raise ValueError(mode)
            seconds[mode] += time.perf_counter() - t0
            cpu_seconds[mode] += time.process_time() - c0
            results[mode].append(match_instances(gt, pred))
    out = {}
    for mode in modes:
        s = summarize_matches(results[mode])
        s["s_per_mpix"] = seconds[mode] / (pixels / 1e6)
        s["cpu_s_per_mpix"] = cpu_seconds[mode] / (pixels / 1e6)
        s["per_image"] = dict(zip(names, results[mode]))  # comparable with the demo's metrics.json
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
    """The 3D nuclei volume, its labels and the voxel spacing read from the file (um)."""
    from napari_mae.io.readers import read_image

    f = root / "arabidopsis_nuclei_3d" / "images" / "1135_mini.tif"
    image, spacing, _ = read_image(f)
    labels, _, _ = read_image(root / "arabidopsis_nuclei_3d" / "labels" / f.name)
    return [(f.stem, image, labels)], spacing


def run_ct(root: Path, log=print) -> dict:
    """Vertebrae and ribs of the sample CT from a few bone/background scribbles: F1@0.5.

    Strokes in 8 bones and 8 background strokes inside the body (HU > -500).
    """
    from napari_mae.io.readers import read_image

    folder = root / "totalsegmentator_ct_mr_3d"
    image, spacing, _ = read_image(folder / "images" / "example_ct_sm.nii.gz")
    ref, _, _ = read_image(folder / "labels" / "example_ct_sm.nii.gz")
    gt = ct_bone_labels(ref, folder / "class_map.json")
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
        f"{'set':<10} {'mode':<22} {'acc@0.5':>8} {'F1@0.5':>7} {'prec':>6} {'recall':>6} {'s/MPix':>7} {'cpu':>6}  note"
    )
    sets = []
    if not args.no_2d:
        sets.append(("DSB 2D", load_dsb(root, args.every), None, 2))
    if not args.no_3d:
        items_3d, spacing_3d = load_3d(root)
        sets.append(("nuclei 3D", items_3d, spacing_3d, 3))
    for set_name, items, spacing, ndim in sets:
        res = run_set(items, args.modes, spacing=spacing, ndim=ndim)
        all_results[set_name] = res
        for mode, s in res.items():
            note = s.get("model", "")
            print(
                f"{set_name:<10} {mode:<22} {s['accuracy']:8.3f} {s['f1']:7.3f} {s['precision']:6.3f} "
                f"{s['recall']:6.3f} {s['s_per_mpix']:7.2f} {s['cpu_s_per_mpix']:6.2f}  {note}",
                flush=True,
            )
        if "trainable segmenter" in res and "scribbles+model" in res:
            a, b = res["scribbles+model"], res["trainable segmenter"]
            ratio = a["s_per_mpix"] / b["s_per_mpix"]
            cpu_ratio = a["cpu_s_per_mpix"] / b["cpu_s_per_mpix"]
            print(
                f"{set_name:<10} time ratio scribbles+model / trainable segmenter: {ratio:.2f} wall, "
                f"{cpu_ratio:.2f} CPU (target <= 2)"
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
