"""Train the bundled 2D model: the MAE (``default-2d.pt``) and its nuclei decoder (``default-2d-nuclei.pt``).

Usage (from the repository root)::

    python scripts/train_bundled_2d.py                 # both stages, then the weights into the package
    python scripts/train_bundled_2d.py --stage mae     # MAE pretraining only (resumable: --resume)
    python scripts/train_bundled_2d.py --stage decoder # decoder only, on runs/bundled-2d/mae/best.pt
    python scripts/train_bundled_2d.py --quick         # a few steps of each, nothing saved into the package

Stage 1, **MAE pretraining** (:func:`napari_mae.training.train`): preset ``tiny-2d``
(64 x 64 crops, 8 x 8 patches), ``norm_pix_loss``, mask ratio 0.75, on the pixels of
the 382 DSB 2018 training images (``../shared/data/dsb2018_fluo_train_2d``) and of the 68
development images (``dsb2018_fluo_nuclei_2d``) without their labels, 4 crops per image
and epoch, batch 32, 100 epochs (5,400 steps), 5 % of the files for validation, lr 1e-3,
bounded by ``--mae-minutes`` (40).

Stage 2, **the nuclei decoder** (:class:`napari_mae.models.decoder.InstanceDecoder`,
features 16) on the MAE's encoder, trained on the 382 *training* images and their labels
only (19 held out by a seeded permutation to select the best checkpoint by acc@0.5).
Each image is resampled so that its nuclei's median radius is 8 pixels, its targets are
:func:`napari_mae.segmentation.targets.distance_targets`, and crops of 112 x 112 are
augmented as in :mod:`napari_mae.training.segmentation` (flips, rot90, random zoom
0.75-1.33, intensity scale, gamma, noise); loss
:func:`napari_mae.training.segmentation.segmentation_loss`. AdamW, lr 2e-3 for the
decoder with 50 warm-up steps and a cosine decay over 3,000 steps or ``--decoder-minutes``
(60), whichever ends first; the encoder is frozen for the first 30 % and then trains at
a tenth of the rate.

This stage has its own small loop (it was written before the segmentation objective of
the training loop): the recipe is the one :class:`~napari_mae.training.segmentation.
SegmentationObjective` runs for ``napari-mae train IMAGES --labels LABELS``, with a
time-based schedule, since the CPU it was run on was shared. Both stages print their
wall and CPU time. ``--encoder random`` and ``--no-encoder`` train the ablations
(randomly initialised encoder; the convolutional branch alone), ``--limit N`` on the
first N training images (label efficiency); ``--radius`` and ``--features`` set the
decoder's object radius and width, ``--bf16`` trains under bfloat16 autocast. The decoder
stage runs on CUDA when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN = SHARED / "dsb2018_fluo_train_2d"
DEV = SHARED / "dsb2018_fluo_nuclei_2d"
RUNS = REPO / "runs" / "bundled-2d"
N_VAL = 19


def pretrain_mae(out: Path, *, minutes: float, quick: bool, resume: bool) -> Path:
    """Stage 1; returns the path of the best MAE checkpoint."""
    from napari_mae.training import TrainConfig, train

    cfg = TrainConfig(
        data_dir=[TRAIN / "images", DEV / "images"],
        output_dir=out,
        model="tiny-2d",
        exclude=("*label*",),
        epochs=1 if quick else 100,
        batch_size=32,
        samples_per_image=1 if quick else 4,
        val_fraction=0.05,
        lr=1e-3,
        warmup_fraction=0.05,
        checkpoint_every=200,
        seed=0,
        device="auto",
        resume=resume,
        overwrite=not resume,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    for u in train(cfg, stop=lambda: time.perf_counter() - t0 > 60 * minutes):
        if u.kind != "step":
            print(f"[mae] {u.message}", flush=True)
    print(f"[mae] wall {time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s", flush=True)
    return out / "best.pt"


def split_files(limit: int | None = None) -> tuple[list[Path], list[Path]]:
    """Training and held-out files of the training split (seeded permutation)."""
    files = sorted((TRAIN / "images").glob("*.tif"))
    order = np.random.default_rng(0).permutation(len(files))
    val = [files[i] for i in order[:N_VAL]]
    train = [files[i] for i in order[N_VAL:]]
    return (train[:limit] if limit else train), val


def _pair(f: Path):
    return f, TRAIN / "labels" / f.name


def train_decoder(mae: str, out: Path, *, args) -> Path:
    """Stage 2; returns the path of the best segmentation checkpoint."""
    import torch

    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.metrics import match_instances, summarize_matches
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder
    from napari_mae.models.mae import build_model, load_model
    from napari_mae.segmentation.learned import LearnedParams, median_radius, segment_plane
    from napari_mae.segmentation.targets import distance_targets
    from napari_mae.training.segmentation import (
        _read_pair,
        _rescaled_pair,
        _train_transforms,
        segmentation_loss,
    )

    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    encoder = build_model("tiny-2d") if mae == "random" else load_model(mae)
    conf = DecoderConfig(features=args.features, object_radius=args.radius)
    net = InstanceDecoder(encoder.train(), conf, use_encoder=not args.no_encoder)
    net.normalization = dict(encoder.normalization)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    t0, c0 = time.perf_counter(), time.process_time()
    train_files, val_files = split_files(args.limit)
    data = []
    for f in train_files:
        image, labels, _ = _read_pair(*_pair(f))
        image, labels = _rescaled_pair(image, labels, conf.object_radius)
        data.append({"image": image[None], "target": distance_targets(labels)})
    print(f"[decoder] {len(data)} training images prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    from monai.utils import set_determinism

    set_determinism(args.seed)
    tf = _train_transforms(args.crop)
    enc = list(net.encoder.parameters())
    dec = net.decoder_parameters()
    opt = torch.optim.AdamW([{"params": dec, "lr": args.lr}, {"params": enc, "lr": 0.0}], weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    budget = 60 * args.decoder_minutes
    steps = 20 if args.quick else args.steps
    best, log, step = -1.0, [], 0
    tstart = time.perf_counter()

    def evaluate() -> dict:
        net.eval()
        results = []
        for f in val_files:
            image, labels, _ = _read_pair(*_pair(f))
            pred, _ = segment_plane(
                net,
                image,
                median_radius(labels),
                conf.object_radius,
                LearnedParams(rescale_tolerance=math.inf),
            )
            results.append(match_instances(labels, pred, iou_threshold=0.5))
        net.train()
        return summarize_matches(results)

    while True:
        step += 1
        # progress by steps or by the time budget, whichever is further (the CPU was shared)
        prog = max(step / steps, (time.perf_counter() - tstart) / budget)
        frozen = prog < 0.3 or args.no_encoder
        net.freeze_encoder = frozen
        f = step / 50 if step < 50 else 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
        opt.param_groups[0]["lr"] = args.lr * f
        opt.param_groups[1]["lr"] = 0.0 if frozen else 0.1 * args.lr * f
        idx = rng.integers(0, len(data), args.batch)
        items = [tf(dict(data[i])) for i in idx]
        x = torch.stack([torch.as_tensor(np.asarray(it["image"])) for it in items]).float().to(device)
        t = torch.stack([torch.as_tensor(np.asarray(it["target"])) for it in items]).float().to(device)
        # bfloat16 autocast halves the step's CPU time on a CPU with native bf16 (0.43 vs 0.88 s
        # for batch 8 of 112^2, one thread); the loss is taken in float32
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            y = net(x)
        loss = segmentation_loss(y.float(), t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - tstart
        done = elapsed > budget or step >= steps
        if step % args.val_every == 0 or done:
            s = evaluate()
            log.append({"step": step, "loss": float(loss.detach()), "val": s, "elapsed_s": elapsed})
            print(
                f"[decoder] step {step}: loss {float(loss.detach()):.4f}, val acc@0.5 {s['accuracy']:.3f}",
                flush=True,
            )
            extra = {
                "step": step,
                "val": s,
                "script": "scripts/train_bundled_2d.py",
                "args": {k: str(v) for k, v in vars(args).items()},
            }
            save_checkpoint(out / "last.pt", net, extra=extra)
            if s["accuracy"] > best:
                best = s["accuracy"]
                save_checkpoint(out / "best.pt", net, extra=extra)
            (out / "log.json").write_text(json.dumps(log, indent=1))
        if done:
            break
    print(
        f"[decoder] {step} steps, wall {time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s, "
        f"best val acc@0.5 {best:.3f}",
        flush=True,
    )
    return out / "best.pt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("all", "mae", "decoder"), default="all")
    ap.add_argument(
        "--quick", action="store_true", help="a few steps of each stage; nothing into the package"
    )
    ap.add_argument("--resume", action="store_true", help="resume the MAE stage")
    ap.add_argument("--mae-minutes", type=float, default=40.0)
    ap.add_argument("--decoder-minutes", type=float, default=60.0)
    ap.add_argument("--encoder", default=None, help="MAE checkpoint for the decoder, or 'random'")
    ap.add_argument("--no-encoder", action="store_true", help="ablation: the convolutional branch alone")
    ap.add_argument("--limit", type=int, default=None, help="train the decoder on the first N images")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--radius", type=float, default=8.0, help="object radius (pixels) the decoder trains at")
    ap.add_argument("--features", type=int, default=16, help="channels of the full-resolution level")
    ap.add_argument("--bf16", action="store_true", help="train the decoder under bfloat16 autocast")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RUNS)
    args = ap.parse_args(argv)
    mae_best = args.out / "mae" / "best.pt"
    if args.stage in ("all", "mae"):
        mae_best = pretrain_mae(
            args.out / "mae", minutes=args.mae_minutes, quick=args.quick, resume=args.resume
        )
    if args.stage in ("all", "decoder"):
        best = train_decoder(args.encoder or str(mae_best), args.out / "decoder", args=args)
        if not args.quick and args.stage == "all":
            import shutil

            from napari_mae._names import WEIGHTS_DIR

            shutil.copyfile(best, WEIGHTS_DIR / "default-2d-nuclei.pt")
            print(f"[decoder] copied {best} to {WEIGHTS_DIR / 'default-2d-nuclei.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
