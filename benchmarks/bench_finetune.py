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
``dsb-unseen`` (the same, from the 16 dev images whose sizes the training split does not
have: other acquisitions, where the bundled model falls behind the classical pipeline),
``arabidopsis`` (arabidopsis_nuclei_3d), ``stardist`` (stardist_nuclei_3d, treated as
isotropic), ``ovule`` (plantseg_ovule_cells_3d: cells between bright membranes) and
``ct`` (totalsegmentator_ct_mr_3d, the CT's vertebrae and ribs, background strokes inside
the body). Where the labels are dense (the ovule's cells fill the volume, so
``simulate_scribbles`` finds no background), the background strokes are short pieces of
the cell walls (:func:`wall_strokes`), as a user would paint the membranes. ``--max-side`` crops volumes (centre crop) to at most that many voxels per
axis; the table says where it did. The *radius* column is the object radius the fine-tuned
model stored (physical units) and where it came from (``estimate``, ``strokes``, ``given``);
inference with the fine-tuned model runs at it.

``--pretrain-minutes M`` adds rows ``<set>+mae<M>min``: the bundled segmenter's encoder is
first pretrained further as an MAE, without labels, on the Z, Y and X planes of the image
on the fine-tuning's working grid (:func:`pretrained_segmenter`, through
:func:`napari_mae.training.train`, M minutes of wall clock), the bundled decoder is put
back on it, and that model is fine-tuned on the same strokes at the same radius. Its
*before* is that model before fine-tuning.
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
SETS = ("dsb", "dsb-unseen", "arabidopsis", "stardist", "ovule", "ct")


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

    if name in ("dsb", "dsb-unseen"):
        folder = SHARED / "dsb2018_fluo_nuclei_2d"
        files = sorted((folder / "images").glob("*.tif"))
        if name == "dsb-unseen":  # the image types the bundled model did not see
            from bench_learned import training_sizes

            seen = training_sizes()
            import tifffile

            files = [f for f in files if tuple(tifffile.imread(f).shape[:2]) not in seen]
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


#: Constant learning rate of the further pretraining: a time limit cuts any schedule short
#: (a cosine over 10,000 epochs would stay in its warm-up), and the model is trained already.
LR_PRETRAIN = 3e-4


def pretrained_segmenter(work, minutes: float, seed: int, tmp: Path, log=print):
    """The bundled segmenter with its encoder further pretrained as an MAE on one image's planes.

    ``work`` is the image on the fine-tuning's working grid (objects at the model's
    radius). Its Z, Y and X planes (2D) are the training folder of
    :func:`napari_mae.training.train` (the MAE task, no labels), run for ``minutes`` of
    wall clock. The MAE starts from the bundled segmenter's encoder (with the bundled
    MAE's reconstruction head), so that the segmenter's decoder, put back on the
    pretrained encoder, still fits it. Returns the segmenter (an ``InstanceDecoder``).
    """
    import tifffile

    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models.decoder import InstanceDecoder, load_segmenter
    from napari_mae.models.mae import load_model
    from napari_mae.training import TrainConfig, train

    seg = load_segmenter("default-2d")
    mae = load_model("default-2d")
    enc = {k[len("encoder.") :]: v for k, v in seg.state_dict().items() if k.startswith("encoder.")}
    state = mae.state_dict()
    state.update({k: v for k, v in enc.items() if k in state})
    mae.load_state_dict(state)
    init = save_checkpoint(tmp / "init-mae.pt", mae)
    planes = tmp / "planes"
    planes.mkdir()
    for axis in range(work.ndim if work.ndim == 3 else 0):
        moved = np.moveaxis(work, axis, 0)
        for k in range(moved.shape[0]):
            tifffile.imwrite(planes / f"a{axis}_{k:04d}.tif", np.ascontiguousarray(moved[k], np.float32))
    if work.ndim == 2:
        tifffile.imwrite(planes / "image.tif", np.asarray(work, np.float32))
    cfg = TrainConfig(
        data_dir=planes, output_dir=tmp / "run", model=str(init), spatial_dims=2, epochs=10_000, seed=seed,
        device="cpu", cache="memory", lr=LR_PRETRAIN, min_lr=LR_PRETRAIN, warmup_fraction=0.0,
    )  # fmt: skip
    t0 = time.perf_counter()
    last = None
    for u in train(cfg, stop=lambda: time.perf_counter() - t0 > 60 * minutes):
        last = u
    log(f"  MAE pretraining: {getattr(last, 'step', '?')} steps in {time.perf_counter() - t0:.0f} s")
    tuned = load_model(tmp / "run" / "last.pt")
    net = InstanceDecoder(tuned, seg.decoder_config)
    state = seg.state_dict()
    state.update({k: v for k, v in net.state_dict().items() if k.startswith("encoder.")})
    net.load_state_dict(state)
    net.normalization = dict(seg.normalization)
    net.source = f"default-2d, encoder pretrained {minutes:g} min on the image's planes"
    return net.eval()


