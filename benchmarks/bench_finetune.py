"""Few-stroke fine-tuning of the bundled segmentation model: acc@0.5 before and after.

Usage (from the repository root; the dev sets in ``../shared/data``)::

    python benchmarks/bench_finetune.py                         # every set, budgets 5 and 20
    python benchmarks/bench_finetune.py --sets dsb stardist --budgets 5 --seconds 30

For each set the bundled ``default-2d`` segments the image (``method="learned"``, no
per-image setting): acc@0.5 *before*. Then strokes are simulated from the ground truth
(:func:`napari_mae.scribbles.simulate_scribbles`, seeded) for a stroke budget B: ceil(B/2)
object strokes and floor(B/2) background strokes; the model is fine-tuned on that image
with them (:func:`napari_mae.segmentation.finetune.finetune`, default settings: frozen
encoder, pseudo-labels, ``--seconds`` of wall clock or ``--steps``) and the image is segmented again
with the fine-tuned model: acc@0.5 *after*. acc@t = TP / (TP + FP + FN) at IoU t,
dataset-level over the images of a set. The fine-tuning time is wall clock (and the
process CPU time, since the machine may be shared), preparation included.

Sets: ``dsb`` (a few images of the 2D DSB dev set, one fine-tuned model each),
``arabidopsis`` (arabidopsis_nuclei_3d), ``stardist`` (stardist_nuclei_3d, treated as
isotropic), ``ovule`` (plantseg_ovule_cells_3d: cells between bright membranes) and
``ct`` (totalsegmentator_ct_mr_3d, the CT's vertebrae and ribs, background strokes inside
the body). Where the labels are dense (the ovule's cells fill the volume, so
``simulate_scribbles`` finds no background), the background strokes are short pieces of
the cell walls (:func:`wall_strokes`), as a user would paint the membranes. ``--max-side`` crops volumes (centre crop) to at most that many voxels per
axis; the table says where it did.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("dsb", "arabidopsis", "stardist", "ovule", "ct")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _crop(image, labels, max_side: int):
    if not max_side or max(labels.shape) <= max_side:
        return image, labels, ""
    sl = tuple(
        slice((n - min(n, max_side)) // 2, (n - min(n, max_side)) // 2 + min(n, max_side))
        for n in labels.shape
    )
    return image[sl], labels[sl], f"cropped {labels.shape} -> {image[sl].shape}"


def load_set(name: str, *, n_dsb: int, max_side: int):
    """[(item name, image, gt, spacing, background_where, note)] of one set."""
    from napari_mae.io.readers import read_image
    from napari_mae.scribbles import ct_bone_labels

    if name == "dsb":
        folder = SHARED / "dsb2018_fluo_nuclei_2d"
        files = sorted((folder / "images").glob("*.tif"))
        picks = files[:: max(1, len(files) // n_dsb)][:n_dsb]
        out = []
        for f in picks:
            img, sp, _ = read_image(f)
            gt, _, _ = read_image(folder / "labels" / f.name)
            out.append((f.stem, img, np.asarray(gt).astype(np.int32), None, None, ""))
        return out
    if name == "ct":
        folder = SHARED / "totalsegmentator_ct_mr_3d"
        img, sp, _ = read_image(folder / "images" / "example_ct_sm.nii.gz")
        ref, _, _ = read_image(folder / "labels" / "example_ct_sm.nii.gz")
        gt = ct_bone_labels(ref, folder / "class_map.json").astype(np.int32)
        img, gt, note = _crop(np.asarray(img), gt, max_side)
        return [("ct bones", img, gt, tuple(sp), img > -500, note)]
    folder, fname, spacing = {
        "arabidopsis": ("arabidopsis_nuclei_3d", "1135_mini.tif", None),
        "stardist": ("stardist_nuclei_3d", "img3d.tif", (1.0, 1.0, 1.0)),
        "ovule": ("plantseg_ovule_cells_3d", "sample_ovule.tif", None),
    }[name]
    img, sp, _ = read_image(SHARED / folder / "images" / fname)
    gt, _, _ = read_image(SHARED / folder / "labels" / fname)
    img, gt, note = _crop(np.asarray(img), np.asarray(gt).astype(np.int32), max_side)
    return [(folder, img, gt, spacing or tuple(sp), None, note)]


def wall_strokes(gt, n: int, seed: int) -> np.ndarray:
    """``n`` short background strokes on the walls between labelled cells, each in one Z plane.

    A stroke is the wall voxels within 3 voxels of a random wall voxel in its plane.
    """
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed + 1)
    walls = np.stack([find_boundaries(p, mode="thick") for p in gt]) if gt.ndim == 3 else find_boundaries(gt)
    out = np.zeros(gt.shape, np.uint8)
    cand = np.argwhere(walls)
    picks = cand[rng.choice(len(cand), size=min(n, len(cand)), replace=False)] if len(cand) else []
    for c in picks:
        plane = walls[c[0]] if gt.ndim == 3 else walls
        yy, xx = np.ogrid[: plane.shape[0], : plane.shape[1]]
        near = plane & ((yy - c[-2]) ** 2 + (xx - c[-1]) ** 2 <= 9)
        (out[c[0]] if gt.ndim == 3 else out)[near] = 1
    return out


def segment(image, spacing, model):
    from napari_mae.segmentation import segment_instances

    labels, _ = segment_instances(image, method="learned", model=model, spacing=spacing)
    return labels


def run_set(name: str, items, budgets, seconds, seed: int, log=print, steps=None) -> list[dict]:
    from napari_mae.metrics import match_instances, summarize_matches
    from napari_mae.scribbles import simulate_scribbles
    from napari_mae.segmentation.finetune import FinetuneConfig, finetune

    before = []
    for item, img, gt, sp, _, _ in items:
        t0 = time.perf_counter()
        before.append(match_instances(gt, segment(img, sp, "default-2d")))
        log(f"  {item}: before acc@0.5 {before[-1]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for budget in budgets:
        after, wall, cpu, done = [], [], [], []
        for (item, img, gt, sp, where, _), b in zip(items, before, strict=True):
            strokes = simulate_scribbles(
                gt,
                n_objects=math.ceil(budget / 2),
                n_background=budget // 2,
                seed=seed,
                background_where=where,
            )
            if not (strokes == 1).any():  # dense labels: no background between objects
                walls = wall_strokes(gt, budget // 2, seed)
                strokes = np.where((strokes == 0) & (walls == 1), 1, strokes).astype(np.uint8)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "tuned.pt"
                t0, c0 = time.perf_counter(), _cpu()
                final = None
                for u in finetune(
                    img,
                    strokes,
                    out=out,
                    spacing=sp,
                    config=FinetuneConfig(seconds=seconds, steps=steps, seed=seed),
                ):
                    final = u
                wall.append(time.perf_counter() - t0)
                cpu.append(_cpu() - c0)
                done.append(final.step)
                if final.checkpoint is None:
                    log(f"  {item}: fine-tuning saved nothing: {final.message}")
                    after.append(b)
                    continue
                after.append(match_instances(gt, segment(img, sp, str(out))))
            log(
                f"  {item}, {budget} strokes: after acc@0.5 {after[-1]['accuracy']:.3f}, "
                f"{final.step} steps in {wall[-1]:.0f} s ({cpu[-1]:.0f} CPU s)"
            )
        sb, sa = summarize_matches(before), summarize_matches(after)
        rows.append(
            {
                "set": name,
                "strokes": budget,
                "images": len(items),
                "before": round(sb["accuracy"], 3),
                "after": round(sa["accuracy"], 3),
                "gain": round(sa["accuracy"] - sb["accuracy"], 3),
                "finetune_s": round(float(np.mean(wall)), 1),
                "finetune_cpu_s": round(float(np.mean(cpu)), 1),
                "steps": round(float(np.mean(done)), 1),
                "note": items[0][5],
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[5, 20])
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="fine-tuning budget per image (default 60; 0: --steps only)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="most optimiser steps per image (default: the time)"
    )
    parser.add_argument("--dsb-images", type=int, default=4, help="DSB dev images (default 4)")
    parser.add_argument("--max-side", type=int, default=0, help="crop volumes to this many voxels per axis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    t_all, c_all = time.perf_counter(), _cpu()
    rows = []
    for name in args.sets:
        print(f"{name}:", flush=True)
        items = load_set(name, n_dsb=args.dsb_images, max_side=args.max_side)
        try:
            new = run_set(
                name,
                items,
                args.budgets,
                args.seconds or None,
                args.seed,
                log=lambda m: print(m, flush=True),
                steps=args.steps,
            )
        except ValueError as exc:  # e.g. strokes the fine-tuning refuses: say so, go on
            print(f"  {name}: {exc}", flush=True)
            continue
        for r in new:
            print(f"  row: {json.dumps(r)}", flush=True)
        rows += new
    print(
        f"\n{'set':<12} {'strokes':>7} {'images':>6} {'before':>7} {'after':>7} {'gain':>7} "
        f"{'ft s':>6} {'ft cpu s':>8} {'steps':>6}  note"
    )
    for r in rows:
        print(
            f"{r['set']:<12} {r['strokes']:>7} {r['images']:>6} {r['before']:7.3f} {r['after']:7.3f} "
            f"{r['gain']:+7.3f} {r['finetune_s']:6.1f} {r['finetune_cpu_s']:8.1f} {r['steps']:6.1f}  {r['note']}"
        )
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {_cpu() - c_all:.0f} s CPU")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
