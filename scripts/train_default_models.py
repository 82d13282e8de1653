"""Train the bundled default models and draw the README reconstruction figure.

Usage (from the repository root)::

    python scripts/train_default_models.py            # both models, then the figure
    python scripts/train_default_models.py --which 2d # one model
    python scripts/train_default_models.py --figure-only
    python scripts/train_default_models.py --quick    # a few steps, to check the script

``default-2d``: preset ``tiny-2d`` (64 x 64 crops, 8 x 8 patches, 2.1 M
parameters) on the 67 2D fluorescence nuclei images of
``../shared/data/dsb2018_fluo_nuclei_2d`` (which include ``sample_data/nuclei_2d``),
holding out ``10ba6cbee4873b32`` (the figure's image) - 4 random crops per image
and epoch, batch 16, 30 epochs (480 steps), 5 % of the files for validation.

``default-3d``: preset ``tiny-3d`` (16 x 64 x 64 crops, 4 x 8 x 8 patches, 2.2 M
parameters) on the four 3D volumes of ``../shared/data`` (Arabidopsis nuclei,
PlantSeg ovule cells, TotalSegmentator CT and MR; ``sample_data/nuclei_3d`` and
``ct_abdomen`` are copies of two of them) - 32 random crops per volume and epoch,
batch 8, 40 epochs (640 steps), no validation split (too few volumes), so the figure's 3D
rows show training volumes.

Both run on the CPU with :func:`napari_mae.training.train` (seed 0), each
bounded by ``--max-minutes`` (default 15): a run that reaches the limit is
stopped and its last checkpoint is used (the summary then says so). They are
written with :func:`napari_mae.io.checkpoint.save_checkpoint` (weights only, no
optimiser state) to ``src/napari_mae/weights/default-{2d,3d}.pt`` (about 8.5 MB
each). Measured on 2 CPU cores shared with other jobs: see the timings printed
at the end and recorded in each checkpoint's ``extra``.

The figure (``docs/images/mae_reconstruction.png``) shows, like Figure 2 of He
et al. 2022, each sample as original | masked (75 % of patches removed) |
reconstruction, made with :func:`napari_mae.reconstruction.reconstruct`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = REPO / "src" / "napari_mae" / "weights"
FIGURE = REPO / "docs" / "images" / "mae_reconstruction.png"
RUNS = REPO / "runs" / "default-models"

SPECS = {
    "2d": {
        "model": "tiny-2d",
        "data": [SHARED / "dsb2018_fluo_nuclei_2d" / "images"],
        # the README figure's image (also sample_data/nuclei_2d) is held out
        "exclude": ("*label*", "10ba6cbee4873b32*"),
        "samples_per_image": 4,
        "batch_size": 16,
        "epochs": 30,
        "val_fraction": 0.05,
    },
    "3d": {
        "model": "tiny-3d",
        "data": [
            SHARED / "arabidopsis_nuclei_3d" / "images",
            SHARED / "plantseg_ovule_cells_3d" / "images",
            SHARED / "totalsegmentator_ct_mr_3d" / "images",
        ],
        "exclude": ("*label*",),
        "samples_per_image": 32,
        "batch_size": 8,
        "epochs": 40,
        "val_fraction": 0.0,
    },
}


def train_default(which: str, *, quick: bool = False, max_minutes: float = 15.0) -> dict:
    """Train one default model and save it into the package; return a summary."""
    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models.mae import load_model
    from napari_mae.training import TrainConfig, train

    spec = SPECS[which]
    data = [p for p in spec["data"] if p.exists()]
    missing = [str(p) for p in spec["data"] if not p.exists()]
    if missing:
        print(f"[default-{which}] not found, left out: {', '.join(missing)}", file=sys.stderr)
    out = RUNS / (f"default-{which}" + ("-quick" if quick else ""))
    model_spec = spec["model"]
    if spec.get("overrides"):
        from dataclasses import replace

        from napari_mae.models.mae import PRESETS

        model_spec = replace(PRESETS[spec["model"]], **spec["overrides"])
    config = TrainConfig(
        data_dir=data,
        output_dir=out,
        model=model_spec,
        exclude=spec["exclude"],
        epochs=1 if quick else spec["epochs"],
        batch_size=spec["batch_size"],
        samples_per_image=1 if quick else spec["samples_per_image"],
        val_fraction=spec["val_fraction"],
        lr=1e-3,
        warmup_fraction=0.05,
        checkpoint_every=200,
        seed=0,
        device="cpu",
    )
    t0 = time.perf_counter()
    first = last = last_epoch = None

    def out_of_time() -> bool:
        return time.perf_counter() - t0 > 60.0 * max_minutes

    for update in train(config, stop=out_of_time):
        if update.kind == "start":
            print(f"[default-{which}] {update.message}", flush=True)
        elif update.kind == "step":
            first = update.loss if first is None else first
        elif update.kind in ("epoch", "finished", "stopped", "failed"):
            last = update
            last_epoch = update if update.kind == "epoch" else last_epoch
            print(f"[default-{which}] {update.message}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if last is None or last.kind not in ("finished", "stopped"):
        raise RuntimeError(f"default-{which}: training did not finish: {last.message if last else ''}")
    seconds = time.perf_counter() - t0
    model = load_model(str(out / "last.pt"))
    files = sorted(str(Path(f).relative_to(REPO.parent)) for f in _files(data, spec["exclude"]))
    summary = {
        "preset": spec["model"],
        "overrides": dict(spec.get("overrides", {})),
        "steps": int(last.step),
        "planned_steps": int(last.n_steps),
        "stopped_by_time_limit": last.kind == "stopped",
        "epochs": int(config.epochs),
        "batch_size": int(config.batch_size),
        "train_seconds": round(seconds, 1),
        "first_loss": float(first),
        "final_epoch_train_loss": None if last_epoch is None else float(last_epoch.loss),
        "final_val_loss": None
        if last_epoch is None or last_epoch.val_loss is None
        else float(last_epoch.val_loss),
        "files": files,
        "script": "scripts/train_default_models.py",
    }
    if not quick:
        path = save_checkpoint(MODELS / f"default-{which}.pt", model, extra=summary)
        print(f"[default-{which}] saved {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    print(f"[default-{which}] summary {summary | {'files': len(files)}}", flush=True)
    return summary


def _files(data, exclude):
    from napari_mae.training.files import find_images

    return find_images(data, exclude=exclude)


def make_figure(path: Path = FIGURE) -> Path:
    """Original | masked | reconstruction of the sample images with the default models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from napari_mae.io.readers import read_image
    from napari_mae.models.mae import load_model
    from napari_mae.reconstruction import reconstruct

    samples = [
        (
            "2D fluorescence nuclei",
            "default-2d",
            REPO / "sample_data" / "nuclei_2d" / "images" / "10ba6cbee4873b32.tif",
        ),
        ("3D nuclei (slice)", "default-3d", REPO / "sample_data" / "nuclei_3d" / "image.tif"),
        ("CT abdomen (slice)", "default-3d", REPO / "sample_data" / "ct_abdomen" / "image.nii.gz"),
    ]
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 3.1 * len(samples)), layout="constrained")
    for row, (title, model_name, file) in enumerate(samples):
        image, _spacing, _meta = read_image(file)
        model = load_model(model_name)
        result = reconstruct(image, model, mask_ratio=0.75, seed=0)
        panels = [np.asarray(image), np.asarray(result.masked), np.asarray(result.reconstruction)]
        if panels[0].ndim == 3:  # (Z, Y, X): the middle slice
            z = panels[0].shape[0] // 2
            panels = [p[z] for p in panels]
        lo, hi = np.percentile(panels[0], [1, 99.8])
        for col, (img, name) in enumerate(
            zip(panels, ("original", "masked (75 %)", "reconstruction"), strict=True)
        ):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(f"{title}\n{model_name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure written to {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", nargs="+", choices=("2d", "3d"), default=["2d", "3d"])
    parser.add_argument("--quick", action="store_true", help="one short epoch, nothing saved")
    parser.add_argument("--figure-only", action="store_true")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="time limit per model (15)")
    args = parser.parse_args(argv)
    if not args.figure_only:
        for which in args.which:
            train_default(which, quick=args.quick, max_minutes=args.max_minutes)
    if not args.no_figure and not args.quick:
        make_figure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
