"""What the adversarial term does to MAE reconstructions: weights 0, 0.01 and 0.1 from the same start.

From the bundled ``default-2d`` MAE, MAE training continues for the same number of steps
at each ``adversarial_weight`` (same seed: the same crops, masks and order in every run;
:func:`napari_mae.training.train`, so the discriminator trains as it does for a user).
Then each model reconstructs the same held-out images with the same patch masks
(``mask_ratio`` 0.75, :func:`napari_mae.reconstruction.reconstruct`, windows without
overlap so every removed patch is one prediction, not an average), and the script prints:

* ``NRMSE`` - on the removed pixels only, per image
  ``skimage.metrics.normalized_root_mse`` (Euclidean normalisation: ``||rec - orig|| /
  ||orig||``), averaged over the images;
* ``HF ratio (lap)`` - sharpness: Laplacian energy (``scipy.ndimage.laplace``, squared,
  summed) of the reconstruction over the interiors of the removed patches (pixels whose
  3x3 neighbourhood lies in the same patch, so seams between patches do not count),
  divided by the original's there; pooled over the images. 1 = as sharp as the original;
  a blurry reconstruction is below 1;
* ``HF ratio (fft)`` - the same ratio for spectral energy above the radial frequency
  0.25 cycles/pixel (half Nyquist) of each removed patch, its mean removed;
* ``seconds`` - wall time of the training run (CPU seconds of this process beside it);

and each figure's ratio to the weight-0 run of the same process.

Data: training on the DSB 2018 training split ``dsb2018_fluo_train_2d`` (its 382 images,
no validation split); evaluation on 20 images of the dev set ``dsb2018_fluo_nuclei_2d``
(their pixels only, no labels; chosen with the seed), each cropped to its central
256 x 256.

Usage::

    python benchmarks/bench_adversarial.py              # 480 steps of 16 crops per weight (about 10 CPU-min)
    python benchmarks/bench_adversarial.py --quick      # 24 steps, 4 images: a smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("NAPARI_MAE_DATA", "/work/shared/data"))
TRAIN = DATA / "dsb2018_fluo_train_2d" / "images"
DEV = DATA / "dsb2018_fluo_nuclei_2d" / "images"
WEIGHTS = (0.0, 0.01, 0.1)


def _train(weight: float, out: Path, args) -> tuple[Path, float, float, dict]:
    """Continue default-2d for ``args.epochs`` epochs at ``weight``; (checkpoint, wall s, CPU s, last metrics)."""
    from napari_mae.training import TrainConfig, train

    config = TrainConfig(
        data_dir=TRAIN,
        output_dir=out,
        model="default-2d",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=0.0,
        checkpoint_every=0,
        seed=args.seed,
        device="cpu",
        adversarial_weight=weight,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    last: dict = {}
    steps = 0
    for update in train(config):
        if update.kind == "start":
            print(f"  w={weight}: {update.message}", file=sys.stderr)
        elif update.kind == "step":
            steps = update.step
            if update.metrics:
                last = {k: v for k, v in update.metrics.items() if k in ("mse", "adversarial", "d_loss")}
        elif update.kind == "failed":
            raise RuntimeError(update.message)
    last["steps"] = steps
    return out / "last.pt", time.perf_counter() - t0, time.process_time() - c0, last


def _dev_images(n: int, seed: int) -> list[np.ndarray]:
    """``n`` dev images (seeded choice), each its central 256 x 256, as float32 2D arrays."""
    from napari_mae.io.readers import read_image

    files = sorted(p for p in DEV.iterdir() if p.is_file())
    pick = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    out = []
    for i in sorted(pick):
        image, _, meta = read_image(files[i])
        image = np.asarray(image)
        if image.ndim == 3:  # a channel axis: these are nuclear stains, keep the first channel
            axis = meta.get("axes", "").find("C")
            image = np.take(image, 0, axis=axis if axis >= 0 else -1)
        y0, x0 = (image.shape[0] - 256) // 2, (image.shape[1] - 256) // 2
        out.append(image[y0 : y0 + 256, x0 : x0 + 256].astype(np.float32))
    return out


def _hf_energy_fft(blocks: np.ndarray, cut: float = 0.25) -> float:
    """Spectral energy above ``cut`` cycles/pixel of (K, p, p) blocks, each block's mean removed."""
    blocks = blocks - blocks.mean(axis=(1, 2), keepdims=True)
    spec = np.abs(np.fft.fft2(blocks)) ** 2
    fy = np.fft.fftfreq(blocks.shape[1])[:, None]
    fx = np.fft.fftfreq(blocks.shape[2])[None, :]
    return float(spec[:, np.hypot(fy, fx) > cut].sum())


