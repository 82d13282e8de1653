"""Training throughput on CPU: real data pipeline vs synthetic in-memory tensors.

For each preset, in one process and one run, times ``--steps`` pairs of
optimiser steps (forward with a random 75 % mask, MAE loss, backward, gradient
clipping, AdamW), alternating between a step

* fed by the real pipeline of :mod:`napari_mae.training.data` (MONAI ``CacheDataset``
  prefix + per-sample seeded random crop/flip/rotate, ``DataLoader`` with
  ``--num-workers`` workers) over a real image folder, and
* and a step fed by synthetic tensors already in memory (the same shapes),

and prints the median seconds per step, images/s, megavoxels/s (crop voxels
processed per second), the time spent waiting for the pipeline's batch and its
share of the pipeline-fed step, and the overhead ``1 - t_synthetic / t_pipeline``
(target <= 20 %; on a machine shared with other jobs the fetch share is the
steadier of the two).
Cache filling (reading the files once) is timed separately: it happens once
per run, not per step.

Usage (from the repository root)::

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --presets tiny-2d tiny-3d --steps 20 --num-workers 0 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# Real images: ../shared/data where present, else the bundled samples.
DATA_2D = [SHARED / "dsb2018_fluo_nuclei_2d" / "images"]
DATA_3D = [
    SHARED / "arabidopsis_nuclei_3d" / "images",
    SHARED / "plantseg_ovule_cells_3d" / "images",
    SHARED / "totalsegmentator_ct_mr_3d" / "images",
]
SAMPLES_2D = [REPO / "sample_data" / "nuclei_2d" / "images"]
SAMPLES_3D = [REPO / "sample_data" / "nuclei_3d", REPO / "sample_data" / "ct_abdomen"]
BATCH = {"tiny-2d": 16, "small-2d": 8, "tiny-3d": 4, "small-3d": 1}


def _step(model, optimizer, x, gen) -> None:
    """One training step as in :func:`napari_mae.training.train` (CPU, no autocast)."""
    pred, mask = model(x, generator=gen)
    loss = model.loss(x, pred, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _interleaved(model, optimizer, synthetic, batches, steps: int, warmup: int) -> dict:
    """Alternate a synthetic-fed and a pipeline-fed step; median seconds of each.

    Interleaving makes load from other processes on a shared machine hit both
    feeds alike; medians ignore the spikes.
    """
    gen = torch.Generator().manual_seed(0)
    syn, fetch, pipe = [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _step(model, optimizer, synthetic[i % len(synthetic)], gen)
        t1 = time.perf_counter()
        x = next(batches)
        t2 = time.perf_counter()
        _step(model, optimizer, x, gen)
        t3 = time.perf_counter()
        if i >= warmup:
            syn.append(t1 - t0)
            fetch.append(t2 - t1)
            pipe.append(t3 - t1)
    return {
        "synthetic": statistics.median(syn),
        "fetch": statistics.median(fetch),
        "pipeline": statistics.median(pipe),
    }


def _cycle(loader):
    while True:
        yield from loader


def bench_preset(name: str, *, steps: int, warmup: int, num_workers: list[int]) -> list[dict]:
    from torch.utils.data import DataLoader

    from napari_mae.models.mae import build_model
    from napari_mae.training.data import make_datasets

    torch.manual_seed(0)
    model = build_model(name)
    conf = model.config
    batch = BATCH.get(name, 4)
    voxels = math.prod(conf.img_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sources = [p for p in (DATA_2D if conf.spatial_dims == 2 else DATA_3D) if p.exists()]
    if not sources:
        sources = SAMPLES_2D if conf.spatial_dims == 2 else SAMPLES_3D

    t0 = time.perf_counter()
    data = make_datasets(
        sources,
        spatial_dims=conf.spatial_dims,
        img_size=conf.img_size,
        val_fraction=0.0,
        exclude=("*label*",),
        samples_per_image=64,
    )
    cache_s = time.perf_counter() - t0

    rows = []
    synthetic = [torch.rand(batch, conf.in_channels, *conf.img_size) for _ in range(4)]
    for workers in num_workers:
        loader = DataLoader(data.train, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
        t = _interleaved(model, optimizer, synthetic, _cycle(loader), steps, warmup)
        for kind in ("synthetic", "pipeline"):
            rows.append(
                {
                    "preset": name,
                    "crop": "x".join(map(str, conf.img_size)),
                    "batch": batch,
                    "feed": kind if kind == "synthetic" else f"pipeline, {workers} workers",
                    "s/step": t[kind],
                    "img/s": batch / t[kind],
                    "MVox/s": batch * voxels / t[kind] / 1e6,
                    "fetch": "" if kind == "synthetic" else f"{t['fetch'] * 1e3:.0f} ms",
                    "fetch share": "" if kind == "synthetic" else f"{100 * t['fetch'] / t['pipeline']:.1f} %",
                    "overhead": ""
                    if kind == "synthetic"
                    else f"{100 * (1 - t['synthetic'] / t['pipeline']):+.1f} %",
                }
            )
        del loader
    files = len(data.train_files)
    print(f"  {name}: cache of {files} files filled in {cache_s:.1f} s (once per run)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-2d", "small-2d", "tiny-3d"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.steps} timed steps per row"
    )
    rows = []
    for name in args.presets:
        rows += bench_preset(name, steps=args.steps, warmup=args.warmup, num_workers=args.num_workers)
    header = [
        "preset",
        "crop",
        "batch",
        "feed",
        "s/step",
        "img/s",
        "MVox/s",
        "fetch",
        "fetch share",
        "overhead",
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            f"{r[h]:.3f}"
            if h in ("s/step", "MVox/s")
            else f"{r[h]:.1f}"
            if isinstance(r[h], float)
            else str(r[h])
            for h in header
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nmedian over interleaved steps; fetch = time waiting for the pipeline's batch, fetch share = "
        "fetch / pipeline step (the direct measure); overhead = 1 - t_synthetic / t_pipeline (also "
        "carries the noise of other processes on a shared machine); target <= 20 %."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
