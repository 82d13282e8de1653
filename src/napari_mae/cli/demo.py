"""``napari-mae demo``: the whole pipeline on the bundled samples, headless."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="mask, reconstruct, segment, score and fine-tune on the bundled samples",
        description=(
            "Runs the main job on the bundled samples (2D nuclei, 3D nuclei, abdominal CT): "
            "MAE masking and reconstruction with the default models, automatic and scribble "
            "segmentation scored against the samples' ground truth, and a short fine-tuning run. "
            "Writes label images, reconstructions, metrics.json, one PNG figure per sample and the "
            "fine-tuning run (finetune/) to --out. A non-empty --out is refused before any work "
            "unless --overwrite."
        ),
    )
    p.add_argument(
        "--out", required=True, help="output folder (created; must be new or empty unless --overwrite)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the demo's outputs (and its fine-tuning run) in a non-empty --out; other files stay",
    )
    p.add_argument(
        "--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of masks, scribbles and fine-tuning")
    p.add_argument(
        "--finetune-epochs", type=int, default=10, help="fine-tuning epochs (0 skips it; default 10)"
    )
    p.add_argument(
        "--samples",
        nargs="+",
        default=None,
        choices=["nuclei_2d", "nuclei_3d", "ct_abdomen"],
        help="which samples to run (default: all)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from napari_mae.demo import SAMPLES, check_output, run_demo

    # run_demo checks its folder too, but only after importing torch (seconds)
    check_output(Path(args.out), overwrite=args.overwrite)
    run_demo(
        args.out,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        finetune_epochs=args.finetune_epochs,
        samples=tuple(args.samples or SAMPLES),
        overwrite=args.overwrite,
    )
    print(f"results written to {args.out}")
    return 0
