"""``napari-mae segment`` on a folder / glob (batch) or on an OME-Zarr volume (block-wise).

Called from :func:`napari_mae.cli.segment.run` when IMAGE is a folder, a glob pattern or
a Zarr store; the core is :mod:`napari_mae.batch` and :mod:`napari_mae.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from napari_mae.cli import CLIError


def is_folder_or_glob(image: str) -> bool:
    """IMAGE names several files: a folder that is not a Zarr store, or a glob pattern."""
    from napari_mae.io.omezarr import is_zarr

    if any(ch in image for ch in "*?["):
        return True
    return Path(image).is_dir() and not is_zarr(image)


def is_zarr_input(image: str) -> bool:
    from napari_mae.io.omezarr import is_zarr

    return is_zarr(image)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of folder and block-wise mode."""
    g = p.add_argument_group("folders and large volumes")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="OME-Zarr input: dask LocalCluster of N single-threaded worker processes for the blocks "
        "(default: one per core; 0 runs them in this process); a folder: its files over N workers "
        "(default: one after the other here)",
    )
    g.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run the blocks (OME-Zarr) or the files (a folder) on this running dask scheduler instead",
    )
    g.add_argument(
        "--block-size",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="OME-Zarr input: block core per axis in voxels, = the output chunks (default 256^3 / 2048^2); "
        "each block is read with an overlap of 2 object diameters; a worker's memory follows the block "
        "(with its overlap), not the volume: a smaller block if workers reach --memory-limit",
    )
    g.add_argument(
        "--level", type=int, default=0, help="OME-Zarr input: multiscale level to segment (default 0)"
    )
    g.add_argument(
        "--memory-limit",
        default=None,
        metavar="4GB",
        help="OME-Zarr input: memory limit per local worker (dask's; default its share of the machine)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="output exists: skip the files (folder) or blocks (OME-Zarr) already done",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="output exists: replace it (one file's --out), or start again from scratch (a folder, OME-Zarr)",
    )


def _common(args) -> dict:
    """The segmentation settings of folder and block-wise mode (as for one file)."""
    bright = None if args.objects == "auto" else args.objects == "bright"
    method = getattr(args, "method", None)
    model = getattr(args, "model", None)
    if model is not None and str(model).lower() == "none":
        if method == "learned":
            raise CLIError("--method learned needs a segmentation model, not --model none")
        method, model = "classical", None
    looks_like_path = model is not None and (Path(model).suffix in (".pt", ".pth") or "/" in str(model))
    if looks_like_path and not Path(model).is_file():  # before any file or worker starts
        raise CLIError(f"--model {model}: no such file (give a checkpoint path or default-2d)")
    return {
        "object_radius": args.radius,
        "threshold": args.threshold,
        "bright_objects": bright,
        "method": method,
        "model": None if model is None else str(model),
    }


def run_folder(args: argparse.Namespace) -> int:
    """Folder / glob mode: labels per file, ``objects.csv``; exit 1 if any file failed.

    ``--workers N`` (N > 0) or ``--scheduler`` run the files on dask workers, one file
    per task; without them (or ``--workers 0``) one after the other here.
    """
    from napari_mae.batch import check_batch_output, list_images

    if args.scribbles:
        raise CLIError("--scribbles is for one image; a folder is segmented automatically")
    out = Path(args.out)
    if Path(args.image).is_dir() and out.resolve() == Path(args.image).resolve():
        # its images would be taken for earlier results ("no image found")
        raise CLIError(f"--out {args.out} is the input folder; write the labels to another folder")
    check_batch_output(out, overwrite=args.overwrite, resume=args.resume)
    n = len(list_images(args.image, exclude=out))
    if n == 0:
        from napari_mae.io.readers import FORMAT_NAMES

        raise CLIError(f"{args.image}: no image ({FORMAT_NAMES}) or OME-Zarr found")
    if args.block_size is not None or args.level != 0:
        raise CLIError("--block-size and --level are for OME-Zarr input, not a folder")
    if args.workers is not None and args.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}")
    settings = _common(args)
    with contextlib.ExitStack() as stack:
        client = None
        if (args.workers or 0) > 0 or args.scheduler is not None:  # files over dask workers
            from napari_mae.distributed import BlockwiseError, dask_client

            try:
                client = stack.enter_context(
                    dask_client(args.workers, args.scheduler, memory_limit=args.memory_limit)
                )
            except BlockwiseError as exc:
                raise CLIError(str(exc)) from exc
        try:
            return _folder_loop(args, out, n, settings, client)
        except KeyboardInterrupt:
            # the files done are kept: say how to go on (main() prints "interrupted", exit 130)
            print(
                f"napari-mae segment: the files done are in {out}; rerun with --resume to go on",
                file=sys.stderr,
            )
            raise


