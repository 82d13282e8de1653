"""A native 3D decoder trained on synthetic nuclei, against the 2D model's plane stacks, on the 3D dev sets.

Usage (from the repository root; the dev sets in ``../shared/data``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_native3d.py --out /tmp/native3d

1. Makes ``--volumes`` synthetic 3D nuclei volumes (seeded; :func:`synthetic_nuclei`):
   touching ellipsoids of random size, orientation and brightness with a chromatin-like
   texture, blurred more along Z than in Y-X, on an uneven background with noise. The dev
   sets are never trained on.
2. Trains a 3D decoder on the bundled ``default-3d`` MAE encoder (a ``tiny-3d``) with
   ``napari-mae train``'s segmentation task (:func:`napari_mae.training.segmentation.train_segmentation`)
   for ``--epochs`` (stopped after ``--minutes`` of wall clock) on this CPU, one thread,
   bfloat16 autocast.
3. Scores, through :func:`napari_mae.segmentation.segment_instances` and no per-volume
   setting, the 3D decoder (``info["decoder"] == "3d"``), the bundled 2D model on the
   three plane stacks (``"planes"``) and the classical pipeline on ``arabidopsis_nuclei_3d``
   and ``stardist_nuclei_3d``: acc@0.5, F1, precision, recall, mAP 0.5:0.95 (as
   ``bench_learned.py``) and seconds per megavoxel.

One JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learned import SETS_3D, SHARED, score  # noqa: E402


def synthetic_nuclei(seed: int, shape=(48, 80, 80), radius=(4.0, 8.0), fill=0.3):
    """One synthetic nuclei volume and its instance labels (isotropic voxels).

    Parameters
    ----------
    seed : int
    shape : tuple of 3 int
        (Z, Y, X) voxels.
    radius : (float, float)
        Range of the mean ellipsoid radius, voxels.
    fill : float
        Fraction of the volume the nuclei are placed to fill (before overlap is removed).

    Returns
    -------
    image : ndarray of uint16, shape ``shape``
    labels : ndarray of uint16, shape ``shape``
    """
    from scipy import ndimage as ndi
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float32)
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.2).astype(np.float32)
    texture /= texture.std() + 1e-6
    centres, radii = [], []
    budget = fill * np.prod(shape)
    used, tries = 0.0, 0
    while used < budget and tries < 5000:
        tries += 1
        r = rng.uniform(*radius)
        c = np.array([rng.uniform(0, s) for s in shape])
        # touching is allowed, deep overlap is not
        if any(np.linalg.norm(c - c2) < 0.85 * (r + r2) for c2, r2 in zip(centres, radii, strict=True)):
            continue
        centres.append(c)
        radii.append(r)
        axes = r * rng.uniform(0.75, 1.25, 3)
        rot = Rotation.random(random_state=rng).as_matrix()
        half = int(np.ceil(axes.max())) + 1
        lo = np.maximum(np.floor(c).astype(int) - half, 0)
        hi = np.minimum(np.floor(c).astype(int) + half + 1, shape)
        if np.any(hi <= lo):
            continue
        grid = np.stack(
            np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
        )
        local = (grid - c) @ rot  # coordinates in the ellipsoid's frame
        inside = ((local / axes) ** 2).sum(-1) <= 1.0
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        free = inside & (labels[box] == 0)
        labels[box][free] = len(centres)
        brightness = rng.uniform(0.35, 1.0)
        signal[box][free] = brightness * (1.0 + 0.25 * texture[box][free])
        used += 4.0 / 3.0 * np.pi * np.prod(axes)
    sigma = (rng.uniform(1.0, 2.2), *(rng.uniform(0.6, 1.3),) * 2)  # the PSF is longer along Z
    image = ndi.gaussian_filter(signal, sigma)
    z, y, x = np.indices(shape, dtype=np.float32)
    background = rng.uniform(0.02, 0.15) * (1 + 0.5 * (y / shape[1]) * rng.uniform(-1, 1))
    image = image + background + rng.normal(0, rng.uniform(0.02, 0.25), shape).astype(np.float32)
    image = np.clip(image * 3000 + 100, 0, 65535).astype(np.uint16)
    labels, _, _ = _relabel(labels)
    return image, labels


def _relabel(labels):
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)


def make_data(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    for k in range(n):
        img, lab = synthetic_nuclei(seed + k)
        tifffile.imwrite(images / f"synth{k:02d}.tif", img)
        tifffile.imwrite(labels / f"synth{k:02d}.tif", lab.astype(np.uint16))
    return images, labels


def train(images, labels, out: Path, minutes: float, args) -> tuple[Path, dict]:
    from napari_mae.training.segmentation import SegmentationConfig, train_segmentation

    cfg = SegmentationConfig(
        images, labels, out, model="default-3d", features=args.features, object_radius=args.object_radius,
        crop_size_3d=args.crop, samples_per_image=args.samples, epochs=args.epochs, batch_size=args.batch_size, lr=2e-3,
        val_fraction=0.17, frozen_epochs=1, device="cpu", amp=True, checkpoint_every=0, seed=0,
        overwrite=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    deadline = t0 + 60.0 * minutes
    last: dict = {}
    steps = 0
    for u in train_segmentation(cfg, stop=lambda: time.perf_counter() > deadline):
        if u.kind == "step":
            steps += 1
        if u.kind in ("epoch", "finished", "start"):
            print(json.dumps({"train": u.kind, "message": u.message}), flush=True)
        if u.kind == "epoch":
            last = dict(u.metrics)
    best = out / "best.pt"
    return (best if best.is_file() else out / "last.pt"), {
        "train_seconds": round(time.perf_counter() - t0, 1),
        "steps": steps,
        **last,
    }


def evaluate(model_3d: Path) -> list[dict]:
    from napari_mae.segmentation import segment_instances

    rows = []
    for name, spacing in SETS_3D.items():
        folder = SHARED / name
        f = sorted((folder / "images").glob("*.tif"))[0]
        vol = tifffile.imread(f)
        gt = tifffile.imread(folder / "labels" / f.name).astype(np.int32)
        runs = [("learned", str(model_3d)), ("learned", "default-2d"), ("classical", None)]
        for method, model in runs:
            t0 = time.perf_counter()
            labels, info = segment_instances(vol, spacing=spacing, method=method, model=model)
            seconds = time.perf_counter() - t0
            rows.append({"set": name, "method": method, "decoder": info.get("decoder", "-"),
                         **score([(gt, labels)]), "s_per_MVox": round(seconds / (gt.size / 1e6), 2),
                         "radius": round(float(info["radius"]), 3)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--epochs", type=int, default=7, help="epochs (the schedule's length; default 7, about 6 CPU-minutes)"
    )
    ap.add_argument("--samples", type=int, default=6, help="crops per volume and epoch (default 6)")
    ap.add_argument(
        "--minutes", type=float, default=7.0, help="stop training after this wall clock (default 7)"
    )
    ap.add_argument("--volumes", type=int, default=12, help="synthetic training volumes (default 12)")
    ap.add_argument("--features", type=int, default=8, help="decoder width (default 8)")
    ap.add_argument("--object-radius", type=float, default=6.0, help="decoder object radius, voxels")
    ap.add_argument("--crop", type=int, default=48, help="training crop side, voxels (default 48)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="work folder (data and run)")
    ap.add_argument("--model", type=Path, default=None, help="score this 3D checkpoint, no training")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.model is None:
        t0 = time.perf_counter()
        images, labels = make_data(args.out / "synthetic", args.volumes, 1000 + args.seed)
        print(json.dumps({"data_seconds": round(time.perf_counter() - t0, 1), "volumes": args.volumes}))
        ckpt, summary = train(images, labels, args.out / "run", args.minutes, args)
        print(json.dumps({"checkpoint": str(ckpt), **summary}), flush=True)
    else:
        ckpt = args.model
    evaluate(ckpt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
