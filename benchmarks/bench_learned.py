"""The learned pipeline (the MAE encoder's decoder) against the classical one, on the dev sets.

Usage (from the repository root; the dev sets in ``../shared/data``)::

    python benchmarks/bench_learned.py                    # everything below
    python benchmarks/bench_learned.py --part dsb         # DSB dev set, zoom 1
    python benchmarks/bench_learned.py --part scale       # DSB dev set rescaled by 0.5x and 2x
    python benchmarks/bench_learned.py --part 3d          # 3D volumes and harder variants
    python benchmarks/bench_learned.py --part radius      # 3D results against the object radius given
    python benchmarks/bench_learned.py --model CHECKPOINT # another segmentation model

All rows in one process, through :func:`napari_mae.segmentation.segment_instances` with
``method="learned"`` / ``"classical"`` (and ``"auto"`` on the DSB dev set: the bundled
decoder, the classical pipeline where the decoder is unsure; ``fallbacks`` counts those
images) and no per-image setting. Scores are dataset-level:
acc@t = TP / (TP + FP + FN) at IoU t (the DSB / StarDist definition), F1, precision and
recall at IoU 0.5, and mAP = the mean of acc@t over t = 0.50, 0.55, ..., 0.95. Time per
megapixel (megavoxel) is wall clock, including reading nothing but the whole pipeline:
input preparation, the radius estimate, the decoder and the watershed.

The DSB rows are also broken down by image size, a proxy for the acquisition: the dev set
holds sizes that the training split (``dsb2018_fluo_train_2d``) has none of, so the
breakdown separates image types the bundled decoder was trained on from unseen ones.

The 3D part segments ``arabidopsis_nuclei_3d`` and ``stardist_nuclei_3d`` as they are and
made harder: added Gaussian noise (15 % of the intensity range), low contrast (a quarter
of it, plus noise) and a bright membrane-like streak through the volume. It reports the
number of objects found against the true count (the "no collapse" check: within 2x).

The radius part gives each 3D volume (as is, and with noise) the object radius the
pipeline estimates times 0.9, 0.95, 1, 1.05 and 1.1, and prints acc@0.5 for each and its
spread: how much of a result is the radius estimate's luck rather than the method's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DSB = SHARED / "dsb2018_fluo_nuclei_2d"
SETS_3D = {
    "arabidopsis_nuclei_3d": (0.284, 0.127, 0.127),
    "stardist_nuclei_3d": (1.0, 1.0, 1.0),
}
THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def score(pairs) -> dict:
    """acc@0.5, F1, precision, recall and mAP 0.5:0.95 over (gt, pred) pairs."""
    from napari_mae.metrics import match_instances, summarize_matches

    per_t = {}
    for t in THRESHOLDS:
        per_t[float(t)] = summarize_matches([match_instances(g, p, iou_threshold=float(t)) for g, p in pairs])
    s = per_t[0.5]
    return {
        "acc@0.5": round(s["accuracy"], 3),
        "F1@0.5": round(s["f1"], 3),
        "precision": round(s["precision"], 3),
        "recall": round(s["recall"], 3),
        "mAP": round(float(np.mean([v["accuracy"] for v in per_t.values()])), 3),
        "n_gt": int(s["n_gt"]),
        "n_pred": int(s["n_pred"]),
    }


def _zoomed(img, gt, zoom):
    from skimage.transform import rescale

    if zoom == 1.0:
        return img, gt
    rgb = img.ndim == 3 and img.shape[-1] in (3, 4)
    img = rescale(img.astype(np.float32), zoom, order=1, anti_aliasing=zoom < 1, preserve_range=True,
                  channel_axis=-1 if rgb else None)  # fmt: skip
    gt = rescale(gt, zoom, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return img, gt


def run_dsb(method: str, model, zoom: float = 1.0, limit: int | None = None) -> dict:
    from napari_mae.segmentation import segment_instances

    files = sorted((DSB / "images").glob("*.tif"))[:limit]
    pairs, sizes, pixels, seconds, fallbacks = [], [], 0, 0.0, 0
    for f in files:
        with tifffile.TiffFile(f) as tif:
            sizes.append(tuple(tif.pages[0].shape[:2]))
        img, gt = _zoomed(tifffile.imread(f), tifffile.imread(DSB / "labels" / f.name).astype(np.int32), zoom)
        t0 = time.perf_counter()
        labels, info = segment_instances(img, method=method, model=model if method == "learned" else None)
        seconds += time.perf_counter() - t0
        assert method == "auto" or info["method"] == method, info
        fallbacks += "fallback" in info
        pairs.append((gt, labels))
        pixels += gt.size
    seen = [size in training_sizes() for size in sizes]
    groups = {"sizes in the training split": [p for p, k in zip(pairs, seen, strict=True) if k],
              "sizes not in the training split": [p for p, k in zip(pairs, seen, strict=True) if not k]}  # fmt: skip
    return {"set": f"DSB dev ({len(files)} images)", "zoom": zoom, "method": method, **score(pairs),
            "s_per_MPix": round(seconds / (pixels / 1e6), 2), "fallbacks": fallbacks,
            "by_size": {k: {"images": len(v), **score(v)} for k, v in groups.items() if v}}  # fmt: skip


def training_sizes() -> set:
    """Image sizes (Y, X) of the DSB training split."""
    sizes = set()
    for f in (SHARED / "dsb2018_fluo_train_2d" / "images").glob("*.tif"):
        with tifffile.TiffFile(f) as tif:
            sizes.add(tuple(tif.pages[0].shape[:2]))
    return sizes


def variants(img):
    """The volume, and harder versions of it (seeded)."""
    rng = np.random.default_rng(0)
    x = img.astype(np.float32)
    lo, hi = np.percentile(x, [1, 99.8])
    span = hi - lo
    yield "as is", img
    yield "noise", x + rng.normal(0, 0.15 * span, x.shape).astype(np.float32)
    yield "low contrast", lo + 0.25 * (x - lo) + rng.normal(0, 0.03 * span, x.shape).astype(np.float32)
    streak = x.copy()
    _, y, xx = np.indices(x.shape)
    streak[np.abs((y - 0.3 * x.shape[1]) - 0.6 * (xx - 0.2 * x.shape[2])) < 2.5] = 1.5 * hi
    yield "bright streak", streak


def volumes():
    """(name, spacing, volume, labels) of each 3D dev set."""
    for name, spacing in SETS_3D.items():
        f = sorted((SHARED / name / "images").glob("*.tif"))[0]
        yield (
            name,
            spacing,
            tifffile.imread(f),
            tifffile.imread(SHARED / name / "labels" / f.name).astype(np.int32),
        )


def run_3d(model) -> list[dict]:
    from napari_mae.segmentation import segment_instances

    rows = []
    for name, spacing, img, gt in volumes():
        for variant, vol in variants(img):
            for method in ("learned", "classical"):
                t0 = time.perf_counter()
                labels, info = segment_instances(vol, spacing=spacing, method=method,
                                                 model=model if method == "learned" else None)  # fmt: skip
                seconds = time.perf_counter() - t0
                rows.append({"set": name, "variant": variant, "method": method, **score([(gt, labels)]),
                             "s_per_MVox": round(seconds / (gt.size / 1e6), 2),
                             "radius": round(float(info["radius"]), 3)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


#: Factors on the estimated radius for the radius part.
RADIUS_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)


def run_radius(model) -> list[dict]:
    from napari_mae.segmentation import segment_instances
    from napari_mae.segmentation.prepare import prepare_image
    from napari_mae.segmentation.scale import estimate_object_radius

    rows = []
    for name, spacing, img, gt in volumes():
        for variant, vol in list(variants(img))[:2]:
            prepared, _ = prepare_image(vol)
            radius = float(estimate_object_radius(prepared, spacing)["radius"])
            for method in ("learned", "classical"):
                accs, counts = [], []
                for factor in RADIUS_FACTORS:
                    labels, _ = segment_instances(vol, spacing=spacing, method=method, object_radius=radius * factor,
                                                  model=model if method == "learned" else None)  # fmt: skip
                    accs.append(score([(gt, labels)])["acc@0.5"])
                    counts.append(int(labels.max()))
                rows.append({"set": name, "variant": variant, "method": method, "radius": round(radius, 3),
                             "factors": list(RADIUS_FACTORS), "acc@0.5": accs, "n_pred": counts,
                             "n_gt": int(len(np.unique(gt)) - 1),
                             "spread": round(max(accs) - min(accs), 3)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "dsb", "scale", "3d", "radius"), default="all")
    ap.add_argument(
        "--model", default="default-2d", help="segmentation model (default: the bundled default-2d)"
    )
    ap.add_argument("--limit", type=int, default=None, help="first N DSB images only")
    args = ap.parse_args(argv)
    if args.part in ("all", "dsb"):
        # auto: the bundled decoder, and the classical pipeline where it is unsure (info["fallback"])
        for method in ("learned", "classical", "auto"):
            print(json.dumps(run_dsb(method, args.model, 1.0, args.limit)), flush=True)
    if args.part in ("all", "scale"):
        for zoom in (0.5, 2.0):
            for method in ("learned", "classical", "auto"):
                print(json.dumps(run_dsb(method, args.model, zoom, args.limit)), flush=True)
    if args.part in ("all", "3d"):
        run_3d(args.model)
    if args.part in ("all", "radius"):
        run_radius(args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
