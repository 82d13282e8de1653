"""``napari-mae finetune``: adapt a learned segmentation model to your images from a few strokes.

Examples
--------
Fine-tune the bundled nuclei model on one image and its scribbles (1 = background,
2 = object) for 60 s, then segment with it::

    napari-mae finetune cells.tif --scribbles cells_strokes.tif --out cells_model.pt
    napari-mae segment cells.tif --method learned --model cells_model.pt --out labels.tif

Several images, objects corrected whole in a labels image, a step budget::

    napari-mae finetune a.tif b.tif --scribbles a_s.tif b_s.tif --labels a_fixed.tif none \\
        --out model.pt --steps 200
"""

from __future__ import annotations

import argparse
import math
import sys
import threading

from napari_mae._names import PSEUDO_SOURCES
from napari_mae.cli import CLIError, check_output_path, check_segmentation_model, ctrl_c_stops
from napari_mae.io.readers import FORMAT_NAMES


def register(subparsers) -> None:
    """Add the ``finetune`` sub-parser."""
    p = subparsers.add_parser(
        "finetune",
        help="few-stroke fine-tuning of the segmentation decoder from scribbles (and corrected objects)",
        description=(
            "Trains the decoder of a segmentation model (default: the bundled default-2d) a little further "
            "on IMAGE(s): where --scribbles mark background (1) and objects (2), where --labels hold objects "
            "you corrected or painted whole, and on the model's own confident predictions far from any "
            "stroke. The encoder stays frozen (or its last blocks train at a low rate). Volumes train the "
            "2D model on the planes that hold strokes. Writes the best model to --out (a .pt checkpoint, "
            "atomically); the starting model is not changed. Use it with "
            "`napari-mae segment IMAGE --method learned --model OUT`."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help=f"2D images or 3D volumes ({FORMAT_NAMES})")
    p.add_argument(
        "--scribbles",
        nargs="+",
        required=True,
        metavar="S",
        help="one scribble image per IMAGE, of its shape: 0 unlabelled, 1 background, 2 objects",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="L",
        help="optional, one per IMAGE ('none' to skip one): instance labels of objects corrected or painted "
        "whole (each non-zero id one complete object; 0 says nothing)",
    )
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="the fine-tuned model to write")
    p.add_argument(
        "--model",
        default="default-2d",
        metavar="default-2d|CHECKPOINT",
        help="segmentation model to start from (default: the bundled default-2d)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="time budget in seconds, preparation included (default 60)",
    )
    p.add_argument("--steps", type=int, default=None, help="most optimiser steps (default: the time decides)")
    p.add_argument(
        "--encoder-blocks",
        type=int,
        default=0,
        help="also train the encoder's last N transformer blocks, at a tenth of the rate (default 0: frozen; "
        "at most the encoder's depth, 4 for default-2d)",
    )
    p.add_argument(
        "--no-pseudo-labels",
        action="store_true",
        help="train on your labels only (no self-training on pseudo-labels)",
    )
    p.add_argument(
        "--pseudo-source",
        choices=PSEUDO_SOURCES,
        default=None,
        help="where the pseudo-labels come from: the model's confident predictions (model, the default), "
        "the classical pipeline's segmentation with the same strokes, or that segmentation where the "
        "model agrees; which is best depends on the data (README, fine-tuning); not with "
        "--no-pseudo-labels",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=None,
        help="pixel size per spatial axis (Z Y X), all images",
    )
    p.add_argument(
        "--radius",
        type=float,
        default=None,
        help="object radius, in the physical units of the files' spacing (or --spacing), pixels where a "
        "file has none (default: the model's, else estimated, or from the object strokes where the "
        "estimate found other things); stored in the model, which segments at it",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="where to train")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def _read_labels(path: str, what: str, shape: tuple[int, ...]):
    """The labels image at ``path`` (``what``: the option, named in the messages).

    Scribbles get the check of segmentation and fine-tuning
    (:func:`napari_mae.segmentation.scribbles.check_scribbles`, both classes over all
    images are the core's), corrected objects the core's
    (:func:`napari_mae.segmentation.finetune.check_corrected_labels`), against the spatial
    ``shape`` of their image; here, before the model loads.
    """
    from pathlib import Path

    import numpy as np

    from napari_mae.io.readers import read_image
    from napari_mae.segmentation.finetune import check_corrected_labels
    from napari_mae.segmentation.scribbles import check_scribbles

    if not Path(path).exists():
        raise CLIError(f"{what} {path}: no such file")
    data, _, _ = read_image(path)
    data = np.asarray(data)
    try:
        if what == "--scribbles":
            return check_scribbles(data, shape, name=f"{what} {path}", require_both=False)
        return check_corrected_labels(data, shape, name=f"{what} {path}", image="its image")
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from napari_mae.io.readers import read_image
    from napari_mae.segmentation.finetune import FinetuneConfig, finetune

    # the options first (FinetuneConfig checks them again, naming its fields)
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise CLIError(f"--seconds must be a positive time budget in seconds, got {args.seconds:g}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.encoder_blocks < 0:
        raise CLIError(f"--encoder-blocks must be 0 or more, got {args.encoder_blocks}")
    out = check_output_path(args.out, "--out", (".pt", ".pth"), what="checkpoint", overwrite=args.overwrite)
    if args.no_pseudo_labels and args.pseudo_source is not None:
        raise CLIError("--no-pseudo-labels trains on your labels only; leave out --pseudo-source with it")
    check_segmentation_model(args.model)
    if len(args.scribbles) != len(args.images):
        raise CLIError(f"{len(args.scribbles)} --scribbles for {len(args.images)} images: give one per image")
    if args.labels is not None and len(args.labels) != len(args.images):
        raise CLIError(
            f"{len(args.labels)} --labels for {len(args.images)} images: give one per image ('none' skips)"
        )
    try:
        config = FinetuneConfig(
            seconds=args.seconds,
            steps=args.steps,
            encoder_blocks=args.encoder_blocks,
            pseudo_labels=not args.no_pseudo_labels,
            pseudo_source=args.pseudo_source or "model",
            seed=args.seed,
            device=args.device,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.radius is not None and not (math.isfinite(args.radius) and args.radius > 0):
        raise CLIError(f"--radius must be positive (physical units), got {args.radius}")
    images, spacings, channel_axes, shapes = [], [], set(), []
    for path in args.images:
        image, spacing, meta = read_image(path)
        channel_axis = image.ndim - 1 if str(meta.get("axes", "")).endswith("C") else None
        channel_axes.add(channel_axis)
        n = image.ndim - (channel_axis is not None)
        if args.spacing is not None:
            if len(args.spacing) != n:
                raise CLIError(f"--spacing needs {n} values for {path}, got {len(args.spacing)}")
            spacing = tuple(args.spacing)
        elif spacing is None or len(spacing) != n:
            spacing = None
        images.append(image)
        spacings.append(spacing)
        shapes.append(image.shape[:-1] if channel_axis is not None else image.shape)
    if len(channel_axes) > 1:
        raise CLIError("the images mix single-channel and multi-channel files; fine-tune on one kind")
    scribbles = [_read_labels(p, "--scribbles", n) for p, n in zip(args.scribbles, shapes, strict=True)]
    corrected = None
    if args.labels is not None:
        corrected = [
            None if p.lower() == "none" else _read_labels(p, "--labels", n)
            for p, n in zip(args.labels, shapes, strict=True)
        ]
    interactive = sys.stderr.isatty()
    final = None
    stop = threading.Event()
    updates = finetune(
        images,
        scribbles,
        out=out,
        model=args.model,
        corrected=corrected,
        spacing=spacings,
        channel_axis=channel_axes.pop(),
        object_radius=args.radius,
        config=config,
        stop=stop,
        overwrite=args.overwrite,
    )
    with ctrl_c_stops(stop, f"stopping after this step and saving the best model so far to {out}"):
        final = _report(updates, interactive)
    if interactive:
        print(file=sys.stderr)
    if final is None or final.checkpoint is None:
        print(f"napari-mae finetune: error: {final.message if final else 'nothing ran'}", file=sys.stderr)
        return 1
    print(final.message)
    return 0


def _report(updates, interactive: bool):
    """Print the fine-tuning's updates; return the last one."""
    final = None
    for update in updates:
        if update.kind in ("prepared", "evaluated") and update.message:
            print(f"napari-mae finetune: {update.elapsed_s:5.1f} s  {update.message}", file=sys.stderr)
        elif update.kind == "step" and interactive:
            print(
                f"\rstep {update.step}, loss {update.loss:.4f}, {update.elapsed_s:.0f} s",
                end="",
                file=sys.stderr,
            )
        final = update
    return final
