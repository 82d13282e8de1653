"""The ``napari-mae`` console script.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds an ``argparse`` sub-parser whose ``func``
default is called with the parsed arguments and returns an exit code. Heavy
imports (torch, MONAI) happen inside those functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import sys
from pathlib import Path

from napari_mae import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand found in this package."""
    parser = argparse.ArgumentParser(
        prog="napari-mae",
        description=(
            "Masked-autoencoder masking, reconstruction, training and adaptive instance "
            "segmentation of 2D images and 3D volumes, headless."
        ),
        epilog=(
            "train fits a model on a folder: the masked autoencoder on unlabelled images, or the "
            "segmentation decoder on images + --labels. finetune adapts a segmentation model to a few "
            "images from a few scribbled strokes. 'napari-mae COMMAND --help' describes each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"napari-mae {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


class CLIError(Exception):
    """An error to report to the user as one line on stderr with exit code 2."""


def check_output_path(
    path: str | None,
    option: str,
    suffixes: tuple[str, ...],
    what: str = "TIFF",
    *,
    overwrite: bool | None = None,
    folder_hint: str = "",
) -> Path | None:
    """Check an output file option before any work is done; return it as a Path.

    Raises ``CLIError`` when the path is a folder (``folder_hint`` is added to that message),
    when the name does not end in one of
    ``suffixes`` (case-insensitive; ``what`` names the formats in the message), when an existing
    parent of it is a file, or, with ``overwrite=False``, when it exists already: every
    command that writes a result file refuses to replace one unless ``--overwrite`` is
    given (``None``: the caller checks that itself, e.g. an atomic core writer). ``None``
    as ``path`` passes through.
    """
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        hint = f"; {folder_hint}" if folder_hint else ""
        raise CLIError(f"{option} {path} is a folder; give a file name ending in {', '.join(suffixes)}{hint}")
    if not str(out).lower().endswith(suffixes):
        raise CLIError(
            f"{option} {path}: only {what} output is written; use a name ending in {', '.join(suffixes)}"
        )
    if overwrite is not None:
        check_not_existing(out, option, overwrite=overwrite)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return out


def check_distinct_paths(inputs: dict, outputs: dict) -> None:
    """Refuse an output that is one of the inputs, or two outputs with the same path.

    Otherwise ``--overwrite`` replaces the user's image (or scribbles) with the result, or
    the later write silently replaces the earlier (``--out r.tif --save-mask r.tif`` left
    only the mask). ``inputs`` and ``outputs`` map an option's name (``"IMAGE"``,
    ``"--scribbles"``, ``"--out"``) to its path; None entries are skipped. Paths are compared
    after resolving links.

    Raises
    ------
    CLIError
        Naming the two options.
    """
    import os

    seen = {os.path.realpath(p): option for option, p in inputs.items() if p is not None}
    for option, path in outputs.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise CLIError(f"{option} {path} is the same file as {seen[key]}; give each output its own name")
        seen[key] = option


def check_not_existing(path: Path | None, option: str, *, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless ``--overwrite`` was given.

    The one rule of every command that writes a result file (``segment --out``,
    ``reconstruct --out`` and its ``--save-*``); folders of results (batch, train,
    finetune, demo) have the same rule in their own checks. ``None`` passes.

    Raises
    ------
    CLIError
        If ``path`` exists (as a file, a folder or a link) and ``overwrite`` is False,
        or it is a folder.
    """
    if path is None:
        return
    if path.is_dir():
        raise CLIError(f"{option} {path} is a folder; give a file name")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise CLIError(f"{option} {path} exists; choose another name, or pass --overwrite to replace it")


def check_segmentation_model(spec) -> None:
    """Refuse, before any other work, a bundled name that is no segmentation model (``default-3d``).

    The check is :func:`napari_mae.models.decoder.load_segmenter`'s: such a name's
    checkpoint is small and loads in a fraction of a second. Bundled segmentation models,
    paths and None pass without loading anything (they are loaded with the images).

    Raises
    ------
    napari_mae.io.checkpoint.CheckpointError
        ``spec`` names a bundled MAE that is not a segmentation model.
    """
    from napari_mae._names import BUNDLED_MODELS, bundled_segmenter_path

    if isinstance(spec, str) and spec in BUNDLED_MODELS and bundled_segmenter_path(spec) is None:
        from napari_mae.models.decoder import load_segmenter

        load_segmenter(spec)


@contextlib.contextmanager
def ctrl_c_stops(stop, what: str):
    """While a long job runs: the first Ctrl-C sets ``stop`` (a ``threading.Event`` the job
    checks between steps) and prints ``what`` it does then; a second one interrupts."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\nCtrl-C: {what} (Ctrl-C again quits at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the console script; return the process exit code.

    Errors the user can fix (``CLIError``, ``ValueError``, missing files, a file where a
    folder should be, permissions) are printed as one line on stderr and give exit
    code 2, not a traceback. A closed output pipe ends quietly with 141.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-mae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 141
    except (
        CLIError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        print(f"napari-mae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