def _evaluate(model, images: list[np.ndarray], seed: int) -> dict:
    """NRMSE and the two HF ratios of ``model`` on ``images`` (mask seed ``seed + i`` for image i)."""
    from scipy import ndimage
    from skimage.metrics import normalized_root_mse

    from napari_mae.reconstruction import reconstruct

    nrmse, lap_rec, lap_orig, fft_rec, fft_orig, masks = [], 0.0, 0.0, 0.0, 0.0, []
    py, px = model.config.patch_size
    for i, image in enumerate(images):
        res = reconstruct(
            image, model, mask_ratio=0.75, seed=seed + i, device="cpu", batch_size=16, overlap=0.0
        )
        rec = res.reconstruction.astype(np.float64)
        orig = image.astype(np.float64)
        removed = res.mask
        masks.append(res.patch_mask)
        nrmse.append(normalized_root_mse(orig[removed], rec[removed]))
        yy, xx = np.indices(removed.shape)
        interior = removed & (yy % py != 0) & (yy % py != py - 1) & (xx % px != 0) & (xx % px != px - 1)
        lap_rec += float((ndimage.laplace(rec)[interior] ** 2).sum())
        lap_orig += float((ndimage.laplace(orig)[interior] ** 2).sum())
        gy, gx = np.nonzero(res.patch_mask)
        blocks_rec = np.stack([rec[a * py : (a + 1) * py, b * px : (b + 1) * px] for a, b in zip(gy, gx)])
        blocks_orig = np.stack([orig[a * py : (a + 1) * py, b * px : (b + 1) * px] for a, b in zip(gy, gx)])
        fft_rec += _hf_energy_fft(blocks_rec)
        fft_orig += _hf_energy_fft(blocks_orig)
    return {
        "nrmse": float(np.mean(nrmse)),
        "lap": lap_rec / lap_orig,
        "fft": fft_rec / fft_orig,
        "masks": masks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs over the 382 training images (20)")
    parser.add_argument("--batch-size", type=int, default=16, help="crops per step (16)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak MAE learning rate (1e-4: continuing)")
    parser.add_argument("--images", type=int, default=20, help="held-out dev images (20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 4 images: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.images = 1, 4
    if not TRAIN.is_dir() or not DEV.is_dir():
        print(f"needs {TRAIN} and {DEV} (set NAPARI_MAE_DATA)", file=sys.stderr)
        return 2

    import torch

    from napari_mae.models.mae import load_model

    torch.set_num_threads(args.threads)
    images = _dev_images(args.images, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = load_model("default-2d")
        base = _evaluate(start, images, seed=1000)
        rows.append(("start (default-2d)", base, math.nan, math.nan, {}))
        for weight in WEIGHTS:
            ckpt, wall, cpu, last = _train(weight, Path(tmp) / f"w{weight}", args)
            result = _evaluate(load_model(str(ckpt)), images, seed=1000)
            assert all(np.array_equal(a, b) for a, b in zip(result["masks"], base["masks"], strict=True))
            rows.append((f"{weight:g}", result, wall, cpu, last))

    steps = rows[1][4].get("steps")
    print(
        f"adversarial_weight from default-2d: {steps} steps of {args.batch_size} crops per weight, lr {args.lr:g}, "
        f"seed {args.seed}; {len(images)} dev images (256x256), mask_ratio 0.75, the same masks for all"
    )
    ref = rows[1][1]
    head = (
        f"{'weight':>20} {'NRMSE':>7} {'HF lap':>7} {'HF fft':>7} {'seconds':>8} {'CPU s':>7}"
        f" {'NRMSE/w0':>9} {'lap/w0':>7} {'fft/w0':>7} {'d_loss':>7} {'L_adv':>7}"
    )
    print(head)
    for name, r, wall, cpu, last in rows:
        print(
            f"{name:>20} {r['nrmse']:7.4f} {r['lap']:7.3f} {r['fft']:7.3f} {wall:8.0f} {cpu:7.0f}"
            f" {r['nrmse'] / ref['nrmse']:9.3f} {r['lap'] / ref['lap']:7.3f} {r['fft'] / ref['fft']:7.3f}"
            f" {last.get('d_loss', math.nan):7.3f} {last.get('adversarial', math.nan):7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
