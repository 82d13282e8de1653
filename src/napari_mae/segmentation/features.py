"""Multi-scale pixel features for 2D images and 3D volumes, channels last.

Two families, concatenated along the last axis:

* a classical filter bank (Gaussian-smoothed intensity, gradient magnitude, Laplacian of
  Gaussian and Hessian eigenvalues at several scales) - the filters of
  :func:`skimage.feature.multiscale_basic_features`, computed with :mod:`scipy.ndimage`
  because those accept a *per-axis* sigma, which anisotropic volumes need (skimage's
  version takes one scalar sigma in pixels);
* optionally, masked-autoencoder encoder features: patch tokens of several encoder depths,
  from the image at two or more input scales, upsampled to the pixel grid and reduced by
  PCA to a few dozen channels (the "foundation-model features + light classifier" recipe
  of convpaint / micro-sam's feature pyramids).

Large inputs are processed in overlapping tiles so that the peak memory is bounded by the
tile, not the image (only the output array scales with the image).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import hessian_matrix_eigvals

from napari_mae.preprocess import apply_normalization, check_channel_axis, check_spacing, percentile_range

__all__ = [
    "default_sigmas",
    "filter_bank",
    "model_features",
    "multiscale_features",
    "as_float_image",
]

_TILE_VOXELS = 2**22  # tile the filter bank above ~4 M voxels (about 0.5 GB of float32 features)


def as_float_image(
    image: np.ndarray, *, channel_axis: int | None = None, intensity_range: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return a float32 ``(C, *spatial)`` copy of ``image``, its NaN mask and scale.

    Each channel is scaled by its 1st and 99.8th finite percentiles to about ``[0, 1]``
    (:func:`napari_mae.preprocess.percentile_range`, the models' normalisation) so that
    uint8, uint16, int32 and float inputs give the same features up to rounding.
    Non-finite pixels become 0, the low percentile (and are reported in the mask), so
    that filters do not propagate them; a channel with no finite pixel is all 0.

    Parameters
    ----------
    image : ndarray, shape ``([Z,] Y, X)`` or with one channel axis
        Any real dtype. Booleans are accepted.
    channel_axis : int or None
        Axis of ``image`` holding channels, if any.
    intensity_range : (float, float) or None
        ``(lo, hi)`` in the image's intensity units to scale a single-channel image by,
        instead of its own percentiles (the blocks of a volume, scaled as the whole volume).

    Returns
    -------
    x : ndarray of float32, shape ``(C, [Z,] Y, X)``
    invalid : ndarray of bool, shape ``([Z,] Y, X)``
        True where any channel was NaN or infinite.
    scale : ndarray of float64, shape ``(C, 2)``
        The (low, high) percentiles used per channel.

    Raises
    ------
    ValueError
        If the image is not 2D or 3D (after removing the channel axis) or is complex, or
        ``intensity_range`` is not a finite ``(lo, hi)`` with ``hi > lo`` or is given for
        several channels.
    """
    arr = np.asarray(image)
    if np.iscomplexobj(arr):
        raise ValueError("complex images are not supported")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if channel_axis is None:
        arr = arr[None]
    else:
        arr = np.moveaxis(arr, check_channel_axis(channel_axis, arr.ndim), 0)
    if arr.ndim - 1 not in (2, 3):
        raise ValueError(f"expected a 2D image or 3D volume, got spatial shape {arr.shape[1:]}")
    x = arr.astype(np.float32, copy=True)
    invalid = ~np.isfinite(x).all(axis=0)
    scale = np.zeros((x.shape[0], 2))
    scale[:, 1] = 1.0
    # The models' normalisation (napari_mae.preprocess): per-channel percentiles of the
    # finite values, non-finite pixels set to 0 (the low percentile: background).
    if intensity_range is not None:
        scale[0] = _checked_range(intensity_range, x.shape[0])
    else:
        has_finite = np.array([bool(np.isfinite(x[c]).any()) for c in range(x.shape[0])])
        if has_finite.any():
            lo, hi = percentile_range(x[has_finite], 1.0, 99.8)
            scale[has_finite, 0], scale[has_finite, 1] = lo, hi
    apply_normalization(x, scale[:, 0], scale[:, 1], out=x)
    return x, invalid, scale


