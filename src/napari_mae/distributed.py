"""Out-of-core, block-wise instance segmentation on dask.distributed, written to Zarr.

The recipe of Cellpose's ``distributed_segmentation`` (blocks with overlap, ids made
unique, labels stitched across block faces), on :func:`napari_mae.segmentation.segment_instances`:

1. **Global parameters, once** (:func:`estimate_global_parameters`): the intensity range
   (1st / 99.8th percentiles of the whole volume, read through a strided subsample),
   polarity, object radius and threshold, from ``segment_instances`` on crops of full
   resolution (:func:`sample_crops`: ``sample_voxels`` in 4 crops, run in parallel on the
   workers; the whole volume when it is smaller). The method that ran there (the learned
   decoder or the classical pipeline; ``method="auto"`` is resolved once) runs in every
   block. Every block is then normalised by the volume's range and segmented with the
   same radius, polarity and (classical) threshold, or (learned) at the same scale (see
   :func:`segment_block`), so blocks full of objects and nearly empty blocks cut at the
   same level, and a block sees the values the whole volume has there.
2. **Blocks**: the volume is cut into cores (``block_shape``, the output's Zarr chunks);
   each is segmented with an overlap of at least two object diameters on every side,
   cropped back to its core and written straight into a Zarr array, one chunk per block,
   with a small file per finished block (its object count and its face planes). Finished
   blocks are skipped on a rerun (``resume``): a run killed mid-way continues from them.
3. **Stitching**: ids are made unique by the blocks' cumulative counts; on every face
   between two blocks, the labels of the two blocks that cover the same object are linked:
   each block has segmented the two planes on either side of the face (one in its core,
   one in its margin), and a label of one and a label of the other that share at least
   half of the smaller one's pixels there are the same object (:func:`_face_links`).
   Connected components of those links give the final, consecutive ids, which are
   written as OME-Zarr labels (``ome_zarr.writer.write_labels``), chunk by chunk on the
   cluster.

The blocks run on a ``dask.distributed`` client: a ``LocalCluster`` of ``n_workers``
single-threaded worker processes by default, or any scheduler by address. ``client=None``
in :func:`segment_blockwise` runs the same blocks one after the other in this process
(the single-process reference path: identical labels). The learned method's model is
best given by name or path: it travels as text and each worker process loads it once
(``segmentation.learned.cached_segmenter``); a learned block uses one torch thread per
worker thread.

No Qt or napari import here.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_mae._progress import ProgressCallback, report

__all__ = [
    "GlobalParameters",
    "BlockwiseError",
    "SchedulerError",
    "estimate_global_parameters",
    "segment_block",
    "block_grid",
    "segment_blockwise",
    "dask_client",
]

_WORK_SUFFIX = ".napari-mae-work"


class BlockwiseError(RuntimeError):
    """A block-wise run that could not finish (the message says what to do)."""


class SchedulerError(BlockwiseError):
    """No dask scheduler answered at the address given."""


@dataclass(frozen=True)
class GlobalParameters:
    """Segmentation parameters shared by every block.

    Attributes
    ----------
    intensity_range : tuple of float
        ``(lo, hi)``: the volume's 1st and 99.8th percentiles (intensity units of the file);
        the unit in which ``threshold`` is given. For the learned method, those of the
        volume smoothed by ``learned.INPUT_SMOOTHING`` pixels, the scaling the decoder's
        input gets in memory (:func:`napari_mae.segmentation.learned.decoder_input`).
    object_radius : float
        Physical units (of ``spacing``).
    bright_objects : bool
    threshold : float
        Foreground threshold on the background-subtracted image normalised by
        ``intensity_range`` (the classical method's threshold); NaN for the learned method
        (its decoder's maps are cut at its own fixed thresholds).
    spacing : tuple of float
        Physical size per axis.
    method : {"classical", "learned"}
        The method every block runs: the one that ran on the sample (``method="auto"``
        is resolved there, once).

    Raises
    ------
    ValueError
        If the radius is not positive, the range is empty, the method unknown, or the
        classical method has no finite threshold.
    """

    intensity_range: tuple[float, float]
    object_radius: float
    bright_objects: bool
    threshold: float
    spacing: tuple[float, ...]
    method: str = "classical"

    def __post_init__(self) -> None:
        if self.method not in ("classical", "learned"):
            raise ValueError(f"method must be 'classical' or 'learned', got {self.method!r}")
        if not (math.isfinite(self.object_radius) and self.object_radius > 0):
            raise ValueError(f"object_radius must be a positive number, got {self.object_radius!r}")
        lo, hi = self.intensity_range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"intensity_range must be finite with hi > lo, got {self.intensity_range!r}")
        if self.method == "classical" and not math.isfinite(self.threshold):
            raise ValueError(f"the classical method needs a finite threshold, got {self.threshold!r}")

    @classmethod
    def from_dict(cls, d: dict) -> GlobalParameters:
        """From :func:`dataclasses.asdict` after a JSON round trip (lists, None for NaN)."""
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if d.get("threshold") is None:
            d["threshold"] = float("nan")
        return cls(**d)


# --------------------------------------------------------------------------- parameters


def _as_dask(image):
    """A dask view of a numpy, Zarr or any sliceable array (``shape``, ``dtype``, ``[]``)."""
    import dask.array as da

    if isinstance(image, da.Array):
        return image
    chunks = getattr(image, "chunks", None)  # a Zarr array's own chunks
    if chunks is None or isinstance(image, np.ndarray):
        chunks = tuple(min(256, n) for n in image.shape)
    return da.from_array(image, chunks=chunks)


def _read(image, slices) -> np.ndarray:
    """``image[slices]`` as numpy, for numpy, Zarr or dask inputs (dask without a client)."""
    import dask.array as da

    if isinstance(image, da.Array):
        return np.asarray(image[slices].compute(scheduler="synchronous"))
    return np.asarray(image[slices])


class _Source:
    """A lazily read array (Zarr, dask on Zarr) that workers slice themselves."""

    def __init__(self, array):
        self.array = array
        self.shape = tuple(array.shape)

    def __getitem__(self, slices) -> np.ndarray:
        return _read(self.array, slices)


def _central_crop(shape: Sequence[int], max_voxels: int) -> tuple[slice, ...]:
    f = min(1.0, (max_voxels / float(np.prod(shape))) ** (1.0 / len(shape)))
    side = [max(1, min(n, int(round(n * f)))) for n in shape]
    return tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(shape, side))


def sample_crops(shape: Sequence[int], sample_voxels: int, n_samples: int = 4) -> list[tuple[slice, ...]]:
    """Where the global parameters are estimated: crops of full resolution.

    The whole volume when it holds at most ``sample_voxels``; else ``n_samples`` crops of
    ``sample_voxels / n_samples`` each, centred on points spread along the volume's
    longest axis (in its middle along the others), so that they can run in parallel on
    the workers and see more of the volume than one central crop.

    Returns
    -------
    list of tuple of slice
        One tuple of ``len(shape)`` slices per crop.
    """
    shape = tuple(int(n) for n in shape)
    if float(np.prod(shape)) <= sample_voxels or n_samples <= 1:
        return [_central_crop(shape, sample_voxels)]
    one = _central_crop(shape, sample_voxels // n_samples)
    side = [s.stop - s.start for s in one]
    axis = int(np.argmax([n - s for n, s in zip(shape, side)]))  # most room to spread the crops
    crops = []
    for k in range(n_samples):
        c = (k + 0.5) / n_samples * shape[axis]
        start = int(round(min(max(c - side[axis] / 2, 0), shape[axis] - side[axis])))
        crop = list(one)
        crop[axis] = slice(start, start + side[axis])
        crops.append(tuple(crop))
    return crops


def _intensity_range(x: np.ndarray) -> tuple[float, float]:
    """The range ``segment_instances`` normalises one array by (``as_float_image``)."""
    from napari_mae.preprocess import percentile_range

    lo, hi = percentile_range(x[None], 1.0, 99.8)
    return float(lo[0]), float(hi[0])


def _may_run_learned(method, model) -> bool:
    """Whether ``segment_instances`` may run the learned method (``method="auto"``: when a model is named)."""
    return method == "learned" or (method in (None, "auto") and model is not None)


def _sample_info(image, crop, sp, object_radius, bright_objects, method, model) -> dict:
    """``segment_instances``' info on one sample crop, its range; a task for the workers."""
    from napari_mae.segmentation import segment_instances

    sample = _read(image, crop).astype(np.float32, copy=False)
    if _may_run_learned(method, model):
        _one_torch_thread_per_worker()
    _, info = segment_instances(
        sample,
        spacing=sp,
        object_radius=object_radius,
        bright_objects=bright_objects,
        **_method_kwargs(method, model),
    )
    lo_s, hi_s = _intensity_range(sample)
    keep = ("n_objects", "radius", "radius_planes", "threshold", "bright_objects", "method", "message")
    out = {k: info[k] for k in keep if k in info}
    return dict(out, range=(lo_s, hi_s), crop=[[s.start, s.stop] for s in crop])


def estimate_global_parameters(
    image,
    *,
    spacing: Sequence[float] | None = None,
    object_radius: float | None = None,
    threshold: float | None = None,
    bright_objects: bool | None = None,
    sample_voxels: int = 2**22,
    n_samples: int = 4,
    method: str | None = None,
    model=None,
    client=None,
) -> tuple[GlobalParameters, dict]:
    """Estimate normalisation, polarity, radius and threshold once for a whole volume.

    Parameters
    ----------
    image : ndarray, zarr.Array or dask.array.Array, shape ``([Z,] Y, X)``
        One channel; read lazily (a strided subsample for the range, the sample crops).
    spacing : sequence of float or None
        Physical size per axis; None is isotropic 1.
    object_radius, threshold, bright_objects
        Given values are kept; the others are estimated. ``threshold`` is in units of the
        volume's normalised intensity (:attr:`GlobalParameters.threshold`).
    sample_voxels : int
        Voxels (full resolution) that ``segment_instances`` estimates the radius,
        polarity and threshold on, in :func:`sample_crops` (``n_samples`` crops; one crop,
        the whole volume, when it is no larger). Per crop with objects: its radius, its
        polarity and its threshold in the volume's units; the median radius, the majority
        polarity (bright on a tie) and the median threshold are kept.
    n_samples : int
        Number of crops for a volume larger than ``sample_voxels`` (independent of the
        number of workers, so 1 and N workers get the same parameters).
    method : {"auto", "learned", "classical"} or None
        ``segment_instances``' method (None: its default, ``"auto"``); the method that ran
        on the sample is the one every block runs (:attr:`GlobalParameters.method`).
    model : str, path, InstanceDecoder or None
        The learned method's segmentation model (``segment_instances(model=...)``).
    client : distributed.Client or None
        Runs the sample crops in parallel on its workers; None: here, one after the other.

    Returns
    -------
    params : GlobalParameters
    info : dict
        ``samples``: per crop, its ``segment_instances`` info (``n_objects``, ``radius``,
        ``threshold``, ``bright_objects``, ``method``, ``message``), ``range`` and
        ``crop`` (slices as ``[start, stop]`` lists).

    Raises
    ------
    ValueError
        If the image is not 2D/3D, has no finite pixel, or no sample has an object and
        no ``object_radius``/``threshold`` were given.
    """
    from napari_mae.preprocess import percentile_range

    ndim = len(image.shape)
    if ndim not in (2, 3):
        raise ValueError(
            f"block-wise segmentation needs a 2D image or 3D volume, got shape {tuple(image.shape)}"
        )
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * ndim
    if len(sp) != ndim:
        raise ValueError(f"spacing must have {ndim} values, got {sp}")
    crops = sample_crops(image.shape, sample_voxels, n_samples)
    args = (sp, object_radius, bright_objects, method)
    # float32 values, as segment_instances (as_float_image) takes the percentiles: a
    # volume that fits in memory gets the same range here and there, to the last bit.
    volume = _as_dask(image).astype(np.float32)[None]
    # The learned method scales the decoder's input by the range of the volume smoothed
    # by learned.INPUT_SMOOTHING px (learned.decoder_input does so in memory): taken where
    # the learned method may run, and used where it does; the plain range where the
    # classical one may (each is a pass over the volume).
    maybe_learned = _may_run_learned(method, model)

    def ranges():
        plain = percentile_range(volume, 1.0, 99.8) if method != "learned" else None
        if not maybe_learned:
            return plain, None
        from napari_mae.segmentation.learned import INPUT_SMOOTHING

        return plain, percentile_range(volume, 1.0, 99.8, smooth=INPUT_SMOOTHING)

    if client is None:
        plain, smoothed = ranges()
        samples = [_sample_info(image, crop, *args, model) for crop in crops]
    else:
        src = _shippable(client, image)
        model_f = _shippable_model(client, model)
        futures = [client.submit(_sample_info, src, crop, *args, model_f, pure=False) for crop in crops]
        plain, smoothed = ranges()  # meanwhile, on this client
        samples = client.gather(futures)
    found = [s for s in samples if s.get("n_objects", 0) > 0]
    used = found or samples
    methods = {s.get("method", "classical") for s in used}
    run_method = "learned" if "learned" in methods else "classical"
    lo, hi = smoothed if run_method == "learned" and smoothed is not None else plain
    lo_g, hi_g = float(lo[0]), float(hi[0])
    if object_radius is not None:
        radius = float(object_radius)
    else:
        # The learned 3D path measures the objects on a few planes (radius_planes).
        radii = [s.get("radius_planes") or s.get("radius", float("nan")) for s in found]
        radii = [float(r) for r in radii if r is not None and math.isfinite(r)]
        radius = float(np.median(radii)) if radii else float("nan")
    if bright_objects is None:
        votes = [bool(s["bright_objects"]) for s in used if "bright_objects" in s]
        bright_objects = sum(votes) * 2 >= len(votes) if votes else True
    if threshold is None and run_method == "classical":
        # Each sample was normalised by its own range; its cut in the volume's units.
        cuts = [
            float(s["threshold"]) * (s["range"][1] - s["range"][0]) / (hi_g - lo_g)
            for s in found
            if math.isfinite(float(s.get("threshold", float("nan"))))
        ]
        if not cuts:
            sizes = ", ".join(str(tuple(b - a for a, b in s["crop"])) for s in samples)
            msgs = "; ".join(sorted({s.get("message") or "none found" for s in samples}))
            raise ValueError(
                f"the sample crops ({sizes}) of the volume have no object ({msgs}); give the object radius "
                "and threshold (--radius, --threshold) or a larger sample"
            )
        threshold = float(np.median(cuts))
    elif threshold is None:
        threshold = float("nan")
    if not found and object_radius is None:
        raise ValueError(
            "the sample crops of the volume have no object; give the object radius (--radius) or a larger sample"
        )
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"no object radius could be estimated from the sample (got {radius}); give --radius")
    params = GlobalParameters(
        intensity_range=(lo_g, hi_g),
        object_radius=radius,
        bright_objects=bool(bright_objects),
        threshold=float(threshold),
        spacing=sp,
        method=run_method,
    )
    return params, {"samples": samples}


def _method_kwargs(method: str | None, model=None) -> dict:
    # method= and model= are passed only when given (segment_instances' own defaults), except
    # that "auto" without a model is the classical pipeline here: auto's bundled decoder is for
    # images that fit in memory (segment.AUTO_LEARNED_MAX_PIXELS), and block-wise runs are for
    # those that do not; a sample crop of one must not switch the whole run to the decoder.
    if method in (None, "auto") and model is None:
        return {"method": "classical"}
    kw: dict[str, Any] = {} if method is None else {"method": method}
    if model is not None:
        kw["model"] = model
    return kw


def _one_torch_thread_per_worker() -> None:
    """In a dask worker: torch uses as many threads as the worker has (1 by default).

    dask's nanny sets ``OMP_NUM_THREADS=1`` before a worker process starts, but not for
    thread workers nor where the config changes it; two single-threaded workers on two
    cores must not each start a torch thread pool of two.
    """
    try:
        from distributed import get_worker

        n = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):  # not in a worker
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _shippable(client, image):
    """What the tasks get for ``image``: a scattered numpy array, or a lazy reader."""
    if isinstance(image, np.ndarray):
        [image_f] = client.scatter([image], broadcast=True, hash=False)
        return image_f
    # Not a dask collection in the task's arguments (the client would compute it whole
    # first): each worker reads its own block from the (Zarr-backed) array.
    return _Source(image)


