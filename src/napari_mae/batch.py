"""Segment a whole folder (or glob) of images: labels per file, one CSV of objects.

:func:`segment_folder` is a generator (the careamics pattern): it yields one
:class:`BatchUpdate` per file, so the CLI drives a progress bar from it and the Batch
widget runs it in napari's ``thread_worker`` (Stop = quitting the generator between
files). Per file it writes:

* ``OUTDIR/<name>_labels.tif`` (OME-TIFF with the voxel spacing; ``.nii.gz`` in the
  scanner's space for NIfTI/NRRD inputs), written under a temporary name and renamed,
  so a file interrupted mid-way is never taken for done;
* ``OUTDIR/.napari-mae-batch/<name>.json`` and ``<name>.csv``: what was estimated, and
  the file's object table (:func:`napari_mae.measure.object_table`:
  ``skimage.measure.regionprops_table`` with ``spacing``);

and at the end (also after Stop or an error) ``OUTDIR/objects.csv``: every file's
objects, with a ``file`` column. With ``resume`` the files already done are skipped
(their tables still go into the CSV), so a run stopped by Ctrl-C continues where it
was. A file that fails is reported in its update and the others go on.

No Qt or napari import here.
"""

from __future__ import annotations

import glob
import json
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["BatchUpdate", "list_images", "output_name", "segment_folder", "check_batch_output"]

RECORD_DIR = ".napari-mae-batch"
TABLE_NAME = "objects.csv"


@dataclass
class BatchUpdate:
    """One file's outcome.

    Attributes
    ----------
    index, total : int
        Position of the file (0-based) and number of files.
    path : Path
    status : str
        "done", "skipped" (done by an earlier run) or "failed".
    n_objects : int
    seconds : float
    error : str
        The failure, one line ("" unless failed).
    out : Path or None
        The labels written.
    info : dict
        ``segment_instances``' info (radius, threshold, ...) for a done file.
    """

    index: int
    total: int
    path: Path
    status: str
    n_objects: int = 0
    seconds: float = 0.0
    error: str = ""
    out: Path | None = None
    info: dict = field(default_factory=dict)


def _suffixes() -> tuple[str, ...]:
    from napari_mae.io.readers import SUPPORTED_SUFFIXES

    return SUPPORTED_SUFFIXES


def _is_image(p: Path) -> bool:
    from napari_mae.io.omezarr import is_zarr

    name = p.name.lower()
    if p.is_dir():
        return is_zarr(p)
    return p.is_file() and name.endswith(_suffixes())