def _checked_range(intensity_range: Sequence[float], n_channels: int) -> tuple[float, float]:
    """A given ``(lo, hi)`` for :func:`as_float_image`, checked."""
    lo, hi = (float(v) for v in intensity_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(
            f"intensity_range must be a finite (lo, hi) with hi > lo, got {tuple(intensity_range)}"
        )
    if n_channels != 1:
        raise ValueError(f"intensity_range needs a single-channel image, got {n_channels} channels")
    return lo, hi


def _pixel_sigmas(sigma: float, spacing: np.ndarray) -> tuple[float, ...]:
    """Physical sigma -> per-axis sigma in pixels."""
    return tuple(float(sigma / s) for s in spacing)


def default_sigmas(spacing: Sequence[float] | None = None, ndim: int = 2) -> list[float]:
    """Scales of the filter bank, in physical units of ``spacing`` (pixels if None).

    Five octaves from 1 to 16 times the finest spacing, as in
    :func:`skimage.feature.multiscale_basic_features` (``sigma_min=1, sigma_max=16``).
    """
    base = 1.0 if spacing is None else float(min(spacing))
    return [base * 2.0**k for k in range(5)]


def _eigvals_sym3(h: list[np.ndarray]) -> np.ndarray:
    """Eigenvalues of symmetric 3x3 matrices in closed form, descending.

    ``h`` = (H00, H01, H02, H11, H12, H22), as for
    :func:`skimage.feature.hessian_matrix_eigvals`, which calls LAPACK once per voxel
    (``numpy.linalg.eigvalsh``) and took 1.5 s per scale on a 100^3 volume; the
    trigonometric solution (O. K. Smith, "Eigenvalues of a symmetric 3 x 3 matrix",
    Commun. ACM 4(4):168, 1961) is a few vectorised operations.
    """
    a00, a01, a02, a11, a12, a22 = (np.asarray(x, np.float64) for x in h)
    q = (a00 + a11 + a22) / 3.0
    p1 = a01**2 + a02**2 + a12**2
    p2 = (a00 - q) ** 2 + (a11 - q) ** 2 + (a22 - q) ** 2 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = np.where(p > 1e-30, p, 1.0)
    b00, b11, b22 = (a00 - q) / safe, (a11 - q) / safe, (a22 - q) / safe
    b01, b02, b12 = a01 / safe, a02 / safe, a12 / safe
    det = b00 * (b11 * b22 - b12**2) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    e1 = q + 2.0 * p * np.cos(phi)
    e3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    e2 = 3.0 * q - e1 - e3
    return np.stack([e1, e2, e3]).astype(np.float32)


def _filter_bank_block(
    x: np.ndarray, sigmas: Sequence[float], spacing: np.ndarray, progress=None
) -> np.ndarray:
    """Filter bank on one ``(C, *spatial)`` block -> ``(*spatial, n)`` float32.

    One Gaussian per channel and scale; derivatives by central differences of the
    smoothed image (``np.gradient``), as :func:`skimage.feature.hessian_matrix` does with
    ``use_gaussian_derivatives=False`` - six times cheaper than one Gaussian-derivative
    filter per derivative, and the same to within the smoothing.

    ``progress(done, total, message)`` is called three times per channel and scale (a
    scale of a 100^3 volume takes about a second), so a caller can stop between.
    """
    from napari_mae._progress import report

    ndim = x.ndim - 1
    steps = 3 * x.shape[0] * len(sigmas)
    step = 0
    n_feat = x.shape[0] * len(sigmas) * (3 + ndim)
    out = np.empty(x.shape[1:] + (n_feat,), np.float32)
    k = 0
    for c in range(x.shape[0]):
        img = x[c]
        for sigma in sigmas:
            report(progress, step, steps, "features")
            smooth = ndi.gaussian_filter(img, _pixel_sigmas(sigma, spacing), mode="reflect")
            out[..., k] = smooth
            # Scale-normalised derivatives (x sigma per order, Lindeberg 1998) in physical units.
            grads = np.gradient(smooth, *spacing)
            if ndim == 1:  # pragma: no cover - np.gradient returns an array, not a list
                grads = [grads]
            out[..., k + 1] = np.sqrt(sum(g * g for g in grads)) * sigma
            report(progress, step + 1, steps, "features")
            hess = []
            for i, j in itertools.combinations_with_replacement(range(ndim), 2):
                hess.append(np.gradient(grads[i], spacing[j], axis=j) * sigma**2)
            report(progress, step + 2, steps, "features")
            if ndim == 3:
                # Per voxel, so computed in slabs along Z with a report after each.
                eig = np.empty((3,) + img.shape, np.float32)  # (ndim, *spatial), descending
                bounds = np.linspace(0, img.shape[0], 4).astype(int)
                for z0, z1 in itertools.pairwise(bounds):
                    eig[:, z0:z1] = _eigvals_sym3([hh[z0:z1] for hh in hess])
                    report(progress, step + 2, steps, "features")
            else:
                eig = hessian_matrix_eigvals(hess)  # (ndim, *spatial), descending
            out[..., k + 2] = eig.sum(axis=0)  # trace = scale-normalised Laplacian of Gaussian
            for e in range(ndim):
                out[..., k + 3 + e] = eig[e]
            k += 3 + ndim
            step += 3
    report(progress, steps, steps, "features")
    return out


def filter_bank(
    x: np.ndarray,
    sigmas: Sequence[float],
    spacing: Sequence[float] | None = None,
    *,
    progress=None,
) -> np.ndarray:
    """Classical multi-scale filter bank on a channels-first float image, tiled.

    Parameters
    ----------
    x : ndarray of float32, shape ``(C, [Z,] Y, X)``
    sigmas : sequence of float
        Scales in physical units of ``spacing`` (pixels if ``spacing`` is None).
    spacing : sequence of float or None
        Pixel size per spatial axis.
    progress : callable or None
        ``progress(done, total, message)``, several calls per scale and tile; raise
        :class:`napari_mae._progress.Cancelled` from it to stop.

    Returns
    -------
    ndarray of float32, shape ``x.shape[1:] + (C * len(sigmas) * (3 + ndim),)``
        Per channel and sigma: smoothed intensity, gradient magnitude, LoG, and the
        ``ndim`` Hessian eigenvalues (descending).
    """
    from napari_mae._progress import report
    from napari_mae.segmentation.tiling import tile_slices

    ndim = x.ndim - 1
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=float)
    n_feat = x.shape[0] * len(sigmas) * (3 + ndim)
    shape = x.shape[1:]
    if int(np.prod(shape)) <= _TILE_VOXELS:
        return _filter_bank_block(x, sigmas, spacing, progress)
    out = np.empty(shape + (n_feat,), np.float32)
    # Exact inside each tile's core: scipy's Gaussian reaches int(4 sigma + 0.5) pixels
    # (truncate=4), and the Hessian's two central differences 2 more.
    margin = [int(4 * max(sigmas) / s + 0.5) + 3 for s in spacing]
    side = int(round(_TILE_VOXELS ** (1.0 / ndim)))
    block = [min(n, side) for n in shape]
    blocks = list(tile_slices(shape, block, margin))
    for k, (outer, inner, dst) in enumerate(blocks):

        def block_progress(done, total, message, k=k):
            report(progress, k * total + done, len(blocks) * total, message)

        out[dst] = _filter_bank_block(x[(slice(None),) + outer], sigmas, spacing, block_progress)[inner]
    return out