def _shippable_model(client, model):
    """A model given as an object is sent once to every worker; names and paths as text.

    A path travels as an absolute path (the workers of a remote scheduler must see the
    same file system); each worker process loads it once
    (:func:`napari_mae.segmentation.learned.cached_segmenter`).
    """
    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return str(p.resolve()) if p.is_file() else str(model)
    [model_f] = client.scatter([model], broadcast=True, hash=False)
    return model_f


def segment_block(block: np.ndarray, params: GlobalParameters, *, model=None) -> np.ndarray:
    """Segment one block with the global parameters.

    The block is normalised by the volume's range (``segment_instances(intensity_range=)``),
    not by its own percentiles, and segmented with the volume's radius and polarity: it
    sees the values the whole volume has there. Classical method: cut at the volume's
    threshold. Learned method: at the volume's radius as it is
    (``radius_from_planes=False``: the 3D decoder does not re-measure it on the block's
    planes), so every block is resampled by the same factor; the decoder's maps are cut
    at its own thresholds.

    Parameters
    ----------
    block : ndarray, shape ``([Z,] Y, X)``
    params : GlobalParameters
    model : str, path, InstanceDecoder or None
        The learned method's segmentation model (None: the bundled ``default-2d``).

    Returns
    -------
    labels : ndarray of uint32, shape ``block.shape``
    """
    from napari_mae.segmentation import segment_instances

    x = np.asarray(block, dtype=np.float32)
    if not np.isfinite(x).any() or np.nanmax(x) == np.nanmin(x):
        return np.zeros(x.shape, np.uint32)
    if params.method == "learned":
        _one_torch_thread_per_worker()
        kw = {"method": "learned", "model": model, "radius_from_planes": False}
    else:
        kw = {"method": "classical", "threshold": params.threshold}
    labels, _ = segment_instances(
        x,
        spacing=params.spacing,
        object_radius=params.object_radius,
        bright_objects=params.bright_objects,
        intensity_range=params.intensity_range,
        **kw,
    )
    return labels.astype(np.uint32, copy=False)