def segment(image, spacing, model):
    from napari_mae.segmentation import segment_instances

    labels, _ = segment_instances(image, method="learned", model=model, spacing=spacing)
    return labels


def _strokes(gt, budget: int, seed: int, where) -> np.ndarray:
    from napari_mae.scribbles import simulate_scribbles

    strokes = simulate_scribbles(
        gt, n_objects=math.ceil(budget / 2), n_background=budget // 2, seed=seed, background_where=where
    )
    if not (strokes == 1).any():  # dense labels: no background between objects
        walls = wall_strokes(gt, budget // 2, seed)
        strokes = np.where((strokes == 0) & (walls == 1), 1, strokes).astype(np.uint8)
    return strokes


def _finetune_and_score(img, gt, strokes, sp, model, object_radius, cfg, log, item):
    """(after match or None, wall s, CPU s, steps, the checkpoint's extra or None) of one fine-tune."""
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.metrics import match_instances
    from napari_mae.segmentation.finetune import finetune

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tuned.pt"
        t0, c0 = time.perf_counter(), _cpu()
        final = None
        for u in finetune(
            img, strokes, out=out, model=model, spacing=sp, object_radius=object_radius, config=cfg
        ):
            final = u
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        if final.checkpoint is None:
            log(f"  {item}: fine-tuning saved nothing: {final.message}")
            return None, wall, cpu, final.step, None
        return (
            match_instances(gt, segment(img, sp, str(out))),
            wall,
            cpu,
            final.step,
            load_checkpoint(out)["extra"],
        )


def _row(name, label, budget, items, before, after, wall, cpu, done, radii) -> dict:
    from napari_mae.metrics import summarize_matches

    sb, sa = summarize_matches(before), summarize_matches(after)
    return {
        "set": name + label,
        "strokes": budget,
        "images": len(items),
        "before": round(sb["accuracy"], 3),
        "after": round(sa["accuracy"], 3),
        "gain": round(sa["accuracy"] - sb["accuracy"], 3),
        "finetune_s": round(float(np.mean(wall)), 1),
        "finetune_cpu_s": round(float(np.mean(cpu)), 1),
        "steps": round(float(np.mean(done)), 1),
        "radius": "; ".join(radii),
        "note": items[0][5],
    }


def run_set(
    name: str,
    items,
    budgets,
    seconds,
    seed: int,
    log=print,
    steps=None,
    pretrain_minutes: float = 0.0,
    options: dict | None = None,
) -> list[dict]:
    """Rows of one set: the bundled model, and with ``pretrain_minutes`` the pretrained one too."""
    from napari_mae.metrics import match_instances
    from napari_mae.segmentation.finetune import FinetuneConfig

    cfg = FinetuneConfig(seconds=seconds, steps=steps, seed=seed, **(options or {}))
    before = []
    for item, img, gt, sp, _, _ in items:
        t0 = time.perf_counter()
        before.append(match_instances(gt, segment(img, sp, "default-2d")))
        log(f"  {item}: before acc@0.5 {before[-1]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")
    rows, fitted = [], {}  # fitted[(image index, budget)]: the bundled fine-tune's radius
    for budget in budgets:
        after, wall, cpu, done, radii = [], [], [], [], []
        for i, ((item, img, gt, sp, where, _), b) in enumerate(zip(items, before, strict=True)):
            strokes = _strokes(gt, budget, seed, where)
            m, w, c, n, extra = _finetune_and_score(img, gt, strokes, sp, "default-2d", None, cfg, log, item)
            after.append(b if m is None else m)
            wall.append(w), cpu.append(c), done.append(n)
            if extra is not None:
                fitted[i, budget] = extra["object_radius"]
                radii.append(f"{extra['object_radius']:.3g} ({','.join(extra['object_radius_sources'])})")
            log(
                f"  {item}, {budget} strokes: after acc@0.5 {after[-1]['accuracy']:.3f}, "
                f"{n} steps in {w:.0f} s ({c:.0f} CPU s), radius {radii[-1] if radii else '-'}"
            )
        rows.append(_row(name, "", budget, items, before, after, wall, cpu, done, radii))
    if pretrain_minutes:
        rows += _pretrained_rows(name, items, budgets, fitted, cfg, seed, pretrain_minutes, log)
    return rows


def _pretrained_rows(name, items, budgets, fitted, cfg, seed, minutes, log) -> list[dict]:
    """Pretrain the encoder on each image's planes at the bundled fine-tune's scale, then fine-tune."""
    from napari_mae.metrics import match_instances
    from napari_mae.models.decoder import load_segmenter
    from napari_mae.segmentation.learned import (
        _clip_scale,
        decoder_input,
        isotropic_factor,
        prepare_image,
        rescaled,
    )

    r_ref = float(load_segmenter("default-2d").decoder_config.object_radius)
    rows = []
    nets, before = [], []
    for i, (item, img, gt, sp, _, _) in enumerate(items):
        r = fitted.get((i, budgets[0]))
        if r is None:
            return rows
        x, info = prepare_image(img)
        spv = np.ones(x.ndim) if sp is None else np.asarray(sp, float)
        if x.ndim == 3:
            factor = isotropic_factor(spv, r, r_ref)
        else:
            factor = (_clip_scale(r_ref / (r / float(np.sqrt(spv[0] * spv[1])))),) * 2
        with tempfile.TemporaryDirectory() as tmp:
            # the planes as the decoder sees them (segment_instances, fine-tuning)
            net = pretrained_segmenter(
                rescaled(
                    decoder_input(x, invalid=info["invalid"], inverted=not info["bright_objects"]), factor
                ),
                minutes,
                seed,
                Path(tmp),
                log,
            )
        nets.append(net)
        net.fitted_radius = r  # segmented at the bundled fine-tune's radius, as it is fine-tuned
        before.append(match_instances(gt, segment(img, sp, net)))
        log(f"  {item}: pretrained encoder, before acc@0.5 {before[-1]['accuracy']:.3f} (radius {r:.3g})")
    for budget in budgets:
        after, wall, cpu, done, radii = [], [], [], [], []
        for i, ((item, img, gt, sp, where, _), b) in enumerate(zip(items, before, strict=True)):
            r = fitted.get((i, budget), fitted[i, budgets[0]])
            strokes = _strokes(gt, budget, seed, where)
            m, w, c, n, extra = _finetune_and_score(img, gt, strokes, sp, nets[i], r, cfg, log, item)
            after.append(b if m is None else m)
            wall.append(w), cpu.append(c), done.append(n)
            radii.append(f"{r:.3g} (given)")
            log(
                f"  {item}, pretrained, {budget} strokes: after acc@0.5 {after[-1]['accuracy']:.3f}, {n} steps"
            )
        rows.append(_row(name, f"+mae{minutes:g}min", budget, items, before, after, wall, cpu, done, radii))
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
    parser.add_argument(
        "--pretrain-minutes",
        type=float,
        default=0.0,
        help="also pretrain the encoder (MAE, no labels) this many minutes on each image's planes, "
        "then fine-tune that model: extra rows '<set>+mae<M>min' (default 0: off)",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE",
        help="a FinetuneConfig setting for the ablations, e.g. pseudo_distance=1 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:  # numbers and true/false as JSON, anything else as a string (pseudo_source=classical)
            options[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            options[key] = value
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
                pretrain_minutes=args.pretrain_minutes,
                options=options,
            )
        except ValueError as exc:  # e.g. strokes the fine-tuning refuses: say so, go on
            print(f"  {name}: {exc}", flush=True)
            continue
        for r in new:
            print(f"  row: {json.dumps(r)}", flush=True)
        rows += new
    print(
        f"\n{'set':<12} {'strokes':>7} {'images':>6} {'before':>7} {'after':>7} {'gain':>7} "
        f"{'ft s':>6} {'ft cpu s':>8} {'steps':>6}  radius (source)  note"
    )
    for r in rows:
        print(
            f"{r['set']:<12} {r['strokes']:>7} {r['images']:>6} {r['before']:7.3f} {r['after']:7.3f} "
            f"{r['gain']:+7.3f} {r['finetune_s']:6.1f} {r['finetune_cpu_s']:8.1f} {r['steps']:6.1f}  {r['radius']}  {r['note']}"
        )
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {_cpu() - c_all:.0f} s CPU")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
