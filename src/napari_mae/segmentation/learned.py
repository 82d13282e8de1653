"""Learned instance segmentation: the MAE decoder's maps, then a seeded watershed.

The pipeline of micro-sam's automatic instance segmentation with a decoder
(Archit et al., Nature Methods 2025), adapted per image:

1. **Scale**: the image is resampled so that its objects have the radius the
   decoder was trained on (``r_ref``, stored in the checkpoint). The radius
   comes from the classical estimate
   (:func:`napari_mae.segmentation.scale.estimate_object_radius`); optionally
   (``LearnedParams.rescale_tolerance``) it is checked against the objects the
   decoder itself finds, as Cellpose's size model refines its estimate
   (Stringer et al. 2021, Methods): where their median radius is off ``r_ref``
   by more than that ratio, the image is resampled again and predicted again.
2. **Maps**: foreground probability, normalised centre distance and normalised
   boundary distance (:mod:`napari_mae.segmentation.targets`), predicted by
   sliding windows blended with Gaussian weights (MONAI
   ``sliding_window_inference``), so any image size works.
3. **Instances**: seeds where both distances are small inside the foreground,
   a watershed on the boundary distance (torch-em's
   ``watershed_from_center_and_boundary_distances``).

Volumes are segmented with a 2D model from their three orthogonal plane
stacks, resampled towards isotropic voxels, the three predicted maps averaged,
then a 3D seeded watershed (Cellpose's 3D mode, Stringer et al. 2021); a 3D
model (trained on volumes) predicts the resampled volume itself with 3D sliding
windows (:func:`segment_volume`), then the same 3D watershed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import watershed
from skimage.transform import resize

# The input preparation both pipelines share (re-exported: callers import it from here).
from napari_mae.segmentation.prepare import prepare_image
from napari_mae.segmentation.watershed import relabel, remove_small_labels

__all__ = [
    "LearnedParams",
    "decoder_input",
    "foreground_ambiguity",
    "instances_from_maps",
    "predict_maps",
    "prepare_image",
    "segment_volume",
]


@dataclass(frozen=True)
class LearnedParams:
    """Post-processing thresholds of the learned pipeline (frozen, validated).

    Parameters
    ----------
    foreground_threshold : float
        Foreground probability above which a pixel belongs to an object.
    center_threshold, boundary_threshold : float
        Seeds are the connected regions where the normalised centre distance
        and the normalised boundary distance are both below these.
    sigma_distance, sigma_foreground : float
        Gaussian smoothing of the distance maps and of the foreground, in
        pixels of the model's scale (torch-em's defaults 1.6 and 1.0).
    min_size : int
        Objects smaller than this many pixels (voxels) at the model's scale are
        removed.
    rescale_tolerance : float
        Ratio between the found objects' median radius and ``r_ref`` beyond
        which the image is resampled again and predicted a second time; ``inf``
        (the default) turns that second pass off: on the DSB dev set it lowered
        acc@0.5 (the classical radius estimate alone did better), see the README.
    """

    foreground_threshold: float = 0.5
    center_threshold: float = 0.5
    boundary_threshold: float = 0.5
    sigma_distance: float = 1.6
    sigma_foreground: float = 1.0
    min_size: int = 10
    rescale_tolerance: float = math.inf

    def __post_init__(self) -> None:
        for name in ("foreground_threshold", "center_threshold", "boundary_threshold"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name}={v} must be in (0, 1)")
        for name in ("sigma_distance", "sigma_foreground"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.min_size < 0:
            raise ValueError(f"min_size={self.min_size} must be >= 0")
        if not self.rescale_tolerance > 1.0:
            raise ValueError(f"rescale_tolerance={self.rescale_tolerance} must be > 1")


#: Largest resampling factor per axis (a 4 px nucleus is brought to 8 px at 2x).
MAX_UPSCALE = 4.0
#: Largest growth of a volume's voxel count on the working grid.
MAX_VOLUME_GROWTH = 8.0


def default_bf16(device: torch.device) -> bool:
    """Whether the decoder runs under bfloat16 on ``device``: CUDA with bf16, CPUs with native bf16.

    On such a CPU it halved the decoder's time at the same DSB dev acc@0.5 (within 0.002).
    """
    from napari_mae.models.mae import amp_dtype

    return device.type in ("cuda", "cpu") and amp_dtype(device, cpu_bf16=True) == torch.bfloat16


#: Gaussian sigma, in pixels of the input grid, of the copy whose percentiles scale the
#: decoder's input (:func:`decoder_input`).
INPUT_SMOOTHING = 1.0


def decoder_input(
    image: np.ndarray, *, invalid: np.ndarray | None = None, inverted: bool = False
) -> np.ndarray:
    """The decoder's input: a prepared image rescaled by the 1-99.8 % percentiles of a smoothed copy.

    :func:`prepare_image` scales by the image's own percentiles, which in a noisy image
    sit in the noise's tails: its background lands well above 0 and its objects below 1,
    out of what a decoder trained on clean images has seen. The percentiles of a copy
    smoothed by :data:`INPUT_SMOOTHING` pixels are the signal's
    (:func:`napari_mae.preprocess.percentile_range` with ``smooth``, as block-wise
    segmentation takes the range of a whole volume for the learned method:
    :func:`napari_mae.distributed.estimate_global_parameters`). On clean images they are
    about the image's own, so the rescaling is close to the identity there. The returned
    image is the input rescaled, not smoothed.

    Parameters
    ----------
    image : ndarray of float, shape ``([Z,] Y, X)``
        One prepared channel, bright objects (:func:`prepare_image`).
    invalid : ndarray of bool, shape ``image.shape``, or None
        Pixels that were not finite in the input (``prepare_image``'s ``info["invalid"]``):
        left out of the percentiles and of the smoothing.
    inverted : bool
        ``image`` was inverted to bright objects (``not info["bright_objects"]``): the
        range is the one of the image before the inversion (its 0.2 and 99 % percentiles
        after it), as a block whose volume's range is given is scaled and then inverted.

    Returns
    -------
    ndarray of float32, shape ``image.shape``
        The range's low end at 0 and its high end at 1; ``image`` unchanged where that
        range is empty (a constant image).
    """
    from napari_mae.preprocess import percentile_range

    x = np.asarray(image, dtype=np.float32)
    valid = x if invalid is None or not invalid.any() else np.where(invalid, np.float32(np.nan), x)
    if not np.ptp(x) > 0 or not np.isfinite(valid).any():
        return x
    lower, upper = (100.0 - 99.8, 100.0 - 1.0) if inverted else (1.0, 99.8)
    lo, hi = percentile_range(valid[None], lower, upper, smooth=INPUT_SMOOTHING)
    return ((x - np.float32(lo[0])) / np.float32(hi[0] - lo[0])).astype(np.float32, copy=False)


def _clip_scale(scale: float) -> float:
    """A 2D resampling factor within [1 / 16, MAX_UPSCALE]."""
    return float(min(max(scale, 1.0 / 16.0), MAX_UPSCALE))


def plane_scale(radius_px: float, r_ref: float) -> float:
    """The factor by which :func:`segment_plane` first resamples a 2D image whose objects have
    ``radius_px`` pixels radius, so that they get the decoder's ``r_ref`` (within [1/16, 4])."""
    return _clip_scale(r_ref / max(float(radius_px), 1e-3))


#: Window side of :func:`predict_maps` for volumes (3D decoder), in voxels of the model's scale.
ROI_3D = 64


def predict_maps(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    roi: int | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 8,
    bf16: bool = False,
    progress=None,
) -> np.ndarray:
    """The decoder's maps of one normalised image (2D, or a volume for a 3D decoder), by blended sliding windows.

    Parameters
    ----------
    net : InstanceDecoder
        Of ``image.ndim`` spatial dimensions.
    image : ndarray of float32, shape ([Z,] Y, X)
        Intensity-normalised (about [0, 1]), bright objects, at the model's scale.
    roi : int or None
        Window side in pixels (rounded down to the patch size per axis); None: 128 for
        images, :data:`ROI_3D` for volumes.
    overlap : float
        Fraction of overlap between windows (MONAI ``sliding_window_inference``).
    bf16 : bool
        Run under bfloat16 autocast (CPU with native bf16 or CUDA).
    progress : callable or None
        ``progress(done, total, message)`` after each batch of windows.

    Returns
    -------
    ndarray of float32, shape ``(3,) + image.shape``
        Foreground probability, centre distance, boundary distance.

    Raises
    ------
    ValueError
        If ``image.ndim`` is not the decoder's number of spatial dimensions.
    """
    from monai.inferers import sliding_window_inference

    patch = tuple(int(q) for q in net.encoder.patch_size)
    if image.ndim != len(patch):
        raise ValueError(f"a {len(patch)}D decoder cannot predict a {image.ndim}D image")
    if roi is None:
        roi = 128 if image.ndim == 2 else ROI_3D
    shape = image.shape
    # pad to a multiple of the patch size, and to two patches at least: a one-token grid
    # leaves the decoder's instance norms a single value (torch refuses it)
    pad = [(0, max((-s) % p, 2 * p - s)) for s, p in zip(shape, patch, strict=True)]
    mode = "reflect" if min(shape) > 1 else "edge"  # reflect needs two values per axis
    x = np.pad(image, pad, mode=mode) if any(b for _, b in pad) else image
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    roi_size = tuple(
        max(p, min(roi, s) - (min(roi, s) % p)) for s, p in zip(xt.shape[2:], patch, strict=True)
    )
    device = next(net.parameters()).device
    predictor = net
    if progress is not None:
        # windows per axis as MONAI's scan: interval roi * (1 - overlap), the last one flush
        total = math.prod(
            1 + math.ceil(max(s - r, 0) / max(int(r * (1 - overlap)), 1))
            for s, r in zip(xt.shape[2:], roi_size, strict=True)
        )
        done = [0]

        def predictor(batch):
            out = net(batch)
            done[0] = min(done[0] + batch.shape[0], total)
            progress(done[0], total, f"window {done[0]} of {total}")
            return out

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        y = sliding_window_inference(
            xt.to(device),
            roi_size,
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            padding_mode="reflect",
        )  # (1, 3, *padded)
    y = y[0].float().cpu().numpy()[(slice(None),) + tuple(slice(0, s) for s in shape)]
    from scipy.special import expit  # the logistic without overflow warnings

    y[0] = expit(y[0])
    return y


def instances_from_maps(maps: np.ndarray, params: LearnedParams | None = None) -> np.ndarray:
    """Seeded watershed on the predicted maps.

    Parameters
    ----------
    maps : ndarray of float32, shape (3, [Z,] Y, X)
        Foreground probability, centre distance, boundary distance.
    params : LearnedParams, optional

    Returns
    -------
    ndarray of int32, shape ``maps.shape[1:]``
        Instance labels, 0 = background, consecutive ids.
    """
    prm = params or LearnedParams()
    fg, c, b = (m.astype(np.float32, copy=False) for m in maps)
    if prm.sigma_foreground:
        fg = ndi.gaussian_filter(fg, prm.sigma_foreground)
    if prm.sigma_distance:
        c = ndi.gaussian_filter(c, prm.sigma_distance)
        b = ndi.gaussian_filter(b, prm.sigma_distance)
    mask = fg > prm.foreground_threshold
    seeds, _ = ndi.label((c < prm.center_threshold) & (b < prm.boundary_threshold) & mask)
    labels = watershed(b, markers=seeds, mask=mask).astype(np.int32)
    if prm.min_size:
        remove_small_labels(labels, prm.min_size)
    return relabel(labels, np.int32)


#: Foreground probabilities between these count as ambiguous (:func:`foreground_ambiguity`).
AMBIGUOUS_RANGE = (0.25, 0.75)

#: The largest :func:`foreground_ambiguity` of a 2D image the decoder is trusted on under
#: ``method="auto"``: twice the largest value of the bundled nuclei decoder on the 19
#: training-split images held out from its training (0.061; median 0.031). Images of types
#: the decoder was not trained on (whole embryos under a haze in the DSB dev set) reach
#: several times that; above it ``segment_instances(method="auto")`` falls back to the
#: classical pipeline. Calibrated in 2D only: a volume's three averaged plane stacks blur
#: its maps, and there are no held-out labelled volumes to calibrate on.
MAX_AMBIGUITY = 0.12


def foreground_ambiguity(foreground: np.ndarray) -> float:
    """The share of a predicted foreground whose probability is neither high nor low.

    An out-of-domain image gives a decoder's foreground map wide zones of middling
    probability, where an image of the kind it was trained on has sharp objects: the
    fraction of the pixels above :data:`AMBIGUOUS_RANGE`'s low end that lie below its high
    end, a confidence check in the spirit of maximum-softmax-probability
    out-of-distribution detection (Hendrycks & Gimpel 2017, "A baseline for detecting
    misclassified and out-of-distribution examples").

    Parameters
    ----------
    foreground : ndarray of float, shape ``([Z,] Y, X)``
        Foreground probabilities in [0, 1] (the decoder's first map, before smoothing).

    Returns
    -------
    float
        In [0, 1]; 0 where no pixel is above the low end.
    """
    lo, hi = AMBIGUOUS_RANGE
    fg = np.asarray(foreground)
    above = fg > lo
    n = int(np.count_nonzero(above))
    return float(np.count_nonzero(above & (fg < hi)) / n) if n else 0.0


def median_radius(labels: np.ndarray) -> float | None:
    """Median equivalent-disk (sphere) radius of the labelled objects, in pixels; None if none."""
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    if not counts.size:
        return None
    a = float(np.median(counts))
    return float(np.sqrt(a / np.pi)) if labels.ndim == 2 else float((3 * a / (4 * np.pi)) ** (1 / 3))


def rescaled(image: np.ndarray, factor: Sequence[float]) -> np.ndarray:
    """``image`` resampled by ``factor`` per axis (linear, anti-aliased when shrinking)."""
    shape = tuple(max(8, int(round(n * f))) for n, f in zip(image.shape, factor, strict=True))
    if shape == image.shape:
        return image
    shrink = any(f < 1 for f in factor)
    return resize(image, shape, order=1, anti_aliasing=shrink, preserve_range=True).astype(np.float32)


def segment_plane(
    net: torch.nn.Module,
    image: np.ndarray,
    radius_px: float,
    r_ref: float,
    params: LearnedParams | None = None,
    *,
    bf16: bool = False,
    progress=None,
) -> tuple[np.ndarray, dict]:
    """Segment one normalised 2D image whose objects have about ``radius_px`` pixels radius.

    ``progress(done, total, message)`` is called after each batch of decoder windows (raise
    :class:`napari_mae._progress.Cancelled` from it to stop).

    Returns
    -------
    labels : ndarray of int32, shape ``image.shape``
    info : dict
        ``scale`` (the resampling factor used), ``passes`` (1 or 2),
        ``radius_found_px`` (median radius of the objects found, input pixels),
        ``ambiguity`` (:func:`foreground_ambiguity` of the last pass's foreground).
    """
    prm = params or LearnedParams()
    scale = plane_scale(radius_px, r_ref)
    passes = 0
    while True:
        passes += 1
        work = rescaled(image, (scale, scale))
        maps = predict_maps(net, work, bf16=bf16, progress=progress)
        labels = instances_from_maps(maps, prm)
        found = median_radius(labels)
        ratio = (found / r_ref) if found else 1.0
        if passes == 2 or not (ratio > prm.rescale_tolerance or ratio < 1 / prm.rescale_tolerance):
            break
        scale = _clip_scale(scale / ratio)
    if labels.shape != image.shape:
        labels = resize(labels, image.shape, order=0, preserve_range=True, anti_aliasing=False).astype(
            np.int32
        )
    return labels, {
        "scale": float(scale),
        "passes": passes,
        "radius_found_px": None if not found else float(found / scale),
        "ambiguity": foreground_ambiguity(maps[0]),
    }


def isotropic_factor(spacing: Sequence[float], radius: float, r_ref: float) -> tuple[float, ...]:
    """Resampling factor per axis (grid size / input size) to the model's isotropic working grid.

    One working voxel measures ``radius / r_ref`` physical units on every axis, so that
    objects of ``radius`` (physical) have ``r_ref`` voxels radius. A radius estimate far
    too small (a noisy volume) must not blow the grid up: at most :data:`MAX_UPSCALE` per
    axis and :data:`MAX_VOLUME_GROWTH` times the input's voxels.

    Parameters
    ----------
    spacing : sequence of 3 float
        Physical voxel size (Z, Y, X).
    radius : float
        Object radius in the units of ``spacing``.
    r_ref : float
        Object radius in voxels the model works at.

    Returns
    -------
    tuple of 3 float
    """
    iso = radius / r_ref  # physical size of one working voxel
    factor = np.minimum(np.asarray(spacing, dtype=float) / iso, MAX_UPSCALE)
    growth = float(np.prod(factor))
    if growth > MAX_VOLUME_GROWTH:
        factor = factor * (MAX_VOLUME_GROWTH / growth) ** (1 / 3)
    return tuple(float(f) for f in factor)


def predict_volume_maps(
    net: torch.nn.Module,
    volume: np.ndarray,
    spacing: Sequence[float],
    radius: float,
    r_ref: float,
    *,
    bf16: bool = False,
    progress=None,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Averaged maps of the three orthogonal plane stacks of a normalised volume.

    The volume is resampled so that voxels are isotropic and objects have
    ``r_ref`` voxels radius; every Z, Y and X plane of that grid is predicted by
    the 2D decoder (:func:`predict_maps`), and the three stacks are averaged.

    Parameters
    ----------
    volume : ndarray of float32, shape (Z, Y, X)
    spacing : sequence of 3 float
        Physical voxel size (Z, Y, X).
    radius : float
        Object radius in the units of ``spacing``.

    Returns
    -------
    maps : ndarray of float32, shape (3, Z', Y', X')
        On the resampled grid.
    factor : tuple of 3 float
        Resampling factor per axis (grid size / input size).
    """
    work = rescaled(volume, isotropic_factor(spacing, radius, r_ref))
    maps = np.zeros((3,) + work.shape, dtype=np.float32)
    total = sum(work.shape)
    done = 0
    for axis in range(3):
        moved = np.moveaxis(work, axis, 0)
        acc = np.moveaxis(maps, axis + 1, 1)  # view: (3, n_planes, a, b)
        for k in range(moved.shape[0]):
            acc[:, k] += predict_maps(net, np.ascontiguousarray(moved[k]), bf16=bf16)
            done += 1
            if progress is not None:
                progress(done, total, f"plane {done} of {total}")
    maps /= 3.0
    factor = tuple(w / n for w, n in zip(work.shape, volume.shape, strict=True))
    return maps, factor


def _labels_on_input_grid(maps: np.ndarray, shape: tuple[int, ...], prm: LearnedParams):
    """Instances of a volume's maps (on the working grid), brought back to ``shape``, and the
    median radius of those found in working voxels (None if none)."""
    lab = instances_from_maps(maps, prm)
    found = median_radius(lab)
    labels = resize(lab, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
    return relabel(labels, np.int32), found


def segment_learned(
    image: np.ndarray,
    net: torch.nn.Module,
    r_ref: float,
    *,
    spacing: Sequence[float],
    radius: float,
    params: LearnedParams | None = None,
    bf16: bool | None = None,
    progress=None,
    radius_from_planes: bool = True,
) -> tuple[np.ndarray, dict]:
    """Instance labels of a prepared image with the learned decoder.

    Parameters
    ----------
    image : ndarray of float32, shape ([Z,] Y, X)
        One channel, normalised to about [0, 1], bright objects (the classical
        pipeline's preparation: channels, polarity, outlier repair), rescaled by
        :func:`decoder_input` (as training and fine-tuning rescale theirs).
    net : InstanceDecoder
        A 2D decoder segments images, and volumes from their orthogonal planes
        (:func:`predict_volume_maps`); a 3D decoder segments volumes directly
        (:func:`segment_volume`).
    r_ref : float
        Object radius, in pixels, the decoder was trained at.
    spacing : sequence of float
        Physical pixel size per axis.
    radius : float
        Estimated object radius in physical units.
    bf16 : bool or None
        bfloat16 autocast for the decoder; None: where the device computes it natively
        (:func:`default_bf16`).
    radius_from_planes : bool
        Volumes and a 2D decoder: replace ``radius`` by the decoder's own estimate from a
        few Z planes (:func:`_radius_from_planes`). False keeps ``radius`` (a fine-tuned
        model's stored radius, see :func:`napari_mae.models.decoder.fitted_radius`).
        Ignored by a 3D decoder.

    Returns
    -------
    labels : ndarray of int32, shape ``image.shape``
    info : dict
        ``decoder`` (``"2d"``, ``"planes"``: a volume by a 2D decoder, or ``"3d"``),
        ``scale`` (resampling factor per axis), ``passes``, ``radius_found`` (physical;
        None when nothing was found); volumes also ``radius_planes``, images also
        ``ambiguity`` (:func:`foreground_ambiguity`).

    Raises
    ------
    ValueError
        If a 3D decoder is given a 2D image.
    """
    prm = params or LearnedParams()
    sp = np.asarray(spacing, dtype=float)
    if bf16 is None:
        bf16 = default_bf16(next(net.parameters()).device)
    dims = int(getattr(net, "spatial_dims", 2))
    if dims == 3:
        if image.ndim != 3:
            raise ValueError(f"a 3D segmentation model segments volumes; the image is {image.ndim}D")
        return segment_volume(net, image, r_ref, spacing=sp, radius=radius, params=prm, bf16=bf16,
                              progress=progress)  # fmt: skip
    if image.ndim == 2:
        r_px = radius / float(np.sqrt(sp[0] * sp[1]))
        labels, info = segment_plane(net, image, r_px, r_ref, prm, bf16=bf16, progress=progress)
        found = info.pop("radius_found_px")
        info["radius_found"] = None if found is None else float(found * np.sqrt(sp[0] * sp[1]))
        info["scale"] = (info["scale"],) * 2
        return labels, {"decoder": "2d", **info}
    radius_planes = None
    if radius_from_planes:
        radius_planes = _radius_from_planes(net, image, sp, radius, r_ref, prm, bf16=bf16)
    if radius_planes is not None:
        radius = radius_planes
    maps, factor = predict_volume_maps(net, image, sp, radius, r_ref, bf16=bf16, progress=progress)
    labels, found = _labels_on_input_grid(maps, image.shape, prm)
    iso = radius / r_ref
    return labels, {
        "decoder": "planes",
        "scale": factor,
        "passes": 1,
        "radius_planes": radius_planes,
        "radius_found": None if found is None else float(found * iso),
    }


def segment_volume(
    net: torch.nn.Module,
    volume: np.ndarray,
    r_ref: float,
    *,
    spacing: Sequence[float],
    radius: float,
    params: LearnedParams | None = None,
    bf16: bool = False,
    progress=None,
) -> tuple[np.ndarray, dict]:
    """Instance labels of a prepared volume with a 3D decoder, run on the volume itself.

    The volume is resampled towards isotropic voxels at which its objects have ``r_ref``
    voxels radius (:func:`isotropic_factor`, the grid the 3D decoder was trained on, see
    :mod:`napari_mae.training.segmentation`), predicted by 3D sliding windows blended with
    Gaussian weights (:func:`predict_maps`), segmented by the seeded watershed
    (:func:`instances_from_maps`) on that grid, and the labels resampled (nearest) back to
    the input grid.

    Parameters
    ----------
    net : InstanceDecoder
        A 3D decoder.
    volume : ndarray of float32, shape (Z, Y, X)
        One channel, normalised to about [0, 1], bright objects.
    r_ref : float
        Object radius, in voxels, the decoder was trained at.
    spacing : sequence of 3 float
        Physical voxel size (Z, Y, X).
    radius : float
        Object radius in the units of ``spacing``.
    params : LearnedParams, optional
    bf16 : bool
        bfloat16 autocast for the decoder.
    progress : callable or None
        ``progress(done, total, message)`` per batch of windows.

    Returns
    -------
    labels : ndarray of int32, shape ``volume.shape``
        0 = background, consecutive ids.
    info : dict
        ``decoder`` (``"3d"``), ``scale`` (resampling factor per axis), ``passes`` (1),
        ``radius_planes`` (None: no plane estimate), ``radius_found`` (physical; None when
        nothing was found).
    """
    prm = params or LearnedParams()
    factor = isotropic_factor(spacing, radius, r_ref)
    work = rescaled(volume, factor)
    maps = predict_maps(net, work, bf16=bf16, progress=progress)  # (3, Z', Y', X')
    labels, found = _labels_on_input_grid(maps, volume.shape, prm)
    factor = tuple(w / n for w, n in zip(work.shape, volume.shape, strict=True))
    # physical size of one working voxel (isotropic up to rounding; not where the grid was capped)
    voxel = float(np.prod([s / f for s, f in zip(spacing, factor, strict=True)]) ** (1 / 3))
    return labels, {
        "decoder": "3d",
        "scale": factor,
        "passes": 1,
        "radius_planes": None,
        "radius_found": None if found is None else float(found * voxel),
    }


#: Median radius of the sections of a sphere through random planes, as a fraction of
#: the sphere's radius: sqrt(R^2 - z^2) for z uniform on [0, R] has mean pi/4 R.
_SECTION_RADIUS = np.pi / 4


def _radius_from_planes(net, volume, sp, radius, r_ref, prm, *, bf16=False, n_planes=5) -> float | None:
    """The decoder's own size estimate of a volume, from a few of its Z planes.

    The classical estimate can be off by 2x on dim, noisy volumes; the 2D
    decoder's second pass (:func:`segment_plane`) corrects its scale from the
    objects it finds. The median found section radius, divided by
    :data:`_SECTION_RADIUS`, estimates the objects' 3D radius.
    """
    z = volume.shape[0]
    # the planes with the most structure (highest standard deviation)
    order = np.argsort([-float(volume[k].std()) for k in range(z)])[: min(n_planes, z)]
    r_xy = float(np.sqrt(sp[1] * sp[2]))
    found = []
    for k in sorted(order):
        _, info = segment_plane(net, np.ascontiguousarray(volume[k]), radius / r_xy, r_ref, prm, bf16=bf16)
        if info["radius_found_px"]:
            found.append(info["radius_found_px"])
    if not found:
        return None
    return float(np.median(found)) * r_xy / _SECTION_RADIUS


_CACHE: dict = {}


def cached_segmenter(spec) -> torch.nn.Module:
    """:func:`napari_mae.models.decoder.load_segmenter`, kept in memory per file (path and mtime).

    The bundled model takes a fraction of a second to read; the widgets and folder runs
    segment many images with one model. The model gets a ``source`` attribute naming it.
    """
    from pathlib import Path

    from napari_mae._names import bundled_segmenter_path
    from napari_mae.models.decoder import InstanceDecoder, load_segmenter

    if isinstance(spec, InstanceDecoder):
        if not hasattr(spec, "source"):
            spec.source = "model"
        return spec.eval()
    path = bundled_segmenter_path(spec) if isinstance(spec, str) else None
    path = Path(spec) if path is None else path
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else None)
    if key not in _CACHE:
        net = load_segmenter(spec)
        net.source = str(spec)
        _CACHE.clear()  # one model at a time: they are ~10 MB each
        _CACHE[key] = net
    net = _CACHE[key]
    # the name asked for this time: "default-2d" and its alias share one file
    net.source = str(spec)
    return net
