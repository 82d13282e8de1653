"""``napari-mae segment``: adaptive instance segmentation of a 2D image or 3D volume.

Examples
--------
Every nucleus of a 2D image, automatically::

    napari-mae segment nuclei.tif --out nuclei_labels.tif

A volume with its voxel size, a few scribbles (1 = background, 2 = object) and the
bundled model's features::

    napari-mae segment stack.tif --spacing 0.28 0.127 0.127 --scribbles strokes.tif \\
        --model default-3d --out labels.tif
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIFF_SUFFIXES = (".tif", ".tiff")


def register(subparsers) -> None:
    """Add the ``segment`` sub-parser."""
    p = subparsers.add_parser(
        "segment",
        help="segment every object (nucleus, cell, bone) of an image as its own label",
        description=(
            "Adaptive instance segmentation: object size, threshold and polarity are estimated from IMAGE "
            "itself; with --scribbles a random forest learns foreground and boundaries from your strokes. "
            "Writes uint32 labels (0 = background) as a TIFF and prints what was estimated as JSON."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="2D image or 3D volume (TIFF, NIfTI, NRRD)")
    p.add_argument("--out", required=True, metavar="LABELS.tif", help="labels TIFF to write")
    p.add_argument(
        "--scribbles",
        metavar="LABELS.tif",
        default=None,
        help="scribble labels of IMAGE's shape: 0 unlabelled, 1 background, 2.. objects",
    )
    p.add_argument(
        "--model",
        default="none",
        metavar="default-2d|default-3d|CHECKPOINT|PRESET|none",
        help="masked-autoencoder features for the scribble classifier (default none: filter bank only)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="voxel size per spatial axis, (Z) Y X, physical units (default: read from the file)",
    )
    p.add_argument("--channel-axis", type=int, default=None, help="axis holding channels, if any")
    p.add_argument(
        "--radius", type=float, default=None, help="object radius, physical units (default: estimated)"
    )
    p.add_argument("--threshold", type=float, default=None, help="foreground threshold (default: estimated)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def _read(path: str):
    from napari_mae.io.readers import read_image

    return read_image(path)


def run(args: argparse.Namespace) -> int:
    """Run ``segment``; return the exit code."""
    import numpy as np
    import tifffile

    from napari_mae.cli import CLIError
    from napari_mae.segmentation import segment_instances

    out = Path(args.out)
    if out.suffix.lower() not in TIFF_SUFFIXES:
        raise CLIError(f"--out {args.out}: only TIFF output is written; use a .tif name")
    image, spacing, meta = _read(args.image)
    channel_axis = args.channel_axis
    if channel_axis is None and meta.get("rgb"):
        channel_axis = -1
    n_spatial = image.ndim - (channel_axis is not None)
    if args.spacing is not None:
        if len(args.spacing) != n_spatial:
            raise CLIError(f"--spacing needs {n_spatial} values for this image, got {len(args.spacing)}")
        spacing = tuple(args.spacing)
    elif spacing is not None and len(spacing) != n_spatial:
        spacing = None
    scribbles = None
    if args.scribbles:
        scribbles, _, _ = _read(args.scribbles)
    model = None if str(args.model).lower() == "none" else args.model
    if model is not None and scribbles is None:
        print("napari-mae segment: --model is used only with --scribbles; ignored", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        if not args.quiet:
            print(f"\r{message} {done}/{total}", end="", file=sys.stderr, flush=True)

    labels, info = segment_instances(
        image,
        scribbles=scribbles,
        model=model,
        spacing=spacing,
        channel_axis=channel_axis,
        object_radius=args.radius,
        threshold=args.threshold,
        progress=progress,
    )
    if not args.quiet:
        print(file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = "ZYX" if labels.ndim == 3 else "YX"
    tifffile.imwrite(out, labels, compression="zlib", metadata={"axes": axes})
    info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()}
    print(json.dumps({"out": str(out), **info}, default=lambda v: float(np.asarray(v))))
    return 0