def _folder_loop(args, out: Path, n: int, settings: dict, client) -> int:
    from tqdm import tqdm

    from napari_mae.batch import segment_folder

    failed, done, skipped, n_objects = [], 0, 0, 0
    methods: dict[str, int] = {}  # which method each file got (auto decides per file)
    unsure: list[str] = []  # files where auto's decoder was unsure and the classical one ran
    bar = tqdm(total=n, unit="file", disable=args.quiet, file=sys.stderr)
    for up in segment_folder(
        args.image,
        out,
        spacing=args.spacing,
        resume=args.resume,
        overwrite=args.overwrite,
        client=client,
        **settings,
    ):
        bar.update(1)
        if up.status == "failed":
            failed.append({"file": str(up.path), "error": up.error})
            tqdm.write(f"napari-mae segment: {up.path}: failed: {up.error}", file=sys.stderr)
        else:
            done += up.status == "done"
            skipped += up.status == "skipped"
            n_objects += up.n_objects
            method = up.info.get("method")
            if method:
                methods[method] = methods.get(method, 0) + 1
            if up.info.get("fallback") and up.info.get("ambiguity") is not None:
                unsure.append(str(up.path))
            bar.set_postfix_str(f"{up.path.name}: {up.n_objects} objects")
    bar.close()
    summary = {
        "out": str(out),
        "table": str(out / "objects.csv"),
        "files": n,
        "segmented": done,
        "skipped": skipped,
        "failed": failed,
        "n_objects": n_objects,
        "methods": methods,
        "fallbacks": unsure,
    }
    print(json.dumps(summary))
    return 1 if failed else 0


def run_zarr(args: argparse.Namespace) -> int:
    """OME-Zarr mode: block-wise on dask.distributed, labels as OME-Zarr labels."""
    from napari_mae.distributed import BlockwiseError, check_output, dask_client, segment_blockwise
    from napari_mae.io.omezarr import read_ome_zarr

    if args.scribbles:
        raise CLIError("--scribbles is not supported for block-wise (OME-Zarr) segmentation")
    img = read_ome_zarr(args.image, plain=args.spacing is not None)
    if not 0 <= args.level < len(img.levels):
        raise CLIError(f"--level {args.level}: {args.image} has levels 0..{len(img.levels) - 1}")
    data = img.levels[args.level]
    axes = img.axes
    for letter in "TC":
        i = axes.find(letter)
        if i >= 0:
            if data.shape[i] != 1:
                raise CLIError(
                    f"{args.image} has {data.shape[i]} {'time points' if letter == 'T' else 'channels'} "
                    f"(axes {axes}); block-wise segmentation takes one: save it as its own image"
                )
            data = data[(slice(None),) * i + (0,)]
            axes = axes[:i] + axes[i + 1 :]
    spacing = img.spacing(args.level)
    if args.spacing is not None:
        if len(args.spacing) != data.ndim:
            raise CLIError(f"--spacing needs {data.ndim} values for this image, got {len(args.spacing)}")
        spacing = tuple(args.spacing)
    if args.block_size is not None and len(args.block_size) not in (1, data.ndim):
        raise CLIError(f"--block-size needs 1 or {data.ndim} values")
    block = (
        None
        if args.block_size is None
        else tuple(args.block_size) * (data.ndim if len(args.block_size) == 1 else 1)
    )
    if args.out is None:
        out = Path(args.image) / "labels" / "napari-mae"
    else:
        out = Path(args.out)
        if out.parent.name != "labels":
            out = out / "labels" / "napari-mae"
    unit = img.unit if img.unit != "pixel" else None
    if args.workers is not None and args.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}")

    def progress(done: int, total: int, message: str) -> None:
        if not args.quiet:
            print(f"{message} {done}/{total}", file=sys.stderr, flush=True)

    kwargs = dict(
        spacing=spacing,
        unit=unit,
        axes=axes,
        block_shape=block,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=progress,
        **_common(args),
    )
    check_output(out, overwrite=args.overwrite, resume=args.resume)  # before any worker starts
    try:
        if args.workers == 0 and args.scheduler is None:
            result = segment_blockwise(data, out, client=None, **kwargs)
        else:
            with dask_client(args.workers, args.scheduler, memory_limit=args.memory_limit) as client:
                result = segment_blockwise(data, out, client=client, **kwargs)
    except BlockwiseError as exc:  # no scheduler, a dead worker: one line, what to do
        raise CLIError(str(exc)) from exc
    from napari_mae._json import to_jsonable

    print(json.dumps(to_jsonable(result), allow_nan=False, default=str))  # NaN (learned threshold): null
    return 0