# --------------------------------------------------------------------------- blocks


def default_block_shape(shape: Sequence[int], radius_px: Sequence[float]) -> tuple[int, ...]:
    """Cores of 256^3 voxels (3D) or 2048^2 pixels (2D), at least 4 object diameters wide."""
    side = 256 if len(shape) == 3 else 2048
    return tuple(int(min(n, max(side, math.ceil(8 * r)))) for n, r in zip(shape, radius_px))


def block_overlap(radius_px: Sequence[float]) -> tuple[int, ...]:
    """Overlap per side: two object diameters (4 radii) + 2 pixels."""
    return tuple(int(math.ceil(4 * r)) + 2 for r in radius_px)


def block_grid(shape: Sequence[int], block_shape: Sequence[int], overlap: Sequence[int]):
    """Every block of the grid: ``(index, core slices, outer slices, core within outer)``."""
    counts = [-(-n // b) for n, b in zip(shape, block_shape)]
    for index in itertools.product(*[range(c) for c in counts]):
        core, outer, inner = [], [], []
        for i, b, m, n in zip(index, block_shape, overlap, shape):
            c0, c1 = i * b, min((i + 1) * b, n)
            o0, o1 = max(c0 - m, 0), min(c1 + m, n)
            core.append(slice(c0, c1))
            outer.append(slice(o0, o1))
            inner.append(slice(c0 - o0, c1 - o0))
        yield index, tuple(core), tuple(outer), tuple(inner)


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inv = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.reshape(labels.shape).astype(np.uint32), int(ids.size - (ids[0] == 0))


def _face_links(va: np.ndarray, vb: np.ndarray, min_overlap: float = 0.5) -> np.ndarray:
    """Pairs ``(a, b)`` of labels that two blocks' views of the same pixels agree on.

    ``va``, ``vb``: the same pixels (the planes beside one face) as labelled by each block.
    ``a`` and ``b`` are linked where they share at least ``min_overlap`` of the smaller
    one's pixels. (Cellpose links labels shrunk by 1 pixel that touch across the face;
    that leaves the thin cap of an object barely cut by a face as its own object, and
    links two different objects that touch at the face.)
    """
    both = (va > 0) & (vb > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    pairs, shared = np.unique(np.stack([va[both], vb[both]], axis=1), axis=0, return_counts=True)
    n_a = np.bincount(va, minlength=int(va.max()) + 1)
    n_b = np.bincount(vb, minlength=int(vb.max()) + 1)
    smaller = np.minimum(n_a[pairs[:, 0]], n_b[pairs[:, 1]])
    return pairs[shared >= min_overlap * smaller].astype(np.int64)


def _block_name(index) -> str:
    return "b_" + "_".join(str(i) for i in index) + ".npz"


def _run_block(image, index, outer, inner, core, raw_path: str, blocks_dir: str, params, model) -> int:
    """Segment one block, write its core into the raw Zarr array and its record; return n."""
    import zarr

    labels = segment_block(_read(image, outer), params, model=model)
    ids = np.unique(labels[inner])
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)  # core ids 1..n; margin-only ids 0
    crop, n = lut[labels[inner]], int(ids.size)
    zarr.open_array(raw_path, mode="r+")[core] = crop
    faces = {}
    for d in range(crop.ndim):
        # This block's view of the two planes on either side of each face: its core's
        # first/last plane and the plane beyond it (in its margin), in core ids.
        for side, k_in, k_out in (
            ("lo", inner[d].start, inner[d].start - 1),
            ("hi", inner[d].stop - 1, inner[d].stop),
        ):
            if not 0 <= k_out < labels.shape[d]:
                continue  # the volume's edge: no face there
            plane = tuple(slice(k_in, k_in + 1) if a == d else inner[a] for a in range(crop.ndim))
            beyond = tuple(slice(k_out, k_out + 1) if a == d else inner[a] for a in range(crop.ndim))
            faces[f"{side}{d}_in"] = lut[labels[plane]].squeeze(d)
            faces[f"{side}{d}_out"] = lut[labels[beyond]].squeeze(d)
    final = Path(blocks_dir) / _block_name(index)
    tmp = final.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, n=np.int64(n), **faces)
    os.replace(tmp, final)  # the record appears only once the chunk is written
    return n


def _load_record(path: Path, keys: Sequence[str] = ("n",)) -> dict | None:
    """A finished block's record (only ``keys``: the client keeps the counts, and reads the
    face planes of two blocks at a time when it stitches); None if there is none."""
    try:
        with np.load(path) as f:  # an .npz reads only the members asked for
            return {k: f[k] for k in keys}
    except Exception:
        return None


def _stitch(
    grid: list, records: dict, counts: Sequence[int], blocks_dir: Path
) -> tuple[np.ndarray, dict, int]:
    """Global lookup table old -> final id from the block counts and face links.

    Returns ``(lut, offsets, n_links)``: ``lut[offsets[index] + local]`` is the final id.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets, total = {}, 0
    for index, *_ in grid:
        offsets[index] = total
        total += int(records[index]["n"])
    a_all, b_all = [], []
    ndim = len(counts)
    for index, *_ in grid:
        for d in range(ndim):
            if index[d] + 1 >= counts[d]:
                continue
            nb = tuple(i + (k == d) for k, i in enumerate(index))
            # Face at k: block A (below) saw planes k-1 (core) and k (margin); block B
            # (above) saw k-1 (margin) and k (core). Where the two views agree about an
            # object (a of A and b of B share at least half of the smaller one's pixels
            # there), a and b are the same object.
            rec_a = _load_record(Path(blocks_dir) / _block_name(index), (f"hi{d}_in", f"hi{d}_out"))
            rec_b = _load_record(Path(blocks_dir) / _block_name(nb), (f"lo{d}_out", f"lo{d}_in"))
            if rec_a is None or rec_b is None:
                raise BlockwiseError(f"the record of block {index} or {nb} in {blocks_dir} is unreadable")
            va = np.concatenate([rec_a[f"hi{d}_in"].ravel(), rec_a[f"hi{d}_out"].ravel()])
            vb = np.concatenate([rec_b[f"lo{d}_out"].ravel(), rec_b[f"lo{d}_in"].ravel()])
            pairs = _face_links(va, vb)
            if pairs.size:
                a_all.append(pairs[:, 0] + offsets[index])
                b_all.append(pairs[:, 1] + offsets[nb])
    n_nodes = total + 1
    if a_all:
        a = np.concatenate(a_all)
        b = np.concatenate(b_all)
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n_nodes, n_nodes))
        _, comp = connected_components(graph, directed=False)
    else:
        a = np.zeros(0)
        comp = np.arange(n_nodes)
    # Node 0 (background) is alone in component 0; components are numbered in order of
    # their smallest node, so the final ids are consecutive and follow the block order.
    return comp.astype(np.uint32), offsets, int(a.size)


def _relabel_chunk(raw_path: str, core, lut_slice: np.ndarray) -> np.ndarray:
    import zarr

    raw = zarr.open_array(raw_path, mode="r")[core]
    return lut_slice[raw]


# --------------------------------------------------------------------------- clients


@contextlib.contextmanager
def dask_client(
    n_workers: int | None = None,
    scheduler: str | None = None,
    *,
    memory_limit: str | int | None = None,
    processes: bool = True,
    timeout: float = 5.0,
):
    """A ``dask.distributed.Client``: on ``scheduler`` (an address) or a new LocalCluster.

    Parameters
    ----------
    n_workers : int or None
        Workers of the LocalCluster (one thread each); None: one per core.
    scheduler : str or None
        Address of a running scheduler, e.g. ``"tcp://host:8786"``.
    memory_limit : str, int or None
        Per worker (LocalCluster only), e.g. ``"2GB"``; None: dask's default share.
    processes : bool
        Worker processes (True) or threads in this process.
    timeout : float
        Seconds to wait for the scheduler to answer.

    Raises
    ------
    SchedulerError
        If no scheduler answers at ``scheduler`` within ``timeout`` seconds.
    ValueError
        If ``n_workers`` is not positive.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(
                f"no dask scheduler answered at {scheduler} within {timeout:g} s ({exc}); "
                "start one (dask scheduler) or leave out --scheduler to use local workers"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    if n_workers is not None and n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    kwargs: dict[str, Any] = {"memory_limit": memory_limit} if memory_limit is not None else {}
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        **kwargs,
    ) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


# --------------------------------------------------------------------------- the run


def work_dir_for(out: str | os.PathLike) -> Path:
    """Where a run keeps its finished blocks until the labels are written."""
    out = Path(out)
    return out.parent / (out.name + _WORK_SUFFIX)


def check_output(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> str:
    """Decide what to do with an existing output; return "new", "resume" or "done".

    Raises
    ------
    FileExistsError
        If the output (or an unfinished run's work folder) exists and neither
        ``overwrite`` nor ``resume`` is set.
    ValueError
        If both are set, or ``out`` lies inside a plain Zarr *array* (labels can be
        written beside an image only in a Zarr group: pass another store as ``--out``).
    """
    if overwrite and resume:
        raise ValueError("give either --overwrite or --resume, not both")
    out = Path(out)
    _check_not_inside_zarr_array(out)
    work = work_dir_for(out)
    if not out.exists() and not work.exists():
        return "new"
    if overwrite:
        for p in (out, work):
            if p.exists():
                shutil.rmtree(p)
        return "new"
    if not resume:
        what = "an unfinished run" if work.exists() else "labels"
        raise FileExistsError(
            f"{out} exists ({what}); pass --resume to continue it or --overwrite to start again"
        )
    return "resume" if work.exists() else "done"


def _check_not_inside_zarr_array(out: Path) -> None:
    """Refuse an output under a plain Zarr array (``A.zarr/labels/napari-mae`` of an array ``A.zarr``).

    A Zarr array cannot hold child nodes: writing the labels there fails only at the end,
    after every block, and leaves the work folder inside the input store.
    """
    for store in out.parents:
        if (store / ".zarray").is_file() or _is_v3_array(store / "zarr.json"):
            raise ValueError(
                f"{store} is a plain Zarr array, which cannot hold labels beside it; "
                f"write them to another store with --out (e.g. --out {store.with_name(store.name + '.labels.zarr')})"
            )


def _is_v3_array(meta: Path) -> bool:
    """Whether ``meta`` is the ``zarr.json`` of a Zarr v3 array."""
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def segment_blockwise(
    image,
    out: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    axes: str | None = None,
    block_shape: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    object_radius: float | None = None,
    threshold: float | None = None,
    bright_objects: bool | None = None,
    method: str | None = None,
    model=None,
    sample_voxels: int = 2**22,
    n_samples: int = 4,
    client=None,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    """Segment a volume block by block and write its labels as OME-Zarr labels at ``out``.

    Parameters
    ----------
    image : zarr.Array, dask.array.Array or ndarray, shape ``([Z,] Y, X)``
        One channel. Workers read their blocks from it (a Zarr or dask-on-Zarr array is
        read by each worker itself; a numpy array travels with every task: small inputs).
    out : path
        The label image group to write, e.g. ``IMAGE.zarr/labels/napari-mae`` (beside the
        image, the OME-Zarr convention); its parent group gets the ``labels`` metadata.
    spacing, unit, axes
        Physical size per axis, its unit, axis letters (default ``"ZYX"[-ndim:]``).
    block_shape : sequence of int or None
        Block cores = the output's chunks; default :func:`default_block_shape`.
    overlap : sequence of int or None
        Pixels per side; at least :func:`block_overlap` (2 object diameters) is used.
    object_radius, threshold, bright_objects, method, model, sample_voxels, n_samples
        See :func:`estimate_global_parameters`. ``model`` (the learned method's) is best
        a name or a path: each worker loads it once; a model object is sent to every
        worker once.
    client : distributed.Client or None
        Where the blocks run; None: one after the other in this process.
    overwrite, resume
        What to do with an existing ``out`` (:func:`check_output`). A resumed run uses
        the parameters and grid stored by the first one and skips its finished blocks.
    progress : callable or None
        ``progress(done, total, message)`` per finished block; raise
        :class:`napari_mae._progress.Cancelled` from it to stop (finished blocks stay).

    Returns
    -------
    dict
        ``out``, ``n_objects``, ``blocks``, ``blocks_computed`` (this run),
        ``blocks_reused``, ``links`` (face links), ``block_shape``, ``overlap``,
        ``parameters`` (:class:`GlobalParameters` as a dict), ``seconds``, ``stage_seconds``
        (parameters, blocks, stitch, write).

    Raises
    ------
    FileExistsError
        See :func:`check_output`.
    BlockwiseError
        If a worker died (the finished blocks are kept: rerun with ``resume=True``).
    ValueError
        Bad shapes or parameters (see :func:`estimate_global_parameters`).
    """
    import zarr

    t0 = time.perf_counter()
    out = Path(out)
    ndim = len(image.shape)
    state = check_output(out, overwrite=overwrite, resume=resume)
    if state == "done":
        attrs = dict(zarr.open_group(str(out), mode="r").attrs).get("napari-mae", {})
        return dict(attrs, out=str(out), blocks_computed=0, seconds=time.perf_counter() - t0)
    work = work_dir_for(out)
    blocks_dir = work / "blocks"
    raw_path = str(work / "raw.zarr")
    run_file = work / "run.json"
    if state == "resume" and run_file.is_file():
        run = json.loads(run_file.read_text())
        params = GlobalParameters.from_dict(run["parameters"])
        if run.get("model") is not None and model is not None and str(run["model"]) != _model_name(model):
            raise ValueError(f"--resume: {out} was started with the model {run['model']}, not {model}")
        bshape, ov = tuple(run["block_shape"]), tuple(run["overlap"])
        if tuple(run["shape"]) != tuple(image.shape):
            raise ValueError(f"--resume: {out} was started on shape {run['shape']}, not {tuple(image.shape)}")
    else:
        report(progress, 0, 1, "estimating parameters on a sample")
        params, _ = estimate_global_parameters(
            image, spacing=spacing, object_radius=object_radius, threshold=threshold,
            bright_objects=bright_objects, sample_voxels=sample_voxels, n_samples=n_samples,
            method=method, model=model, client=client,
        )  # fmt: skip
        r_px = [params.object_radius / s for s in params.spacing]
        need = block_overlap(r_px)
        ov = tuple(need) if overlap is None else tuple(max(int(o), m) for o, m in zip(overlap, need))
        if block_shape is not None and len(block_shape) != ndim:
            raise ValueError(f"block_shape must have {ndim} values, got {tuple(block_shape)}")
        bshape = tuple(
            int(min(n, b)) for n, b in zip(image.shape, block_shape or default_block_shape(image.shape, r_px))
        )
        blocks_dir.mkdir(parents=True, exist_ok=True)
        zarr.create_array(
            raw_path, shape=tuple(image.shape), chunks=bshape, dtype="uint32", fill_value=0, overwrite=True
        )
        run = {
            "parameters": _jsonable(asdict(params)), "block_shape": bshape, "overlap": ov,
            "shape": list(image.shape), "model": None if model is None else _model_name(model),
        }  # fmt: skip
        run_file.write_text(json.dumps(run, allow_nan=False))
    stages = {"parameters": time.perf_counter() - t0}
    grid = list(block_grid(image.shape, bshape, ov))
    counts = [-(-n // b) for n, b in zip(image.shape, bshape)]
    records: dict = {}
    todo = []
    for index, core, outer, inner in grid:
        rec = _load_record(blocks_dir / _block_name(index))
        if rec is not None:
            records[index] = rec
        else:
            todo.append((index, core, outer, inner))
    n_reused = len(records)
    total = len(grid)
    report(progress, n_reused, total, "segmenting blocks")
    if client is None:
        for index, core, outer, inner in todo:
            _run_block(image, index, outer, inner, core, raw_path, str(blocks_dir), params, model)
            records[index] = _load_record(blocks_dir / _block_name(index))
            report(progress, len(records), total, "segmenting blocks")
    elif todo:
        _run_distributed(client, image, todo, raw_path, blocks_dir, params, model, records, total, progress)
    stages["blocks"] = time.perf_counter() - t0 - sum(stages.values())
    report(progress, total, total, "stitching block faces")
    lut, offsets, n_links = _stitch(grid, records, counts, blocks_dir)
    n_objects = int(lut.max()) if lut.size else 0
    stages["stitch"] = time.perf_counter() - t0 - sum(stages.values())
    _write_final(out, image.shape, grid, records, lut, offsets, raw_path, bshape, params, unit, axes, client)
    stages["write"] = time.perf_counter() - t0 - sum(stages.values())
    result = {
        "out": str(out),
        "n_objects": n_objects,
        "blocks": total,
        "blocks_computed": total - n_reused,
        "blocks_reused": n_reused,
        "links": n_links,
        "block_shape": list(bshape),
        "overlap": list(ov),
        "parameters": asdict(params),
        "method": params.method,
        "model": _model_name("default-2d" if model is None else model)
        if params.method == "learned"
        else None,
    }
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["napari-mae"] = _jsonable({k: v for k, v in result.items() if k != "out"})
    shutil.rmtree(work, ignore_errors=True)
    report(progress, total, total, "done")
    result["seconds"] = time.perf_counter() - t0
    result["stage_seconds"] = stages
    return result


def _model_name(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return str(p.resolve()) if p.is_file() else str(model)
    return str(getattr(model, "source", type(model).__name__))


def _jsonable(d: dict) -> dict:
    from napari_mae._json import to_jsonable

    return json.loads(json.dumps(to_jsonable(d), allow_nan=False))


def _run_distributed(client, image, todo, raw_path, blocks_dir, params, model, records, total, progress):
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        from distributed import KilledWorker

    image_f = _shippable(client, image)
    model_f = _shippable_model(client, model)
    futures = {}
    for index, core, outer, inner in todo:
        # Largest blocks first (the volume's edge blocks are smaller): the last round of
        # a run keeps every worker busy as long as possible.
        f = client.submit(
            _run_block, image_f, index, outer, inner, core, raw_path, str(blocks_dir), params, model_f,
            key=f"napari-mae-block-{'-'.join(map(str, index))}-{os.getpid()}-{time.time_ns()}",
            pure=False, priority=int(np.prod([s.stop - s.start for s in outer])),
        )  # fmt: skip
        futures[f] = index
    try:
        for f in as_completed(list(futures)):
            index = futures.pop(f)  # released: the scheduler forgets a finished block
            try:
                f.result()
            except (KilledWorker, FutureCancelledError) as exc:
                done = sum(1 for _ in Path(blocks_dir).glob("b_*.npz"))
                raise BlockwiseError(
                    f"a dask worker died while segmenting block {index} ({type(exc).__name__}: {exc}); "
                    f"{done} of {total} blocks are finished and kept: rerun with --resume to continue"
                ) from exc
            records[index] = _load_record(Path(blocks_dir) / _block_name(index))
            report(progress, len(records), total, "segmenting blocks")
    except BaseException:  # Cancelled, Ctrl-C, a failed block: stop the others
        client.cancel(list(futures))
        raise


def _write_final(out, shape, grid, records, lut, offsets, raw_path, bshape, params, unit, axes, client):
    import dask
    import dask.array as da

    from napari_mae.io.omezarr import write_ome_labels

    counts = [-(-n // b) for n, b in zip(shape, bshape)]
    pieces = np.empty(counts, dtype=object)
    for index, core, _, _ in grid:
        off, n = offsets[index], int(records[index]["n"])
        lut_slice = np.zeros(n + 1, np.uint32)
        lut_slice[1:] = lut[off + 1 : off + n + 1]
        piece = dask.delayed(_relabel_chunk, pure=True)(raw_path, core, lut_slice)
        pieces[index] = da.from_delayed(piece, shape=tuple(s.stop - s.start for s in core), dtype=np.uint32)
    labels = da.block(pieces.tolist())
    ndim = len(shape)
    out = Path(out)
    if out.parent.name != "labels":
        raise ValueError(f"{out}: OME-Zarr labels live in a 'labels' group: name it IMAGE.zarr/labels/NAME")
    jobs = write_ome_labels(
        out.parent.parent,
        labels,
        name=out.name,
        axes=axes or "ZYX"[-ndim:],
        spacing=params.spacing,
        unit=unit,
        chunks=tuple(bshape),
        compute=False,
    )
    if client is None:
        dask.compute(*jobs, scheduler="synchronous")
    else:
        client.compute(jobs, sync=True)
