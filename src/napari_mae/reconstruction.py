"""Masked-autoencoder reconstruction of images of any size, tiled.

:func:`reconstruct` masks a 2D image or 3D volume (C channels, any size) with a
patch mask over the *whole image's* patch grid, then runs the model window by
window through MONAI's :func:`~monai.inferers.sliding_window_inference` and
stitches the predictions. The mask a user drew (or the seeded one) is the mask
that is reconstructed: windows start on patch boundaries (the stride is a
multiple of ``patch_size`` and the image is padded at its far end to a multiple
of the patch), so every window's tokens are cells of the global grid and each
window reads its part of the global mask.

Memory stays bounded for large inputs: the image is processed in slabs along
its first spatial axis (a few tens of MiB each, overlapping by a window's
overlap), each slab read from the input on its own, so numpy memmaps and dask
arrays are never loaded or converted whole; only the outputs are full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from napari_mae._progress import ProgressCallback, report
from napari_mae.masking import (
    FILLS,
    STRATEGIES,
    check_mask_ratio,
    make_mask,
    mask_to_pixels,
    normalize_patch_size,
    patch_grid_shape,
)
from napari_mae.preprocess import (
    _subsample,
    apply_normalization,
    as_channels_first,
    percentile_range,
    resolve_channel_axis,
)

__all__ = ["ReconstructionResult", "reconstruct", "window_layout"]

#: Target size of one slab of the normalised input (float32), in bytes.
SLAB_BYTES = 16 * 2**20


@dataclass(eq=False)
class ReconstructionResult:
    """What :func:`reconstruct` returns.

    Only ``reconstruction`` is computed during :func:`reconstruct`; ``mask``,
    ``masked`` and ``error`` are computed from it, the patch mask and the input
    on first access (then cached), slab by slab, so a caller that needs only
    the reconstruction never holds four image-sized arrays.

    Attributes
    ----------
    reconstruction : ndarray of float32, shape ``image.shape``
        Visible pixels are the input's, removed patches the model's prediction,
        in the input's intensity units (non-finite input pixels are predicted too).
    mask : ndarray of bool, shape ``spatial_shape``
        Pixel mask, True = removed.
    masked : ndarray, shape and dtype of ``image``
        The input with removed patches filled (``fill``), as the model saw it.
    error : ndarray of float32, shape ``image.shape``
        ``|reconstruction - image|`` per pixel and channel, intensity units: 0 on
        visible pixels, NaN where the input is not finite.
    patch_mask : ndarray of bool, shape ``patch_grid_shape(spatial_shape, patch_size)``
        The patch mask used.
    patch_size : tuple of int
    lo, hi : ndarray of float64, shape (C,)
        Per-channel percentiles used for normalisation.
    device : str
        Where the model ran.
    """

    reconstruction: np.ndarray
    patch_mask: np.ndarray
    patch_size: tuple[int, ...]
    lo: np.ndarray
    hi: np.ndarray
    device: str
    image: Any = field(repr=False)
    channel_axis: int | None = field(repr=False)
    fills: list = field(repr=False)
    rows_per_slab: int = field(repr=False)

    def _cf(self, array: Any) -> Any:
        return array[None] if self.channel_axis is None else np.moveaxis(array, self.channel_axis, 0)

    def _row_blocks(self) -> Iterator[tuple[int, int]]:
        n = self._cf(self.reconstruction).shape[1]
        step = max(1, self.rows_per_slab)
        for start in range(0, n, step):
            yield start, min(start + step, n)

    @cached_property
    def mask(self) -> np.ndarray:
        spatial = self._cf(self.reconstruction).shape[1:]
        return mask_to_pixels(self.patch_mask, spatial, self.patch_size)

    @cached_property
    def masked(self) -> np.ndarray:
        view = self._cf(self.image)
        out, out_cf = _output_views(self.reconstruction.shape, view.dtype, self.channel_axis)
        for start, stop in self._row_blocks():
            rows = (slice(None), slice(start, stop))
            _write_masked(out_cf[rows], np.asarray(view[rows]), self.mask[start:stop], self.fills)
        return out

    @cached_property
    def error(self) -> np.ndarray:
        view = self._cf(self.image)
        recon = self._cf(self.reconstruction)
        out, out_cf = _output_views(self.reconstruction.shape, np.float32, self.channel_axis)
        for start, stop in self._row_blocks():
            rows = (slice(None), slice(start, stop))
            truth = np.asarray(view[rows]).astype(np.float32)
            dst = out_cf[rows]
            np.subtract(recon[rows], truth, out=dst)
            np.abs(dst, out=dst)
            dst[~np.isfinite(truth)] = np.nan  # no error can be measured against NaN or inf
        return out


@dataclass(frozen=True)
class _Slab:
    """Rows ``[start, stop)`` of the padded first axis are read; ``[keep_start, keep_stop)`` kept."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def window_layout(
    roi_size: Sequence[int], patch_size: Sequence[int], overlap: float
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Window strides that are multiples of the patch, and the MONAI ``overlap`` giving them.

    MONAI's ``sliding_window_inference`` steps by ``int(roi * (1 - overlap))``
    and clamps the last window to the image's end. With a stride that is a
    multiple of ``patch_size`` and an image size that is too, every window
    starts on a patch boundary, so its tokens are cells of the global patch grid.

    Parameters
    ----------
    roi_size, patch_size : sequence of int
        Window (the model's ``img_size``) and patch, per axis, in pixels.
    overlap : float
        Wanted overlap fraction in [0, 1); rounded down to whole patches.

    Returns
    -------
    interval : tuple of int
        Stride per axis, a positive multiple of the patch size.
    monai_overlap : tuple of float
        Per-axis ``overlap`` for MONAI that reproduces ``interval`` exactly
        (the 0.25-pixel margin keeps ``int()`` away from float rounding).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap} must be in [0, 1)")
    interval = []
    monai_overlap = []
    for r, p in zip(roi_size, patch_size):
        step = max(p, int(r * (1.0 - overlap)) // p * p)
        interval.append(step)
        monai_overlap.append(0.0 if step == r else 1.0 - (step + 0.25) / r)
    return tuple(interval), tuple(monai_overlap)


def _slabs(padded0: int, size0: int, roi0: int, patch0: int, interval0: int, rows: int) -> Iterator[_Slab]:
    """Overlapping slabs along the first axis, aligned to the patch grid."""
    halo = -(-max(roi0 - interval0, patch0) // patch0) * patch0
    # At least four windows long: thinner slabs would repeat most windows in
    # their halos (a 3D slab of one window's depth keeps only half of it).
    length = max(rows // patch0 * patch0, 4 * roi0, 2 * halo + patch0)
    if padded0 <= length:
        yield _Slab(0, padded0, 0, padded0)
        return
    keep_start = 0
    while keep_start < size0:
        start = max(0, keep_start - halo)
        stop = min(start + length, padded0)
        start = max(0, stop - length)
        keep_stop = padded0 if stop == padded0 else stop - halo
        yield _Slab(start, stop, keep_start, keep_stop)
        keep_start = keep_stop


def _n_windows(size: Sequence[int], roi: Sequence[int], interval: Sequence[int]) -> int:
    """Number of windows MONAI's sliding window visits (its ``dense_patch_slices``)."""
    n = 1
    for s, r, i in zip(size, roi, interval):
        n *= 1 if s == r else max(1, math.ceil((s - r) / i) + 1)
    return n


def _neighbour_patch_stats(model: Any, windows: Any, removed: Any) -> tuple[Any, Any]:
    """Per-token mean and std to put norm-pix predictions back into intensities.

    With ``norm_pix_loss`` the model predicts each patch normalised by its own
    mean and std (MAE sec. 3), which are unknown for removed patches. We take
    them from the visible patches nearby: the average over visible tokens in
    the smallest neighbourhood (3, 5, 9, ... tokens wide) that has one, falling
    back to 0 and 0 (the lower percentile, flat) where a window has no visible
    token at all. Visible tokens keep their own statistics.

    Returns
    -------
    mean, std : Tensor, shape (B, N, 1)
    """
    import torch
    import torch.nn.functional as F

    tokens = model.patchify(windows.float())  # (B, N, P*C)
    mean = tokens.mean(dim=-1)  # (B, N)
    std = (tokens.var(dim=-1) + 1.0e-6).sqrt()  # (B, N)
    grid = model.config.grid_size
    b = tokens.shape[0]
    visible = (~removed).float()  # (B, N)
    filled = ~removed
    est_mean = torch.where(filled, mean, torch.zeros_like(mean))
    est_std = torch.where(filled, std, torch.zeros_like(std))
    pool = F.avg_pool2d if len(grid) == 2 else F.avg_pool3d
    stacked = torch.stack([visible, mean * visible, std * visible], dim=1).reshape(b, 3, *grid)
    k = 3
    while not bool(filled.all()) and k <= 2 * max(grid) + 1:
        # Zero padding is harmless: the ratios below divide by the pooled visible weight.
        padded = F.pad(stacked, [k // 2] * (2 * len(grid)))
        pooled = pool(padded, kernel_size=k, stride=1)
        pooled = pooled.reshape(b, 3, -1)  # (B, 3, N)
        weight = pooled[:, 0]
        new = ~filled & (weight > 0)
        safe = weight.clamp_min(1.0e-12)
        est_mean = torch.where(new, pooled[:, 1] / safe, est_mean)
        est_std = torch.where(new, pooled[:, 2] / safe, est_std)
        filled = filled | new
        k = 2 * k - 1
    return est_mean.unsqueeze(-1), est_std.unsqueeze(-1)


def _check_mask(
    mask: Any, grid: tuple[int, ...], spatial: tuple[int, ...], patch: tuple[int, ...]
) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != grid:
        hint = " (that is a pixel mask)" if mask.shape == spatial else ""
        raise ValueError(
            f"mask of shape {mask.shape}{hint} is not the patch grid {grid} of this image with the model's "
            f"patch_size={patch}; draw one with napari_mae.masking.make_mask(spatial_shape, {patch}) "
            "or pass mask=None for a seeded random mask"
        )
    return mask.astype(bool)


def _fill_values(view: Any, fill: str | float, seed: Any) -> Any:
    """Per-channel fill for the masked output, from a subsample for large inputs."""
    if not isinstance(fill, str):
        return [float(fill)] * view.shape[0]
    if fill == "zero":
        return [0.0] * view.shape[0]
    out = []
    rng = np.random.default_rng(seed)
    for c in range(view.shape[0]):
        values = _subsample(view[c], 1 << 20).astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            out.append(0.0)
        elif fill == "mean":
            out.append(float(values.mean()))
        else:
            out.append((float(values.min()), float(values.max()), rng))
    return out


def _write_masked(dst: np.ndarray, raw: np.ndarray, pixels: np.ndarray, fills: list) -> None:
    from napari_mae.masking import _cast_fill

    dst[...] = raw
    n = int(pixels.sum())
    if n == 0:
        return
    for c, f in enumerate(fills):
        values = f[2].uniform(f[0], f[1], size=n) if isinstance(f, tuple) else f
        dst[c][pixels] = _cast_fill(values, dst.dtype)


def _output_views(
    shape: tuple[int, ...], dtype: Any, channel_axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty(shape, dtype=dtype)
    view = out[None] if channel_axis is None else np.moveaxis(out, channel_axis, 0)
    return out, view


def reconstruct(
    image: Any,
    model: Any,
    *,
    mask: Any = None,
    mask_ratio: float = 0.75,
    seed: int | None = 0,
    strategy: str = "random",
    channel_axis: int | None = None,
    device: str = "auto",
    batch_size: int = 4,
    overlap: float = 0.25,
    fill: str | float = "zero",
    autocast: bool = True,
    progress: ProgressCallback | None = None,
) -> ReconstructionResult:
    """Mask an image and reconstruct it with a masked autoencoder, tile by tile.

    Parameters
    ----------
    image : array_like, shape (Y, X) or (Z, Y, X), optionally with a channel axis
        numpy array, ``np.memmap`` or dask array of any real dtype (bool,
        integers, float16/32/64) and any strides; any size, including sizes that
        are not a multiple of the patch or smaller than one patch. NaN and inf
        pixels are fed to the model as the lower percentile and predicted.
    model : MaskedAutoencoder, preset name, ``"default-2d"``/``"default-3d"`` or checkpoint path
        See :func:`napari_mae.models.mae.load_model`. A model object is moved to
        ``device`` (in place, as ``nn.Module.to`` does) and run in eval mode.
    mask : array_like of bool, optional
        Patch mask over the whole image, shape
        ``patch_grid_shape(spatial_shape, model.config.patch_size)``, 1 = removed.
        If None, one is drawn with :func:`napari_mae.masking.make_mask`.
    mask_ratio : float
        In [0, 1), for the drawn mask.
    seed : int or None
        Seed of the drawn mask (and of the ``noise`` fill); same seed, same mask.
    strategy : {"random", "grid", "block"}
        For the drawn mask.
    channel_axis : int or None
        Channel axis of ``image``; None guesses (see
        :func:`napari_mae.preprocess.resolve_channel_axis`), e.g. RGB ``(Y, X, 3)``.
    device : {"auto", "cpu", "cuda", "mps"} or torch.device
        ``auto`` = CUDA, then Apple MPS, then CPU.
    batch_size : int
        Windows per forward pass.
    overlap : float
        Window overlap in [0, 1), rounded down to whole patches; overlapping
        predictions are averaged.
    fill : {"zero", "noise", "mean"} or float
        Fill of removed patches in ``masked`` (see :func:`napari_mae.masking.apply_mask`).
    autocast : bool
        bf16 (fp16 where bf16 is unsupported, and on MPS) autocast on GPUs; CPU runs float32.
    progress : callable, optional
        ``progress(done, total, message)`` after every batch of windows; raise
        :class:`napari_mae._progress.Cancelled` from it to stop.

    Returns
    -------
    ReconstructionResult

    Raises
    ------
    ValueError
        For ``mask_ratio`` outside [0, 1), a mask that is not the image's patch
        grid, an image the model cannot take (2D vs 3D, channel count), an
        unsupported dtype, or an image without a finite pixel; the message says
        what would work.
    napari_mae._progress.Cancelled
        If the progress callback raised it.

    Notes
    -----
    A single-channel model reconstructs a multi-channel image channel by
    channel, with the same mask. Memory: the float32 reconstruction plus about
    three slab-sized float32 buffers (:data:`SLAB_BYTES` each) while it runs;
    ``mask`` (bool), ``masked`` (input dtype) and ``error`` (float32) are
    allocated when first accessed.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from napari_mae.models.mae import MaskedAutoencoder, check_compatible, load_model, resolve_device
    from napari_mae.models.mae import autocast as model_autocast

    ratio = check_mask_ratio(mask_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if isinstance(fill, str) and fill not in FILLS:
        raise ValueError(f"fill={fill!r} is not one of {FILLS} or a number")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    dev = resolve_device(device)
    if not isinstance(model, MaskedAutoencoder):
        model = load_model(model, device=dev)
    cfg = model.config
    source = f"model {cfg.name!r}"

    if hasattr(image, "detach"):  # a torch tensor, possibly on a GPU
        image = image.detach().cpu().numpy()
    elif not isinstance(image, np.ndarray) and not type(image).__module__.startswith("dask."):
        image = np.asarray(image)
    shape = tuple(int(s) for s in image.shape)
    try:
        view = as_channels_first(image, channel_axis=channel_axis, spatial_dims=cfg.spatial_dims)
    except ValueError:
        if channel_axis is None and len(shape) in (2, 3):
            _, own_dims = resolve_channel_axis(shape)
            check_compatible(cfg, spatial_dims=own_dims, source=source)
        raise
    axis, _ = resolve_channel_axis(shape, channel_axis=channel_axis, spatial_dims=cfg.spatial_dims)
    n_channels = int(view.shape[0])
    per_channel = cfg.in_channels == 1 and n_channels > 1
    if not per_channel:
        check_compatible(cfg, in_channels=n_channels, source=source)
    spatial = tuple(int(s) for s in view.shape[1:])
    patch = normalize_patch_size(cfg.patch_size, len(spatial))
    roi = cfg.img_size
    grid = patch_grid_shape(spatial, patch)
    if mask is None:
        patch_mask = make_mask(spatial, patch, mask_ratio=ratio, strategy=strategy, seed=seed)
    else:
        patch_mask = _check_mask(mask, grid, spatial, patch)

    # Pad the grid at the far end to whole patches and at least one window.
    # Tokens wholly in the padding count as removed, so no padding content is
    # ever shown to the encoder as visible context.
    padded = tuple(max(g * p, r) for g, p, r in zip(grid, patch, roi))
    padded_grid = tuple(s // p for s, p in zip(padded, patch))
    global_mask = np.ones(padded_grid, dtype=bool)
    global_mask[tuple(slice(0, g) for g in grid)] = patch_mask

    norm = getattr(model, "normalization", None) or {}
    lo, hi = percentile_range(view, float(norm.get("lower", 1.0)), float(norm.get("upper", 99.8)))
    constant = [
        float(np.nanmin(s)) == float(np.nanmax(s)) if s.size else True
        for s in (_finite_sample(view[c]) for c in range(n_channels))
    ]
    fills = _fill_values(view, fill, seed)
    interval, monai_overlap = window_layout(roi, patch, overlap)

    recon_out, recon_cf = _output_views(shape, np.float32, axis)

    row_bytes = 4 * n_channels * math.prod(padded[1:])
    slabs = list(
        _slabs(padded[0], spatial[0], roi[0], patch[0], interval[0], max(1, SLAB_BYTES // row_bytes))
    )
    batch = n_channels if per_channel else 1
    total = sum(batch * _n_windows((s.stop - s.start, *padded[1:]), roi, interval) for s in slabs)
    done = 0
    report(progress, 0, total, "reconstructing")

    was_training = model.training
    model.to(dev).eval()
    try:
        for slab in slabs:
            read_stop = min(slab.stop, spatial[0])
            raw = np.asarray(
                view[:, slab.start : read_stop]
            )  # (C, rows, ...) input dtype; reads the slab only
            x = apply_normalization(raw, lo, hi)  # (C, rows, ...) float32
            pad = [(0, 0), (0, slab.stop - read_stop)] + [(0, p - s) for p, s in zip(padded[1:], spatial[1:])]
            if any(after for _, after in pad):
                # Edge replication, not mirroring: a mirror would copy pixels of
                # neighbouring (possibly removed) patches into visible ones.
                x = np.pad(x, pad, mode="edge")
            tensor = torch.from_numpy(x)
            tensor = tensor[:, None] if per_channel else tensor[None]  # (B, C, rows, ...)
            offset = slab.start // patch[0]

            def predictor(windows: Any, coords: Any, offset: int = offset) -> Any:
                nonlocal done
                masks = []
                for coord in coords:
                    starts = [coord[2 + a].start // patch[a] for a in range(len(patch))]
                    starts[0] += offset
                    cells = tuple(slice(s, s + r // p) for s, r, p in zip(starts, roi, patch))
                    masks.append(global_mask[cells].reshape(-1))
                removed = torch.from_numpy(np.stack(masks)).to(windows.device)  # (B, N)
                with model_autocast(windows.device, autocast):
                    pred, _ = model(windows, mask=removed)  # (B, N, P*C)
                pred = pred.float()
                if cfg.norm_pix_loss:
                    mean, std = _neighbour_patch_stats(model, windows, removed)
                    pred = pred * std + mean
                done += windows.shape[0]
                report(progress, done, total, "reconstructing")
                return model.unpatchify(pred)  # (B, C, *roi)

            with torch.no_grad():
                out = sliding_window_inference(
                    tensor,
                    roi_size=roi,
                    sw_batch_size=int(batch_size),
                    predictor=predictor,
                    overlap=monai_overlap,
                    mode="constant",
                    sw_device=dev,
                    device=torch.device("cpu"),
                    with_coord=True,
                )
            del tensor, x
            out = out[:, 0] if per_channel else out[0]  # (C, rows, ...)
            keep_stop = min(slab.keep_stop, spatial[0])
            rows = slice(slab.keep_start - slab.start, keep_stop - slab.start)
            crop = (slice(None), rows) + tuple(slice(0, s) for s in spatial[1:])
            pred = out[crop].numpy()  # (C, kept rows, ...) float32, normalised; a view
            for c in range(n_channels):
                # A constant channel's only sensible prediction is the constant.
                scale = 0.0 if constant[c] else hi[c] - lo[c]
                pred[c] *= np.float32(scale)
                pred[c] += np.float32(lo[c])  # now in intensity units
            truth = raw[(slice(None), rows)].astype(np.float32)
            replace = _pixel_rows(patch_mask, spatial, patch, slab.keep_start, keep_stop)[None]
            replace = replace | ~np.isfinite(truth)
            dst = recon_cf[:, slab.keep_start : keep_stop]
            np.copyto(dst, truth)
            np.copyto(dst, pred, where=replace)
            del raw, out, pred, truth, replace
    finally:
        model.train(was_training)

    return ReconstructionResult(
        reconstruction=recon_out,
        patch_mask=patch_mask,
        patch_size=patch,
        lo=lo,
        hi=hi,
        device=str(dev),
        image=image,
        channel_axis=axis,
        fills=fills,
        rows_per_slab=max(1, SLAB_BYTES // row_bytes),
    )


def _pixel_rows(
    patch_mask: np.ndarray, spatial: tuple[int, ...], patch: tuple[int, ...], start: int, stop: int
) -> np.ndarray:
    """Rows ``[start, stop)`` of the pixel mask, without expanding the whole mask."""
    g0, g1 = start // patch[0], -(-stop // patch[0])
    out = patch_mask[g0:g1]
    for axis, p in enumerate(patch):
        out = np.repeat(out, p, axis=axis)
    first = start - g0 * patch[0]
    return out[(slice(first, first + stop - start),) + tuple(slice(0, s) for s in spatial[1:])]


def _finite_sample(channel: Any) -> np.ndarray:
    values = _subsample(channel, 1 << 20)
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    return values
