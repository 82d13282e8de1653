"""``napari-mae train``: train the MAE on a folder of unlabelled images, or the segmentation decoder on images + labels.

Examples
--------
Fine-tune the bundled 2D model on a folder of TIFFs for one epoch::

    napari-mae train ../shared/data/dsb2018_fluo_nuclei_2d/images --epochs 1 --out run1

Train a 3D model from scratch on 4 GPUs::

    torchrun --nproc_per_node 4 -m napari_mae.cli train volumes/ --out run3d \\
        --model small-3d --epochs 200 --batch-size 8

Train the segmentation decoder on images + instance labels (same file names), starting
from the bundled MAE encoder::

    napari-mae train images/ --labels labels/ --out seg_run --epochs 20

Volumes with 3D labels train a native 3D decoder (on default-3d, or ``--model tiny-3d``)::

    napari-mae train volumes/ --labels labels3d/ --out seg3d --model tiny-3d

Continue a stopped run with ``--resume`` (same ``--out``). Ctrl-C stops a run cleanly: it
writes ``last.pt`` after the current step and prints the command that resumes it (a second
Ctrl-C quits at once).
"""

from __future__ import annotations

import argparse
import contextlib
import threading


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 16 or 4,16,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers) -> None:
    """Add the ``train`` sub-parser."""
    p = subparsers.add_parser(
        "train",
        help="train the masked autoencoder (unlabelled images) or the segmentation decoder (images + --labels)",
        description=(
            "Two tasks on a folder of 2D images / 3D volumes in DATA_DIR (TIFF, PNG, JPEG, NIfTI, NRRD; "
            "searched recursively). Without --labels: train the masked autoencoder on the unlabelled images, "
            "from scratch (a preset such as tiny-2d) or onward from default-2d/default-3d or a checkpoint. "
            "With --labels LABELS_DIR: train the segmentation decoder on the images and their instance labels "
            "(same file names), on the --model MAE encoder. Writes last.pt, best.pt, loss_log.csv and "
            "config.json to RUN_DIR. Under torchrun it trains with DistributedDataParallel. For few-stroke "
            "fine-tuning of a segmentation model from scribbles on a few images, use 'napari-mae finetune'."
        ),
    )
    p.add_argument("data_dir", nargs="+", metavar="DATA_DIR", help="image folder(s) or files")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created)")
    p.add_argument(
        "--model",
        default=None,
        metavar="PRESET|CHECKPOINT",
        help="preset to train from scratch (e.g. tiny-2d, small-3d), default-2d/default-3d or a checkpoint "
        "to fine-tune (default: default-2d, or default-3d with --spatial-dims 3)",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="LABELS_DIR",
        help="segmentation task: instance label images with the same file names as the images; trains the "
        "decoder on the --model MAE encoder (default default-2d; for volumes default-3d, a 3D decoder), "
        "or continues a segmentation checkpoint",
    )
    p.add_argument(
        "--frozen-epochs",
        type=int,
        default=1,
        help="segmentation task: epochs with the encoder frozen before everything trains (default 1)",
    )
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None, help="2D or 3D model")
    p.add_argument("--patch-size", type=_ints, default=None, help="patch size for a preset, e.g. 8 or 4,8,8")
    p.add_argument("--img-size", type=_ints, default=None, help="crop size for a preset, e.g. 64 or 32,64,64")
    p.add_argument(
        "--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)"
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step and process (default 8)")
    # No parser default for --lr and --samples-per-image: each task takes its config's
    # (TrainConfig, SegmentationConfig), as the Training widget does.
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-3; 2e-3 with --labels)"
    )
    p.add_argument(
        "--adversarial-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="MAE task: weight of the adversarial term; above 0 a patch discriminator trains alternately with "
        "the MAE and judges its reconstructions (default 0: off)",
    )
    p.add_argument(
        "--samples-per-image",
        type=int,
        default=None,
        help="random crops per image and epoch (default 1; 4 with --labels)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="files held out for validation (0.1)")
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="resample to this voxel size first, (Z) Y X in physical units (as for segment)",
    )
    p.add_argument("--cache", choices=("memory", "disk", "none"), default="memory", help="image cache")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="write last.pt every N steps too")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in a RUN_DIR that already holds a run"
    )
    p.add_argument(
        "--pattern",
        action="append",
        default=None,
        metavar="GLOB",
        help="file-name pattern to include (repeatable; default: tif, tiff, png, jpg, jpeg, nii, nii.gz, nrrd)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="relative path pattern to leave out (repeatable; default: annotation files such as labels/*, "
        "labels.*, *_mask.*)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train as asked by ``args``; return the exit code (1 when the loss became non-finite).

    A run folder that this call created and left empty (the run failed before writing
    anything) is removed again.
    """
    from napari_mae.training.loop import check_output_dir

    # the loop's own check, before torch is imported (seconds) and the data is read
    check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    with _remove_if_left_empty(args.out):
        if args.labels is not None:
            return _run_segmentation(args)
        return _run_mae(args)


@contextlib.contextmanager
def _remove_if_left_empty(out: str):
    """Remove ``out`` afterwards if this run created it and nothing was written into it.

    The loop creates the run folder before it loads the data, so a run that fails on bad
    input (labels, a missing data folder, a wrong model) would otherwise leave an empty
    folder behind. A folder that existed before is never removed.
    """
    from pathlib import Path

    path = Path(out)
    existed = path.exists()
    try:
        yield
    finally:
        if not existed and path.is_dir() and not any(path.iterdir()):
            with contextlib.suppress(OSError):  # another process of a torchrun job may have written
                path.rmdir()


def _run_mae(args: argparse.Namespace) -> int:
    """The MAE task: images only."""
    import sys

    from napari_mae.training import TrainConfig, default_model, guess_spatial_dims, train
    from napari_mae.training.files import DEFAULT_EXCLUDE

    spatial_dims = args.spatial_dims
    if args.model is None and spatial_dims is None:
        guess = guess_spatial_dims(args.data_dir, args.pattern, exclude=args.exclude or DEFAULT_EXCLUDE)
        if guess is not None:
            spatial_dims, first = guess
            if spatial_dims == 3:
                print(
                    f"{first.name} is a 3D volume: training default-3d (--spatial-dims 2 trains a 2D model "
                    "on its planes)",
                    file=sys.stderr,
                )
    model = args.model or default_model(spatial_dims)
    config = TrainConfig(
        data_dir=args.data_dir if len(args.data_dir) > 1 else args.data_dir[0],
        output_dir=args.out,
        model=model,
        spatial_dims=spatial_dims,
        img_size=args.img_size,
        patch_size=args.patch_size,
        mask_ratio=args.mask_ratio,
        epochs=args.epochs,
        batch_size=args.batch_size,
        **_given(args, "lr", "samples_per_image"),
        val_fraction=args.val_fraction,
        spacing=args.spacing,
        cache=args.cache,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        adversarial_weight=args.adversarial_weight,
        patterns=args.pattern,
        exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE,
    )
    stop = threading.Event()
    return _report(train(config, stop=stop), args, stop)


def _run_segmentation(args: argparse.Namespace) -> int:
    """The segmentation task: images + labels through the same loop."""
    from napari_mae.cli import CLIError
    from napari_mae.training.segmentation import SegmentationConfig, train_segmentation

    if args.adversarial_weight:
        raise CLIError("--adversarial-weight is for the MAE task; leave it out with --labels")
    config = SegmentationConfig(
        data_dir=args.data_dir if len(args.data_dir) > 1 else args.data_dir[0],
        labels_dir=args.labels,
        output_dir=args.out,
        model=args.model or _segmentation_encoder(args),
        epochs=args.epochs,
        batch_size=args.batch_size,
        **_given(args, "lr", "samples_per_image"),
        val_fraction=args.val_fraction,
        frozen_epochs=args.frozen_epochs,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    try:
        stop = threading.Event()
        return _report(train_segmentation(config, stop=stop), args, stop)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


def _segmentation_encoder(args: argparse.Namespace) -> str:
    """The encoder of a new decoder when no --model is given: default-3d for volumes, else default-2d.

    Volumes are told by --spatial-dims or, without it, by the first image (as for the MAE
    task); 3D labels then train a native 3D decoder.
    """
    import sys

    from napari_mae.training import guess_spatial_dims
    from napari_mae.training.files import DEFAULT_EXCLUDE

    dims = args.spatial_dims
    if dims is None:
        guess = guess_spatial_dims(args.data_dir, args.pattern, exclude=args.exclude or DEFAULT_EXCLUDE)
        if guess is not None and guess[0] == 3:
            dims = 3
            print(f"{guess[1].name} is a 3D volume: training a 3D decoder on default-3d", file=sys.stderr)
    return "default-3d" if dims == 3 else "default-2d"


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` given on the command line (the others keep the config's default)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the user's own, with ``--resume`` instead of ``--overwrite``."""
    import os
    import shlex
    import sys

    argv = list(sys.argv[1:])
    if "train" in argv and args.out in argv:
        argv = argv[argv.index("train") :]
    else:  # called as a function (tests, scripts): the options that name the run
        argv = ["train", *args.data_dir, "--out", args.out]
        argv += ["--labels", args.labels] if args.labels else []
        argv += ["--model", str(args.model)] if args.model else []
    argv = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = (
        ["torchrun", "--nproc_per_node", str(world), "-m", "napari_mae.cli"] if world > 1 else ["napari-mae"]
    )
    return shlex.join(head + argv)


def _report(updates, args, stop: threading.Event | None = None) -> int:
    """Progress bar and messages of a run's updates; the exit code (130 after Ctrl-C)."""
    from napari_mae.cli import ctrl_c_stops

    saving = "stopping after this step and saving last.pt"
    with ctrl_c_stops(stop, saving) if stop is not None else contextlib.nullcontext():
        return _report_updates(updates, args, stop)


def _report_updates(updates, args, stop: threading.Event | None) -> int:
    import sys

    from tqdm import tqdm

    bar = None
    code = 0
    for update in updates:
        if update.kind == "start":
            print(update.message, file=sys.stderr)
            bar = tqdm(
                total=update.n_steps, initial=update.step, unit="step", disable=args.quiet, dynamic_ncols=True
            )
        elif update.kind == "step":
            bar.update(update.step - bar.n)
            bar.set_postfix(
                epoch=f"{update.epoch}/{update.n_epochs}",
                loss=f"{update.loss:.4f}",
                lr=f"{update.lr:.2e}",
                refresh=False,
            )
        else:
            if bar is not None:
                bar.update(update.step - bar.n)
            if bar is not None and not args.quiet:
                bar.write(update.message, file=sys.stderr)
            else:
                print(update.message, file=sys.stderr)
            if update.kind == "failed":
                code = 1
            if update.kind == "stopped" and stop is not None and stop.is_set():
                print(
                    f"Interrupted: saved {update.checkpoint}; rerun with --resume to continue: "
                    f"{_resume_command(args)}",
                    file=sys.stderr,
                )
                code = 130
    if bar is not None:
        bar.close()
    return code
