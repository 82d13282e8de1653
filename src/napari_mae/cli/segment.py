"""``napari-mae segment``: adaptive instance segmentation of a 2D image or 3D volume.

Examples
--------
Every nucleus of a 2D image, automatically::

    napari-mae segment nuclei.tif --out nuclei_labels.tif

With the learned decoder (the bundled nuclei model, or your own)::

    napari-mae segment nuclei.tif --method learned --out labels.tif
    napari-mae segment cells.tif --model run/best.pt --out labels.tif

A volume with its voxel size, a few scribbles (1 = background, 2 = object) and the
bundled model's features::

    napari-mae segment stack.tif --spacing 0.28 0.127 0.127 --scribbles strokes.tif \\
        --model default-3d --out labels.tif
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from napari_mae.io.readers import FORMAT_NAMES, NIFTI_SUFFIXES, TIFF_SUFFIXES

OUT_SUFFIXES = TIFF_SUFFIXES + NIFTI_SUFFIXES


def register(subparsers) -> None:
    """Add the ``segment`` sub-parser."""
    p = subparsers.add_parser(
        "segment",
        help="segment every object (nucleus, cell, bone) of an image as its own label",
        description=(
            "Adaptive instance segmentation: object size, threshold and polarity are estimated from IMAGE "
            "itself; with --scribbles a random forest learns foreground and boundaries from your strokes. "
            "Writes the labels (0 = background) as an OME-TIFF (uint32) or, for a .nii/.nii.gz --out, "
            "as NIfTI (int32, placed in the input scan's world space) and prints what was estimated as JSON."
        ),
    )
    p.add_argument(
        "image",
        metavar="IMAGE",
        help=f"2D image or 3D volume ({FORMAT_NAMES}); a folder or a quoted glob ('data/*.tif') of them "
        "(batch mode); or an OME-Zarr volume (block-wise on dask, larger than memory)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="LABELS.tif|OUTDIR|OUT.zarr",
        help="labels to write: .tif (OME-TIFF with spacing) or .nii/.nii.gz (NIfTI in the input scan's space); "
        "batch mode: a folder (labels per file + objects.csv); OME-Zarr: labels beside the image "
        "(IMAGE.zarr/labels/napari-mae, the default) or in OUT.zarr/labels/napari-mae; a plain Zarr array "
        "(no OME metadata, read with --spacing) cannot hold labels: it needs --out OUT.zarr",
    )
    p.add_argument(
        "--scribbles",
        metavar="LABELS.tif",
        default=None,
        help="scribble labels of IMAGE's shape: 0 unlabelled, 1 background, 2.. objects",
    )
    p.add_argument(
        "--method",
        choices=("auto", "learned", "classical"),
        default="auto",
        help="learned: the MAE encoder's instance decoder (--model, default the bundled default-2d); "
        "classical: the filter-bank pipeline; auto (default): learned when --model names a segmentation "
        "model, or with the bundled nuclei model on a single-channel 2D image, which falls back to classical "
        "where that model is unsure of the image ('fallback' in the output says why; --method learned keeps "
        "it), and classical otherwise (volumes, colour images, --scribbles, --threshold)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="default-2d|CHECKPOINT|none",
        help="without --scribbles: the segmentation model of the learned method (default-2d: the bundled "
        "nuclei model, or a checkpoint of napari-mae train --labels); with --scribbles: masked-autoencoder features for the scribble "
        "classifier (default-2d, default-3d, a checkpoint or preset; default none: filter bank only)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="voxel size per spatial axis, (Z) Y X, physical units (default: read from the file)",
    )
    p.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        help="axis holding channels, counted in the image as read ([Z] Y X [C]: files whose channels "
        "the reader recognises have them last, and need no flag)",
    )
    p.add_argument(
        "--radius",
        type=float,
        default=None,
        help="object radius, in the physical units of the file's spacing (or --spacing), pixels where the "
        "file has none (default: estimated; a fine-tuned model keeps its own)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="classical method's foreground threshold, on a 0-1 scale: without --scribbles on the "
        "background-subtracted image normalised so that its 1st and 99.8th percentiles are 0 and 1 "
        "(default: Otsu's estimate, printed as 'threshold'); with --scribbles on the object "
        "probability (default 0.5); the learned method does not use it",
    )
    p.add_argument(
        "--objects",
        choices=("auto", "bright", "dark"),
        default="auto",
        help="objects brighter (fluorescence) or darker (brightfield, stained tissue) than the background "
        "(default: detected; give it when objects cover most of the image)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    from napari_mae.cli._many import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)


def _read(path: str):
    from napari_mae.io.readers import read_image

    return read_image(path)


def run(args: argparse.Namespace) -> int:
    """Run ``segment``; return the exit code."""
    from napari_mae._json import to_jsonable
    from napari_mae.cli import (
        CLIError,
        _many,
        check_distinct_paths,
        check_output_path,
        check_segmentation_model,
    )
    from napari_mae.io.writers import write_image
    from napari_mae.preprocess import check_channel_axis, check_threshold, guess_rgb_axis
    from napari_mae.segmentation import segment_instances

    if args.radius is not None and not math.isfinite(args.radius):
        raise CLIError(f"--radius must be a finite number, got {args.radius}")
    if args.radius is not None and args.radius <= 0:
        raise CLIError(f"--radius must be positive (physical units), got {args.radius}")
    try:  # before any folder, OME-Zarr or block is read
        check_threshold(args.threshold)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from None
    if _many.is_zarr_input(args.image):
        return _many.run_zarr(args)
    if args.out is None:
        raise CLIError("--out is required (a .tif/.nii.gz file, or a folder for a folder of images)")
    if _many.is_folder_or_glob(args.image):
        return _many.run_folder(args)
    if args.workers is not None or args.scheduler is not None or args.block_size is not None:
        raise CLIError("--workers, --scheduler and --block-size are for OME-Zarr input")
    # first: --overwrite never replaces the input image or the scribbles
    check_distinct_paths({"IMAGE": args.image, "--scribbles": args.scribbles}, {"--out": args.out})
    out = check_output_path(
        args.out, "--out", OUT_SUFFIXES, what="TIFF or NIfTI", overwrite=args.overwrite,
        folder_hint="to write a folder of labels, give a folder or a glob as IMAGE",
    )  # fmt: skip
    if args.scribbles and not Path(args.scribbles).exists():  # before the image is read
        raise CLIError(f"--scribbles {args.scribbles}: no such file")
    image, spacing, meta = _read(args.image)
    axes = str(meta.get("axes", ""))
    if "T" in axes:
        from napari_mae.io.readers import describe_layout

        raise CLIError(
            f"{args.image} has a time axis ({describe_layout(image, meta)}); save one time point as its own file"
        )
    try:
        channel_axis = check_channel_axis(args.channel_axis, image.ndim)
    except ValueError as exc:
        raise CLIError(f"--channel-axis: {exc} (image of shape {image.shape})") from None
    if axes.endswith("C"):
        # The reader found channels (or RGB samples) and put them last.
        if channel_axis is not None and channel_axis % image.ndim != image.ndim - 1:
            raise CLIError(
                f"{args.image} was read with its channels last (axes {axes}, shape {image.shape}); "
                "--channel-axis counts the axes as read: leave it out or use -1"
            )
        channel_axis = image.ndim - 1
    elif (
        channel_axis is None
        and args.spacing is None
        and meta.get("unit", "pixel") == "pixel"
        and guess_rgb_axis(image.shape) is not None
    ):
        # An uncalibrated (Y, X, 3|4) stack is RGB(A) saved without its photometric tag,
        # as segment_instances guesses for arrays (a 3-pixel-wide volume is unlikely).
        print(
            f"napari-mae segment: treating the last axis of {image.shape} as RGB channels; "
            "pass --spacing Z Y X to segment it as a volume",
            file=sys.stderr,
        )
        channel_axis = image.ndim - 1
        spacing = None
    n_spatial = image.ndim - (channel_axis is not None)
    if n_spatial != 3 and not str(out).lower().endswith(TIFF_SUFFIXES):
        raise CLIError(f"--out {args.out}: NIfTI output needs a 3D volume; use a .tif name")
    if args.spacing is not None:
        spacing = tuple(args.spacing)
        from napari_mae.segmentation.segment import single_slice_axis

        k = single_slice_axis(image.shape, None if channel_axis is None else channel_axis % image.ndim)
        if len(spacing) == 2 and k is not None:
            # a volume of one slice, segmented as the 2D image it is: Y X spacing is enough
            spacing = spacing[:k] + (1.0,) + spacing[k:]
        if len(spacing) != n_spatial:
            raise CLIError(f"--spacing needs {n_spatial} values for this image, got {len(args.spacing)}")
    elif spacing is not None and len(spacing) != n_spatial:
        spacing = None
    scribbles = None
    if args.scribbles:
        scribbles, _, _ = _read(args.scribbles)
    method = args.method
    model = None if args.model is None or str(args.model).lower() == "none" else args.model
    if scribbles is None and args.model is not None and str(args.model).lower() == "none":
        if method == "learned":
            raise CLIError("--method learned needs a segmentation model, not --model none")
        method = "classical"
    if scribbles is not None and method == "learned":
        raise CLIError("--method learned takes no --scribbles (use --method classical or auto)")
    if scribbles is None and method == "learned":
        check_segmentation_model(model)

    interactive = sys.stderr.isatty()
    last_message = [None]

    def progress(done: int, total: int, message: str) -> None:
        if args.quiet:
            return
        if interactive:  # one line, overwritten
            print(f"\r{message} {done}/{total}", end="", file=sys.stderr, flush=True)
        elif message != last_message[0]:  # a log file: one line per stage
            print(message, file=sys.stderr, flush=True)
        last_message[0] = message

    labels, info = segment_instances(
        image,
        scribbles=scribbles,
        method=method,
        model=model,
        spacing=spacing,
        channel_axis=channel_axis,
        object_radius=args.radius,
        threshold=args.threshold,
        bright_objects=None if args.objects == "auto" else args.objects == "bright",
        progress=progress,
    )
    if not args.quiet and interactive:
        print(file=sys.stderr)
    unit = meta.get("unit", "pixel")
    if args.spacing is not None and unit == "pixel":
        unit = "um"  # --spacing on an uncalibrated file: microscopy's usual unit
    if (
        scribbles is None
        and model is not None
        and method == "auto"
        and info["method"] == "classical"
        and "fallback" not in info
    ):
        # Documented: auto runs the classical method when --model is no segmentation model
        # (e.g. an MAE checkpoint); say so, as the help's "the segmentation model" suggests otherwise.
        print(
            f"napari-mae segment: --model {model} is not a segmentation model (an MAE, or its weights are "
            "missing): ran the classical method, which does not use it without --scribbles",
            file=sys.stderr,
        )
    write_image(out, labels, spacing=spacing, unit=unit, metadata=meta)
    print(json.dumps(to_jsonable({"out": str(out), **info}), allow_nan=False))
    return 0