def model_features(
    x: np.ndarray,
    model,
    *,
    depths: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0, 0.5),
    n_components: int = 24,
    batch_size: int = 32,
    progress=None,
) -> np.ndarray:
    """MAE encoder features at several depths and input scales, on the pixel grid.

    The image is resampled by each factor in ``scales``, cut into windows of the
    model's ``config.img_size`` (reflect-padded at the borders, non-overlapping), and
    passed through ``model.encoder_features(windows, depths)``. Each depth's token grid
    is upsampled (linear) back to the pixel grid of the input; all depths and scales are
    reduced by PCA (:class:`sklearn.decomposition.PCA`, fitted per depth and scale on
    the tokens, before upsampling) to about ``n_components`` channels in all. The encoder
    runs in reduced precision where that is native (bfloat16/float16 on GPUs, bfloat16 on
    CPUs with AVX512-BF16 or AMX; see :func:`napari_mae.models.mae.autocast`).

    Parameters
    ----------
    x : ndarray of float32, shape ``(C, [Z,] Y, X)``
        Percentile-normalised image (about ``[0, 1]``).
    model : MaskedAutoencoder
        Loaded model (see :func:`napari_mae.models.mae.load_model`); its ``config`` gives
        ``img_size``, ``in_channels`` and ``spatial_dims``.
    depths : sequence of int or None
        Encoder blocks whose outputs are taken; default: evenly spaced over the depth.
    scales : sequence of float
        Input zoom factors (1 = native).
    n_components : int
        PCA channels returned.
    batch_size : int
        Windows per forward pass.

    Returns
    -------
    ndarray of float32, shape ``x.shape[1:] + (n,)``
        ``n = (n_components // (len(scales) * len(depths))) * len(scales) * len(depths)``
        (fewer when a token grid has fewer tokens), whitened PCA scores.

    Raises
    ------
    ValueError
        If the model's spatial dims differ from the image's.
    """
    cfg = model.config
    ndim = x.ndim - 1
    sd = int(getattr(cfg, "spatial_dims", len(np.atleast_1d(cfg.img_size))))
    if sd != ndim:
        raise ValueError(f"model is {sd}D but the image is {ndim}D")
    in_ch = int(getattr(cfg, "in_channels", 1))
    if x.shape[0] != in_ch:
        # Channel mismatch: average channels and repeat (a fair reduction for a nuclear/grey model).
        x = np.repeat(x.mean(axis=0, keepdims=True), in_ch, axis=0)
    if depths is None:
        # 0-based block indices: the middle and the last block (early blocks are nearly
        # the patch embedding, which the filter bank already covers).
        n_layers = int(getattr(cfg, "depth", 4))
        depths = sorted({max(0, n_layers // 2 - 1), n_layers - 1})
    depths = list(depths)
    device = next(model.parameters()).device
    model.eval()
    with _one_torch_thread_on_cpu(device):
        return _model_features(x, model, device, depths, scales, n_components, batch_size, progress)


@contextlib.contextmanager
def _one_torch_thread_on_cpu(device):
    """Run torch single-threaded on CPU for the duration (restored afterwards).

    The encoder on image-sized inputs is small work for torch's OpenMP pool, whose
    threads then busy-wait after each parallel region and take the cores from the numpy
    and scikit-learn steps around it: on 2 cores, model features of a 256^2 image took
    0.19 s with 2 threads and 0.07 s with 1 (603 x 1272: 0.41 vs 0.39 s). The setting is
    process-wide, so another torch job running meanwhile (a training worker) is slowed
    for that time.
    """
    import torch

    if device.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _model_features(x, model, device, depths, scales, n_components, batch_size, progress):
    """:func:`model_features` after validation (arguments as there)."""
    import torch
    import torch.nn.functional as F
    from sklearn.decomposition import PCA

    from napari_mae._progress import report
    from napari_mae.models.mae import autocast

    cfg = model.config
    ndim = x.ndim - 1
    img_size = tuple(np.broadcast_to(np.atleast_1d(cfg.img_size), (ndim,)).astype(int))
    mode = "bilinear" if ndim == 2 else "trilinear"
    shape = x.shape[1:]
    parts = []
    total = len(scales)
    for si, zoom in enumerate(scales):
        report(progress, si, total, "model features")
        t = torch.from_numpy(np.ascontiguousarray(x))[None]
        if zoom != 1.0:
            size = [max(4, int(round(n * zoom))) for n in shape]
            t = F.interpolate(t, size=size, mode=mode, align_corners=False)
        zs = t.shape[2:]
        pad = []
        for n, w in zip(reversed(zs), reversed(img_size)):
            pad += [0, (-n) % w]
        t = F.pad(t, pad, mode="reflect" if max(pad) < min(zs) else "replicate")
        grid = [n // w for n, w in zip(t.shape[2:], img_size)]
        idxs = list(itertools.product(*[range(g) for g in grid]))
        outs = None
        with torch.no_grad():
            for b0 in range(0, len(idxs), batch_size):
                chunk = idxs[b0 : b0 + batch_size]
                wins = torch.cat(
                    [
                        t[
                            (slice(None), slice(None))
                            + tuple(slice(i * w, (i + 1) * w) for i, w in zip(idx, img_size))
                        ]
                        for idx in chunk
                    ]  # fmt: skip
                ).to(device)  # (B, C, *img_size)
                with autocast(device, cpu_bf16=True):
                    feats = model.encoder_features(wins, depths)  # each (B, D, *tokens)
                if outs is None:
                    tok = feats[0].shape[2:]
                    outs = [
                        torch.zeros((1, f.shape[1]) + tuple(g * k for g, k in zip(grid, tok))) for f in feats
                    ]
                for o, f in zip(outs, feats):
                    f = f.float().cpu()
                    for bi, idx in enumerate(chunk):
                        dst = tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f.shape[2:]))
                        o[(slice(None), slice(None)) + dst] = f[bi : bi + 1]
        n_parts = len(scales) * len(outs)
        k_part = max(1, n_components // n_parts)
        for o in outs:
            # Token grid covers the padded image: crop the unpadded part.
            frac = [n / p for n, p in zip(zs, t.shape[2:])]
            crop = tuple(slice(0, max(1, int(round(k * fr)))) for k, fr in zip(o.shape[2:], frac))
            o = o[(slice(None), slice(None)) + crop]
            # PCA on the tokens (few), *then* upsample the few components to pixels: the
            # same subspace as PCA after upsampling at a fraction of the memory and time.
            tok = o[0].reshape(o.shape[1], -1).T.numpy()  # (n_tokens, D)
            k = int(min(k_part, tok.shape[0], tok.shape[1]))
            # Eigen-decomposition of the D x D covariance: tokens >> D, the fastest exact solver.
            try:
                pca = PCA(n_components=k, svd_solver="covariance_eigh").fit(tok)
            except ValueError:  # scikit-learn < 1.5 has no covariance_eigh
                pca = PCA(n_components=k, svd_solver="full").fit(tok)
            red = pca.transform(tok) / (np.sqrt(pca.explained_variance_[:k]) + 1e-6)
            # C-contiguous: torch's interpolate on the transposed (strided) view was 3-30x slower.
            red = np.ascontiguousarray(red.T.reshape((k,) + tuple(o.shape[2:])), dtype=np.float32)
            red = torch.from_numpy(red)[None]
            up = F.interpolate(red, size=list(shape), mode=mode, align_corners=False)[0]
            parts.append(np.moveaxis(up.numpy(), 0, -1))
    report(progress, total, total, "model features")
    return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)


def multiscale_features(
    image: np.ndarray,
    *,
    model=None,
    sigmas: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    progress=None,
) -> np.ndarray:
    """Multi-scale features of a 2D image or 3D volume, one vector per pixel.

    Parameters
    ----------
    image : ndarray, shape ``([Z,] Y, X)`` or with a channel axis
        Any real dtype; intensities are percentile-normalised per channel first, so
        dtypes give the same features up to scaling. Non-finite pixels become 0 (the
        low percentile, see :func:`as_float_image`) before filtering.
    model : MaskedAutoencoder, str, path or None
        If given (a loaded model, a bundled name such as ``"default-2d"``, or a
        checkpoint path, resolved by :func:`napari_mae.models.mae.load_model`), MAE encoder
        features (PCA-reduced, see :func:`model_features`) are appended.
    sigmas : sequence of float or None
        Filter-bank scales in physical units of ``spacing`` (pixels without spacing);
        default :func:`default_sigmas`.
    spacing : sequence of float or None
        Physical pixel size per spatial axis, e.g. ``(0.28, 0.13, 0.13)`` um for
        ``(Z, Y, X)``; anisotropic volumes get a per-axis sigma in pixels.
    channel_axis : int or None
        Axis of ``image`` holding channels (RGB: ``-1``).
    progress : callable or None
        ``progress(done, total, message)``, see :mod:`napari_mae._progress`.

    Returns
    -------
    features : ndarray of float32, shape ``image.shape[spatial] + (n_features,)``
        ``n_features = C * len(sigmas) * (3 + ndim)`` (+ the model's PCA channels).

    Raises
    ------
    ValueError
        If the image is not 2D/3D, or ``spacing`` does not have one positive, finite value
        per spatial axis.
    """
    x, _, _ = as_float_image(image, channel_axis=channel_axis)
    ndim = x.ndim - 1
    if spacing is not None:
        spacing = check_spacing(spacing, ndim)
    if sigmas is None:
        sigmas = default_sigmas(spacing, ndim)
    feats = filter_bank(x, sigmas, spacing, progress=progress)
    if model is not None:
        from napari_mae.models.mae import load_model

        if isinstance(model, str | bytes) or hasattr(model, "__fspath__"):
            model = load_model(model)
        mf = model_features(x, model, progress=progress)
        feats = np.concatenate([feats, mf], axis=-1)
    return feats