def list_images(source: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The images of a folder (not recursive) or a glob pattern (``**`` recursive), sorted.

    Images are the files :func:`napari_mae.io.readers.read_image` reads (TIFF, PNG, JPEG,
    NIfTI, NRRD) and OME-Zarr folders; anything inside
    ``exclude`` (the output folder) is left out.

    Raises
    ------
    FileNotFoundError
        If ``source`` is neither an existing folder nor a pattern matching anything.
    """
    src = str(source)
    if any(ch in src for ch in "*?["):
        paths = [Path(p) for p in glob.glob(src, recursive=True)]
    else:
        folder = Path(src)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{src}: no such folder (give a folder or a glob pattern like 'data/*.tif')"
            )
        paths = list(folder.iterdir())
    ex = Path(exclude).resolve() if exclude is not None else None
    images = []
    for p in sorted(paths):
        if ex is not None and (p.resolve() == ex or ex in p.resolve().parents):
            continue
        if _is_image(p):
            images.append(p)
    if not images and any(ch in src for ch in "*?[") and not paths:
        raise FileNotFoundError(f"{src}: the pattern matches no file")
    return images


def output_name(path: Path) -> str:
    """``<name>_labels`` without the image suffix (``a.nii.gz`` -> ``a_labels``)."""
    from napari_mae.io.readers import image_stem

    return f"{image_stem(path)}_labels"


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Output stems, made unique for equal names in different folders (``a__b_labels``) and
    for equal stems of different formats in one folder (``a.tif``, ``a.png``: ``a_tif_labels``,
    ``a_png_labels``; the second overwrote the first)."""
    names = [output_name(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    out = []
    for p in paths:
        rel = p.resolve().relative_to(common)
        out.append(output_name(Path("__".join(rel.parts))))
    clash = {n for n in out if out.count(n) > 1}
    if clash:
        from napari_mae.io.readers import image_stem

        for i, p in enumerate(paths):
            if out[i] in clash:
                suffix = p.name[len(image_stem(p)) :].lstrip(".").replace(".", "_")
                out[i] = f"{out[i].removesuffix('_labels')}_{suffix}_labels"
    return out


def check_batch_output(out_dir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an output folder with an earlier run's files unless ``overwrite``/``resume``.

    Raises
    ------
    FileExistsError
        If ``out_dir`` holds an earlier batch run (or is not empty) and neither flag is set.
    NotADirectoryError
        If ``out_dir`` is a file.
    ValueError
        If both flags are set.
    """
    if overwrite and resume:
        raise ValueError("give either --overwrite or --resume, not both")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"--out {out_dir} exists and is not empty; pass --resume to skip the files already done "
            "or --overwrite to segment them all again"
        )


def _segment_one(path: Path, *, spacing, object_radius, threshold, bright_objects, method, model, progress):
    """Read and segment one file; return (labels, image, spacing, meta, channel_axis, info)."""
    from napari_mae.segmentation import segment_instances

    if path.is_dir():
        from napari_mae.io.omezarr import read_ome_zarr_image

        image, sp, meta = read_ome_zarr_image(path, plain=spacing is not None)
        image = np.asarray(image)
    else:
        from napari_mae.io.readers import read_image

        image, sp, meta = read_image(path)
    axes = str(meta.get("axes", ""))
    if "T" in axes:
        from napari_mae.io.readers import describe_layout

        raise ValueError(f"has a time axis ({describe_layout(image, meta)}); save one time point per file")
    channel_axis = image.ndim - 1 if axes.endswith("C") else None
    n_spatial = image.ndim - (channel_axis is not None)
    if spacing is not None:
        if len(spacing) != n_spatial:
            raise ValueError(f"--spacing has {len(spacing)} values, the image has {n_spatial} spatial axes")
        sp = tuple(spacing)
    elif sp is not None and len(sp) != n_spatial:
        sp = None
    kwargs = {} if method is None else {"method": method}
    if model is not None:
        kwargs["model"] = model
    labels, info = segment_instances(
        image,
        spacing=sp,
        channel_axis=channel_axis,
        object_radius=object_radius,
        threshold=threshold,
        bright_objects=bright_objects,
        progress=progress,
        **kwargs,
    )
    return labels, image, sp, meta, channel_axis, info


def _jsonable(info: dict) -> dict:
    from napari_mae._json import to_jsonable

    return json.loads(json.dumps(to_jsonable(info), allow_nan=True))


def _process_file(
    k: int, total: int, path: Path, name: str, out: Path, settings: dict, progress=None
) -> BatchUpdate:
    """Segment, write and measure one file; a failure is returned, not raised.

    Module-level so that dask workers run it (``segment_folder(client=...)``);
    ``settings``: ``spacing``, ``object_radius``, ``threshold``, ``bright_objects``,
    ``method``, ``model``.
    """
    from napari_mae._progress import Cancelled
    from napari_mae.io.writers import write_image
    from napari_mae.measure import object_table, write_table_csv

    records = out / RECORD_DIR
    rec_json, rec_csv = records / f"{name}.json", records / f"{name}.csv"
    spacing = settings.get("spacing")
    t0 = time.perf_counter()
    try:
        if settings.get("method") != "classical":  # auto may run the bundled decoder too
            _one_torch_thread_per_worker()
        labels, image, sp, meta, channel_axis, info = _segment_one(path, progress=progress, **settings)
        medical = str(meta.get("format", "")) != "ome-zarr" and "voxel_affine" in meta
        suffix = ".nii.gz" if medical and labels.ndim == 3 else ".tif"
        dest = out / f"{name}{suffix}"
        tmp = out / f"{name}.partial{suffix}"
        unit = meta.get("unit", "pixel")
        if spacing is not None and unit == "pixel":
            unit = "um"
        write_image(tmp, labels, spacing=sp, unit=unit, metadata=meta)
        os.replace(tmp, dest)
        table = object_table(labels, image, spacing=sp, channel_axis=channel_axis)
        write_table_csv(rec_csv, table)
        info = _jsonable(dict(info, out=str(dest), file=str(path), unit=unit))
        rec_json.write_text(json.dumps(info))
        return BatchUpdate(
            k, total, path, "done", n_objects=int(labels.max()),
            seconds=time.perf_counter() - t0, out=dest, info=info,
        )  # fmt: skip
    except Exception as exc:  # a bad file is reported; the others go on
        if isinstance(exc, Cancelled):
            raise
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        return BatchUpdate(
            k, total, path, "failed", seconds=time.perf_counter() - t0, error=msg,
            info={"traceback": traceback.format_exc(limit=3)},
        )  # fmt: skip


def _done_record(out: Path, rec_json: Path, rec_csv: Path) -> dict | None:
    """The record of a file an earlier run finished, or None if it is to be segmented again.

    A file counts as done only when its record, its object table and its labels file
    (the record's ``out``, looked up in ``out`` by name) all exist: a labels file the user
    deleted is written again, not trusted from the hidden records.
    """
    if not (rec_json.is_file() and rec_csv.is_file()):
        return None
    try:
        rec = json.loads(rec_json.read_text())
    except (OSError, ValueError):
        return None  # a torn or foreign record: segment the file again
    labels = rec.get("out") if isinstance(rec, dict) else None
    if not labels or not (out / Path(labels).name).is_file():
        return None
    return rec


def _one_torch_thread_per_worker() -> None:
    from napari_mae.distributed import _one_torch_thread_per_worker as limit

    limit()


def segment_folder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    object_radius: float | None = None,
    threshold: float | None = None,
    bright_objects: bool | None = None,
    method: str | None = None,
    model=None,
    resume: bool = False,
    overwrite: bool = False,
    client=None,
    progress=None,
) -> Iterator[BatchUpdate]:
    """Segment every image of a folder or glob; yield one :class:`BatchUpdate` per file.

    Parameters
    ----------
    source : str or path
        A folder (its images, not recursive) or a glob pattern (see :func:`list_images`).
    out_dir : str or path
        Output folder (created).
    spacing : sequence of float or None
        Voxel size for every file, (Z,) Y, X; None reads each file's own.
    object_radius, threshold, bright_objects
        As :func:`napari_mae.segmentation.segment_instances`; None estimates them per file.
    method : str or None
        ``segment_instances``' method, passed only when given.
    model : str, path or None
        ``segment_instances``' model (the learned method's segmentation model: a name or
        a checkpoint path, loaded once per process), passed only when given.
    resume : bool
        Skip files done by an earlier run into ``out_dir``.
    overwrite : bool
        Segment every file again (an existing ``out_dir`` is otherwise refused).
    client : distributed.Client or None
        Run the files on its workers, one file per task (the workers must see
        ``source`` and ``out_dir``); updates come in the order the files finish and
        ``progress`` is not called. None: one after the other in this process.
    progress : callable or None
        ``progress(done, total, message)`` within the current file (``client=None``).

    Yields
    ------
    BatchUpdate

    Raises
    ------
    FileExistsError, NotADirectoryError, ValueError
        See :func:`check_batch_output`; FileNotFoundError from :func:`list_images`, or
        for a ``model`` that names no file and no bundled or preset model.
    """
    out = Path(out_dir)
    if model is not None and method != "classical":
        from napari_mae.segmentation.segment import _check_model_exists

        _check_model_exists(model)  # a mistyped model fails once, before any output, not per file
    check_batch_output(out, overwrite=overwrite, resume=resume)
    paths = list_images(source, exclude=out)
    records = out / RECORD_DIR
    records.mkdir(parents=True, exist_ok=True)
    names = _unique_names(paths)
    total = len(paths)
    settings = dict(
        spacing=None if spacing is None else tuple(spacing), object_radius=object_radius,
        threshold=threshold, bright_objects=bright_objects, method=method, model=model,
    )  # fmt: skip
    futures: list = []
    try:
        todo = []
        for k, (path, name) in enumerate(zip(paths, names)):
            rec_json, rec_csv = records / f"{name}.json", records / f"{name}.csv"
            rec = _done_record(out, rec_json, rec_csv) if resume and not overwrite else None
            if rec is not None:
                yield BatchUpdate(
                    k, total, path, "skipped", n_objects=int(rec.get("n_objects", 0)),
                    out=Path(rec["out"]) if rec.get("out") else None, info=rec,
                )  # fmt: skip
            elif client is None:
                yield _process_file(k, total, path, name, out, settings, progress)
            else:
                todo.append((k, path, name))
        if client is not None and todo:
            from distributed import as_completed

            futures = [
                client.submit(_process_file, k, total, path, name, out, settings, pure=False)
                for k, path, name in todo
            ]
            where = {f.key: (k, path) for f, (k, path, _) in zip(futures, todo)}
            for f in as_completed(futures):
                try:
                    up = f.result()
                except Exception as exc:  # the worker died (KilledWorker): this file failed
                    k, path = where[f.key]
                    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                    up = BatchUpdate(k, total, path, "failed", error=msg)
                yield up
    finally:
        if futures:
            client.cancel(futures)  # Stop / Ctrl-C: the files not started are not run
        combine_tables(out, paths, names)


def combine_tables(out_dir: Path, paths: Sequence[Path], names: Sequence[str]) -> Path | None:
    """``out_dir/objects.csv``: the per-file tables of ``names`` done so far, with ``file``."""
    import csv

    rows, columns = [], ["file"]
    for path, name in zip(paths, names):
        rec = Path(out_dir) / RECORD_DIR / f"{name}.csv"
        if not rec.is_file():
            continue
        with open(rec, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for key in row:
                    if key not in columns:
                        columns.append(key)
                rows.append({"file": str(path), **row})
    if not rows and not any((Path(out_dir) / RECORD_DIR).glob("*.csv")):
        return None
    dest = Path(out_dir) / TABLE_NAME
    tmp = dest.with_suffix(".partial.csv")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, dest)
    return dest
