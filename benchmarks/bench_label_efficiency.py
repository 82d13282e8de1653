"""Label efficiency of the decoder: MAE-pretrained vs randomly initialised encoder.

Usage (from the repository root; the data in ``../shared/data``)::

    python benchmarks/bench_label_efficiency.py                       # sizes 1 2 5 10 50 382, seeds 0 1 2
    python benchmarks/bench_label_efficiency.py --sizes 1 10 --seeds 0 --steps 40 --dev-limit 10

For each number N of labelled training images (drawn, per seed, from the DSB training
split ``dsb2018_fluo_train_2d``) and each encoder — the bundled MAE (``default-2d``) and
the same architecture randomly initialised (preset ``tiny-2d``) — a decoder is trained
through :func:`napari_mae.training.segmentation.train_segmentation` (the shared loop, the
CLI's recipe: encoder frozen for the first third, then everything at 0.1x the rate) for
about the same number of steps whatever N, then scored on the DSB dev set through
``segment_instances(method="learned")``, automatic, as users run it. Prints acc@0.5 per
run, then mean ± sd over seeds per (N, encoder), and the MAE - random difference beside
the seeds' spread. Results go to ``--out`` (JSON lines; a rerun skips finished runs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN = SHARED / "dsb2018_fluo_train_2d"
DEV = SHARED / "dsb2018_fluo_nuclei_2d"
ENCODERS = {"mae": "default-2d", "random": "tiny-2d"}


def schedule(n_images: int, steps: int, batch: int) -> tuple[int, int, int]:
    """(samples_per_image, epochs, frozen_epochs) giving about ``steps`` optimiser steps."""
    samples = max(1, math.ceil(steps * batch / (6 * n_images)))
    epochs = max(2, round(steps * batch / (n_images * samples)))
    return samples, epochs, max(1, round(epochs / 3))


def train_one(files, encoder: str, seed: int, out: Path, *, steps: int, batch: int) -> tuple[Path, int]:
    from napari_mae.training.segmentation import SegmentationConfig, train_segmentation

    samples, epochs, frozen = schedule(len(files), steps, batch)
    # the labels folder must hold exactly the chosen images' labels (extra names are an error)
    labels_dir = out.parent / f"{out.name}_labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = labels_dir / f.name
        if not link.exists():
            link.symlink_to(TRAIN / "labels" / f.name)
    cfg = SegmentationConfig(
        data_dir=files,
        labels_dir=labels_dir,
        output_dir=out,
        model=ENCODERS[encoder],
        samples_per_image=samples,
        epochs=epochs,
        frozen_epochs=frozen,
        batch_size=batch,
        val_fraction=0.0,
        seed=seed,
        device="cpu",
        overwrite=True,
        checkpoint_every=0,
    )
    n = 0
    for _ in train_segmentation(cfg):
        n += 1
    return out / "last.pt", n


def score_dev(model: Path, limit: int | None) -> dict:
    import tifffile

    from napari_mae.segmentation import segment_instances
    from napari_mae.segmentation.metrics import match_instances, summarize_matches

    results = []
    for f in sorted((DEV / "images").glob("*.tif"))[:limit]:
        img = tifffile.imread(f)
        gt = tifffile.imread(DEV / "labels" / f.name).astype(np.int32)
        rgb = img.ndim == 3 and img.shape[-1] in (3, 4)
        pred, _ = segment_instances(img, method="learned", model=str(model), channel_axis=-1 if rgb else None)
        results.append(match_instances(gt, pred, iou_threshold=0.5))
    return summarize_matches(results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 5, 10, 50, 382])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps per run (about)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dev-limit", type=int, default=None, help="score on the first N dev images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/label_efficiency"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["n"], r["encoder"], r["seed"])] = r
    pool = sorted((TRAIN / "images").glob("*.tif"))
    for n in args.sizes:
        for seed in args.seeds:
            # the same N images for both encoders of a seed
            files = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
            for enc in args.encoders:
                key = (n, enc, seed)
                if key in done:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                ckpt, steps = train_one(
                    files, enc, seed, args.out / f"n{n}_{enc}_s{seed}", steps=args.steps, batch=args.batch
                )
                t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
                s = score_dev(ckpt, args.dev_limit)
                r = {"n": n, "encoder": enc, "seed": seed, "steps": steps, "acc@0.5": round(s["accuracy"], 4),
                     "f1": round(s["f1"], 4), "train_wall_s": round(t_train), "train_cpu_s": round(c_train),
                     "dev_images": args.dev_limit or 68}  # fmt: skip
                done[key] = r
                with log.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)
    print(f"\n{'N':>4} {'MAE encoder':>16} {'random encoder':>16} {'MAE - random':>13}")
    for n in args.sizes:
        row = {}
        for enc in args.encoders:
            v = [done[(n, enc, s)]["acc@0.5"] for s in args.seeds if (n, enc, s) in done]
            row[enc] = (np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0) if v else None
        cells = [f"{row[e][0]:.3f} ± {row[e][1]:.3f}" if row.get(e) else "-" for e in ("mae", "random")]
        diff = f"{row['mae'][0] - row['random'][0]:+.3f}" if row.get("mae") and row.get("random") else "-"
        print(f"{n:>4} {cells[0]:>16} {cells[1]:>16} {diff:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
