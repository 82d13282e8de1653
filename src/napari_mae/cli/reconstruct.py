"""``napari-mae reconstruct``: mask an image and reconstruct it with a masked autoencoder.

Examples
--------
Reconstruct a 2D image with the bundled model, 75 % of patches removed::

    napari-mae reconstruct nuclei.tif --out nuclei_mae.tif

A volume with an untrained tiny 3D model, keeping the masked input and error map::

    napari-mae reconstruct volume.nii.gz --model tiny-3d --mask-ratio 0.5 --seed 1 \\
        --out recon.tif --save-masked masked.tif --save-error error.tif
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_mae.io.readers import FORMAT_NAMES, TIFF_SUFFIXES


def register(subparsers) -> None:
    """Add the ``reconstruct`` sub-parser."""
    p = subparsers.add_parser(
        "reconstruct",
        help="mask an image's patches and reconstruct them with a masked autoencoder",
        description=(
            "Remove a fraction of IMAGE's patches (seeded) and reconstruct them with a masked autoencoder, "
            "tiled over the whole 2D image or 3D volume. Writes the reconstruction (float32 TIFF, the input's "
            "intensity units; visible pixels are the input's) to --out."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help=f"2D image or 3D volume ({FORMAT_NAMES})")
    p.add_argument("--out", required=True, metavar="OUT.tif", help="reconstruction TIFF to write")
    p.add_argument(
        "--model",
        default=None,
        metavar="CHECKPOINT|PRESET",
        help="checkpoint file, preset (tiny-2d, small-2d, tiny-3d, small-3d; untrained) or "
        "default-2d/default-3d (default: the bundled model matching the image)",
    )
    p.add_argument(
        "--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the mask and of untrained presets (default 0)"
    )
    p.add_argument(
        "--strategy",
        choices=("random", "grid", "block"),
        default="random",
        help="mask pattern (default random)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap in [0, 1) (default 0.25)")
    p.add_argument("--save-masked", metavar="P.tif", default=None, help="also write the masked input")
    p.add_argument("--save-error", metavar="P.tif", default=None, help="also write |reconstruction - input|")
    p.add_argument(
        "--save-mask", metavar="P.tif", default=None, help="also write the pixel mask (1 = removed)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out and the --save-* files where they exist"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _write_tiff(path: Path, data, axes: str, spacing, unit: str, rgb: bool = False) -> None:
    """Write ``data`` (axes ``axes``) as OME-TIFF with its spacing (:func:`napari_mae.io.writers.write_tiff`).

    ``rgb``: the input was RGB(A), so the channels are written as its samples, in its
    axis order (``Y, X, S``), not as grey channels before Y, X.
    """
    from napari_mae.io.writers import write_tiff

    channel_axis = axes.index("C") if "C" in axes else None
    write_tiff(path, data, spacing=spacing, unit=unit, channel_axis=channel_axis, rgb=rgb)


def _spatial_layout(image, metadata: dict) -> tuple[int, int | None, str]:
    """(spatial_dims, channel_axis, axes) of an image from ``read_image``."""
    from napari_mae.cli import CLIError

    axes = str(metadata.get("axes") or "")
    if len(axes) != image.ndim:
        axes = {2: "YX", 3: "ZYX", 4: "ZYXC"}.get(image.ndim, "")
    if "T" in axes:
        from napari_mae.io.readers import describe_layout

        raise CLIError(
            f"{metadata.get('path', 'the image')} has a time axis ({describe_layout(image, metadata)}); "
            "save one time point as its own file"
        )
    spatial_dims = sum(a in "ZYX" for a in axes)
    if spatial_dims not in (2, 3):
        raise CLIError(f"cannot reconstruct an image with axes {axes!r} and shape {image.shape}")
    return spatial_dims, (axes.index("C") if "C" in axes else None), axes


def run(args: argparse.Namespace) -> int:
    """Reconstruct as asked by ``args``; return the exit code."""
    import sys

    import numpy as np
    import torch
    from tqdm import tqdm

    from napari_mae.cli import check_distinct_paths, check_not_existing, check_output_path
    from napari_mae.io.readers import read_image
    from napari_mae.models.mae import PRESETS, load_model
    from napari_mae.reconstruction import reconstruct

    out = check_output_path(args.out, "--out", TIFF_SUFFIXES)
    saves = {
        "masked": check_output_path(args.save_masked, "--save-masked", TIFF_SUFFIXES),
        "error": check_output_path(args.save_error, "--save-error", TIFF_SUFFIXES),
        "mask": check_output_path(args.save_mask, "--save-mask", TIFF_SUFFIXES),
    }
    outputs = {
        "--out": out,
        "--save-masked": saves["masked"],
        "--save-error": saves["error"],
        "--save-mask": saves["mask"],
    }
    check_distinct_paths({"IMAGE": args.image}, outputs)  # first: --overwrite never replaces the input
    for option, path in outputs.items():
        check_not_existing(path, option, overwrite=args.overwrite)
    image, spacing, metadata = read_image(args.image)
    spatial_dims, channel_axis, axes = _spatial_layout(image, metadata)
    spec = args.model or f"default-{spatial_dims}d"
    if spec in PRESETS:
        torch.manual_seed(args.seed)  # an untrained preset is then reproducible too
    model = load_model(spec, device=args.device)

    bar = None  # made at reconstruct's first report, after its checks: an error prints no empty bar

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="window", disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = reconstruct(
            image,
            model,
            mask_ratio=args.mask_ratio,
            seed=args.seed,
            strategy=args.strategy,
            channel_axis=channel_axis,
            device=args.device,
            batch_size=args.batch_size,
            overlap=args.overlap,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    unit = str(metadata.get("unit", "pixel"))
    rgb = bool(metadata.get("rgb"))  # written in the input's axis order (Y, X, S), as the mask is
    _write_tiff(out, result.reconstruction, axes, spacing, unit, rgb)
    if saves["masked"] is not None:
        _write_tiff(saves["masked"], result.masked, axes, spacing, unit, rgb)
    if saves["error"] is not None:
        _write_tiff(saves["error"], result.error, axes, spacing, unit, rgb)
    if saves["mask"] is not None:
        _write_tiff(saves["mask"], result.mask.astype(np.uint8), axes.replace("C", ""), spacing, unit)
    summary = ""
    if saves["error"] is not None:  # the error map is only computed when asked for
        error = result.error[None] if channel_axis is None else np.moveaxis(result.error, channel_axis, 0)
        removed = error[:, result.mask]
        removed = removed[np.isfinite(removed)]
        summary = f", mean |error| there {float(removed.mean()) if removed.size else 0.0:.4g}"
    print(
        f"reconstructed {args.image} {image.shape} with {spec} on {result.device}: "
        f"{int(result.patch_mask.sum())} of {result.patch_mask.size} patches removed{summary}; wrote {out}",
        file=sys.stderr,
    )
    return 0
