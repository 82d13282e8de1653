"""Which files a training run reads, and the seeds of its random streams (torch-free).

The CLI and the Training widget use these before any torch import.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_PATTERNS", "DEFAULT_PERCENTILES", "find_images", "sample_seed"]

#: File patterns matched (case-insensitively, recursively) by :func:`find_images`.
DEFAULT_PATTERNS: tuple[str, ...] = (
    "*.tif",
    "*.tiff",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.nii",
    "*.nii.gz",
    "*.nrrd",
)

#: Relative paths left out by default: annotation files kept beside the images (a
#: ``labels/`` or ``masks/`` folder, ``labels.tif``, ``cell_01_mask.tif``), which an MAE
#: must not learn as if they were images.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "labels/*",
    "*/labels/*",
    "masks/*",
    "*/masks/*",
    "labels.*",
    "*/labels.*",
    "*_labels.*",
    "*_label.*",
    "*_mask.*",
    "*_masks.*",
    "*_seg.*",
)

#: Percentiles mapped to 0 and 1 by the intensity scaling (same as
#: ``napari_mae.preprocess.normalize_percentile``'s defaults).
DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.8)


def find_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    *,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """List the image files in one or several folders, recursively.

    Parameters
    ----------
    sources : path or sequence of paths
        Folders searched recursively, or individual files (kept whatever their
        name).
    patterns : sequence of str
        ``fnmatch`` patterns matched case-insensitively against file names
        (``*.nii.gz`` matches ``scan.NII.GZ``). Hidden files and folders (name
        starting with ``.``, such as macOS ``._x.tif`` resource forks) are
        ignored.
    exclude : sequence of str
        ``fnmatch`` patterns matched case-insensitively against the path
        relative to its source folder, with ``/`` separators; matching files
        are left out (e.g. ``("labels/*", "*label*")``).

    Returns
    -------
    list of pathlib.Path
        Sorted, without duplicates.

    Raises
    ------
    FileNotFoundError
        If a source does not exist.
    ValueError
        If no file matches (the message names the folders and patterns).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    lowered = [p.lower() for p in patterns]
    excluded = [p.lower() for p in exclude]
    found: set[Path] = set()
    for source in sources:
        root = Path(source).expanduser()
        if root.is_file():
            found.add(root.resolve())
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix().lower()
                if any(fnmatch.fnmatchcase(name.lower(), p) for p in lowered) and not any(
                    fnmatch.fnmatchcase(rel, p) for p in excluded
                ):
                    found.add(path.resolve())
    if not found:
        names = ", ".join(str(s) for s in sources)
        raise ValueError(f"no images matching {' '.join(patterns)} found in {names}")
    return sorted(found)


def sample_seed(seed: int, *keys: int) -> int:
    """Return a 32-bit seed derived from ``seed`` and integer keys.

    Uses ``numpy.random.SeedSequence`` so that nearby keys give unrelated
    streams. Used for per-sample augmentation (``keys = (epoch, index)``) and
    per-step masks in :mod:`napari_mae.training.loop`.
    """
    return int(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(1)[0])
