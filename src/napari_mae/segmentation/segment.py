"""The entry point of instance segmentation: one function for both pipelines.

:func:`segment_instances` checks the input, prepares one normalised channel with bright
objects (:mod:`~napari_mae.segmentation.prepare`), estimates the object radius
(:mod:`~napari_mae.segmentation.scale`), then runs the learned decoder
(:mod:`~napari_mae.segmentation.learned`, imported only then: it needs torch) or the
classical pipeline (:mod:`~napari_mae.segmentation.classical`), and returns the labels
with a :class:`~napari_mae.segmentation.params.SegmentationInfo`. Neither pipeline
imports this module or the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_mae._progress import ProgressCallback, report, sub_progress
from napari_mae.preprocess import (
    check_channel_axis,
    check_object_radius,
    check_spacing,
    check_threshold,
    guess_rgb_axis,
)
from napari_mae.segmentation.classical import segment_classical
from napari_mae.segmentation.features import as_float_image
from napari_mae.segmentation.params import DEFAULT_PARAMS, SegmentationInfo, SegmentationParams
from napari_mae.segmentation.prepare import bright_single_channel
from napari_mae.segmentation.scale import estimate_object_radius
from napari_mae.segmentation.watershed import relabel

__all__ = ["segment_instances"]


def segment_instances(
    image: np.ndarray,
    *,
    scribbles: np.ndarray | None = None,
    method: str = "auto",
    model=None,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    object_radius: float | None = None,
    threshold: float | None = None,
    bright_objects: bool | None = None,
    tile_shape: Sequence[int] | None = None,
    params: SegmentationParams | None = None,
    progress: ProgressCallback | None = None,
    intensity_range: Sequence[float] | None = None,
    radius_from_planes: bool = True,
) -> tuple[np.ndarray, SegmentationInfo]:
    """Segment every object of a 2D image or 3D volume as its own label.

    Parameters
    ----------
    image : ndarray, shape ``([Z,] Y, X)``, ``(Y, X, 3)`` RGB, or with ``channel_axis``
        Any real dtype (uint8/uint16/int32/float32/float64 give the same labels); NaN
        pixels are ignored (never labelled). A volume of one slice (one spatial axis of
        length 1) is segmented as the 2D image it is (its ``spacing``, ``scribbles`` and
        ``tile_shape`` may have 3 values or 2); the labels keep the singleton axis, ``info``
        describes the 2D run. An RGB image is recognised by a last axis
        of length 3 or 4 on a 3-dimensional array whose other axes are both longer than 16
        and with no ``spacing`` of length 3 (:func:`napari_mae.preprocess.guess_rgb_axis`);
        otherwise pass ``channel_axis``.
    scribbles : ndarray of int or None, shape ``image.shape[spatial]``
        0 = unlabelled, 1 = background, 2.. = object classes (all merged into
        "object"). None for the automatic mode.
    method : {"auto", "learned", "classical"}
        ``"learned"``: the MAE encoder's instance decoder
        (:func:`napari_mae.segmentation.learned.segment_learned`; volumes from their
        orthogonal planes with a 2D model, directly with a 3D one; ``info["decoder"]``);
        ``"classical"``: the filter-bank pipeline (with scribbles, the scribble classifier);
        ``"auto"``: learned when ``model`` is a segmentation model that fits the image (a 3D
        model only volumes) and there are no scribbles, or, without ``model``, with the
        bundled 2D nuclei decoder on a single-channel 2D image (or a grey one saved as RGB;
        at most :data:`AUTO_LEARNED_MAX_PIXELS` on its grid and on the decoder's; none of
        the classical pipeline's ``threshold``, ``tile_shape``, ``params`` given); classical
        otherwise. On a 2D image whose decoder
        foreground is too ambiguous
        (:func:`~napari_mae.segmentation.learned.foreground_ambiguity` above
        :data:`~napari_mae.segmentation.learned.MAX_AMBIGUITY`: an image unlike those the
        bundled decoder was trained on; the bundled decoder only, by default or by name: a
        checkpoint you name is not second-guessed) the classical pipeline runs instead and
        ``info["fallback"]`` says why.
        ``info["method"]`` says which ran.
    model : str, path, model or None
        With the learned method, the segmentation model: a segmentation checkpoint or
        ``"default-2d"`` (bundled; the default of ``method="learned"``). With the classical method and scribbles,
        an MAE whose encoder features join the scribble classifier (see
        :func:`napari_mae.segmentation.features.multiscale_features`); ignored without scribbles.
    spacing : sequence of float or None
        Physical pixel size per spatial axis, e.g. ``(0.28, 0.13, 0.13)`` um (Z, Y, X).
        Radii are then reported in the same unit. None means isotropic 1.
    channel_axis : int or None
        Axis of ``image`` holding channels.
    object_radius : float or None
        Typical object radius in physical units; estimated when None, except with a
        fine-tuned model (learned method), which segments at the radius it was
        fine-tuned at (:func:`napari_mae.models.decoder.fitted_radius`).
    threshold : float or None
        Foreground threshold on the background-subtracted, normalised image (automatic
        mode) or on the object probability (scribble mode, default 0.5); estimated
        (Otsu) when None. In (0, 1).
    bright_objects : bool or None
        Polarity; detected when None (dark-on-bright images are inverted).
    tile_shape : sequence of int or None
        Core tile shape in pixels for tiled processing; None tiles automatically above
        about 8 M pixels (on the working grid): tiles of about 16 M pixels (4096^2,
        256^3; half that with scribbles) including margins of 6 object radii, with equal
        cores that divide each axis.
    params : SegmentationParams or None
        Lengths and thresholds of the classical pipeline; default
        :data:`~napari_mae.segmentation.params.DEFAULT_PARAMS`.
    progress : callable or None
        ``progress(done, total, message)``; raise :class:`napari_mae._progress.Cancelled`
        from it to stop.
    intensity_range : (float, float) or None
        ``(lo, hi)`` in the image's intensity units: a single-channel image is normalised
        by these instead of its own 1st and 99.8th percentiles (non-finite pixels still
        become 0). For the blocks of a volume: each is normalised as the whole volume is,
        by the volume's range estimated once (:mod:`napari_mae.distributed`). The learned
        method then takes this range as its decoder's input scaling instead of
        :func:`~napari_mae.segmentation.learned.decoder_input`'s: give it the smoothed range
        (``percentile_range(..., smooth=learned.INPUT_SMOOTHING)``), as block-wise
        segmentation does.
    radius_from_planes : bool
        Learned method, volumes: re-estimate the estimated object radius from a few planes
        with the decoder (:func:`~napari_mae.segmentation.learned.segment_learned`). A
        given ``object_radius`` is never re-estimated. False segments at the classical
        estimate as it is.

    Returns
    -------
    labels : ndarray of uint32, shape ``image.shape[spatial]``
        0 = background, objects 1..n consecutive.
    info : SegmentationInfo
        A read-only mapping (``info["radius"]``, ``dict(info)``): ``n_objects``, ``radius`` (physical), ``radius_px`` (per axis), ``radius_log``,
        ``radius_foreground``, ``threshold``, ``bright_objects``, ``spacing``, ``mode``
        ("automatic" / "scribbles"), ``working_shape`` (the grid segmented, see
        :func:`~napari_mae.segmentation.scale.working_shape`), ``tiles``, and ``message`` (non-empty when the
        result is empty for a reason, e.g. a constant image); ``method`` ("learned" /
        "classical"), and for the learned method ``model``, ``scale`` (resampling factor
        per axis), ``passes`` and ``radius_found`` (the median radius of the objects the
        decoder found, physical units); on 2D images the decoder ran on, ``ambiguity``
        (:func:`~napari_mae.segmentation.learned.foreground_ambiguity`), and ``fallback``
        where ``method="auto"`` dropped its result for the classical one.

    Raises
    ------
    ValueError
        If the image is empty or not 2D/3D, ``channel_axis`` is out of range, ``spacing``
        is malformed, ``object_radius`` is not positive or exceeds the image, ``threshold`` is
        not in (0, 1), the scribbles have the wrong shape, non-integer or negative values,
        look like an intensity image or lack either background or object strokes
        (:func:`~napari_mae.segmentation.scribbles.check_scribbles`), ``method`` is
        unknown, ``method="learned"`` is given scribbles or a 3D model for a 2D image, the
        MAE given with scribbles has other spatial dimensions than the image, or
        ``intensity_range`` is not a finite ``(lo, hi)`` with ``hi > lo`` or is given for
        several channels.
    FileNotFoundError
        If ``model`` (learned or auto method, no scribbles) is a name or path that is
        neither a bundled model (``"default-2d"``, alias ``"default-2d-nuclei"``), a preset
        nor an existing file.
    napari_mae.io.checkpoint.CheckpointError
        ``method="learned"`` with a ``model`` that is not a segmentation model.
    """
    if method not in ("auto", "learned", "classical"):
        raise ValueError(f"method={method!r} must be 'auto', 'learned' or 'classical'")
    prm = DEFAULT_PARAMS if params is None else params
    if not isinstance(prm, SegmentationParams):
        raise ValueError(f"params must be a SegmentationParams, got {type(params).__name__}")
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError(f"the image is empty (shape {arr.shape})")
    channel_axis = check_channel_axis(channel_axis, arr.ndim)
    if channel_axis is None:
        channel_axis = guess_rgb_axis(arr.shape, spacing=spacing)
    rgb = channel_axis is not None and arr.shape[channel_axis] in (3, 4)
    k = single_slice_axis(arr.shape, channel_axis)
    if k is not None:
        # one slice (a plain 1 x Y x X TIFF, an X x Y x 1 NIfTI): the 2D image it is; a 3D
        # pipeline finds nothing in a volume one voxel thick
        spatial = [a for a in range(arr.ndim) if a != channel_axis]
        labels, info = segment_instances(
            np.squeeze(arr, spatial[k]),
            scribbles=_drop_axis(scribbles, k, 3),
            method=method, model=model, spacing=_drop_axis(spacing, k, 3),
            channel_axis=None if channel_axis is None else channel_axis - int(channel_axis > spatial[k]),
            object_radius=object_radius, threshold=threshold, bright_objects=bright_objects,
            tile_shape=_drop_axis(tile_shape, k, 3), params=params, progress=progress,
            intensity_range=intensity_range, radius_from_planes=radius_from_planes,
        )  # fmt: skip
        return np.expand_dims(labels, k), info
    x, invalid, _ = as_float_image(arr, channel_axis=channel_axis, intensity_range=intensity_range)
    shape = x.shape[1:]
    ndim = len(shape)
    sp = check_spacing(spacing, ndim)
    scrib = _check_scribbles(scribbles, shape)
    check_object_radius(object_radius, shape, sp)
    check_threshold(threshold)
    if method == "learned" and scrib is not None:
        raise ValueError("the learned method takes no scribbles; use method='classical' for scribbles")
    if scrib is not None and model is not None:
        model = _feature_model(model, ndim)  # before any work: a 3D MAE on a 2D image failed after it
    net = None
    if scrib is None and (method == "learned" or (method == "auto" and model is not None)):
        net = _learned_model(model, method == "learned")
        net = _fits_dimensions(net, ndim, method == "learned")
    # auto without a model: the bundled decoder where it fits (loaded after the empty check)
    auto_bundled = scrib is None and method == "auto" and model is None
    why_not = (
        _why_not_bundled(x, rgb, intensity_range, threshold=threshold, tile_shape=tile_shape, params=params)
        if auto_bundled
        else None
    )
    bundled = auto_bundled and why_not is None
    info: dict = {
        "mode": "scribbles" if scrib is not None else "automatic",
        "method": "learned" if net is not None else "classical",
        "spacing": tuple(float(s) for s in sp),
        "message": "",
        "tiles": 1,
    }
    valid = ~invalid
    if not valid.any() or all(np.ptp(x[c][valid]) == 0 for c in range(x.shape[0])):
        info.update(
            n_objects=0,
            radius=float("nan"),
            radius_px=(float("nan"),) * ndim,
            threshold=float("nan"),
            bright_objects=True,
            message="image is constant or empty: no objects",
        )
        return np.zeros(shape, np.uint32), SegmentationInfo(**info)
    if bundled:
        net = _learned_model(None, False)  # None where the weights are missing: classical
        if net is None:
            why_not = "the bundled segmentation model is not installed"
    if why_not is not None and ndim == 2:  # volumes: auto is the classical pipeline, as documented
        info["fallback"] = f"auto ran the classical pipeline, not the bundled decoder: {why_not}"
    info["method"] = "learned" if net is not None else "classical"
    report(progress, 0, 100, "preparing")
    img, prep = bright_single_channel(x, invalid, rgb=rgb, bright_objects=bright_objects, scribbles=scrib)
    del x
    if prep["outlier_pixels"]:
        info["outlier_pixels"] = prep["outlier_pixels"]
    info["bright_objects"] = prep["bright_objects"]

    report(progress, 2, 100, "estimating object size")
    # A given radius, else a fine-tuned model's (decoder.fitted_radius), else the estimate.
    fixed = fixed_object_radius(object_radius, net)
    if fixed is None:
        est = estimate_object_radius(img, sp, progress=sub_progress(progress, 2, 20, 100))
    else:
        r = fixed[0]
        est = {"radius": r, "radius_px": tuple(r / s for s in sp), "radius_log": None,
               "radius_foreground": None}  # fmt: skip
    info.update(est)
    info["radius_source"] = "estimate" if fixed is None else fixed[1]
    if (
        bundled
        and net is not None
        and _decoder_pixels(shape, est["radius_px"], net) > AUTO_LEARNED_MAX_PIXELS
    ):
        net = None  # the decoder's grid would be too large (small objects are upsampled): classical
        info["method"] = "classical"
        info["fallback"] = (
            "auto ran the classical pipeline, not the bundled decoder: its grid would exceed "
            f"{AUTO_LEARNED_MAX_PIXELS / 2**20:g} MPix (objects under its radius are upsampled)"
        )
    if net is not None:
        from napari_mae.segmentation.learned import decoder_input

        # a given intensity_range (the blocks of a volume, scaled as the whole) is kept
        dec = (
            img
            if intensity_range is not None
            else decoder_input(img, invalid=invalid, inverted=not prep["bright_objects"])
        )
        labels, extra = _learned_labels(
            dec, net, sp, est["radius"], progress,
            # only an estimated radius is re-estimated from planes: a given or fitted one stays
            planes=fixed is None and radius_from_planes,
        )  # fmt: skip
        # MAX_AMBIGUITY is the bundled decoder's calibration: a model the caller names runs as named
        why = _fallback_reason(extra) if method == "auto" and _is_bundled(model) else None
        if why is not None:
            net = None
            info.update(method="classical", fallback=why, ambiguity=extra["ambiguity"])
    if net is not None:
        info.update(extra)
        if invalid.any():
            labels[invalid] = 0
        labels = relabel(labels)
    else:
        labels, extra = segment_classical(
            img, sp, est["radius"], scribbles=scrib, model=model, estimated_radius=object_radius is None,
            threshold=threshold, tile_shape=tile_shape, params=prm, progress=progress,
        )  # fmt: skip
        info.update(extra)
        if "radius_image" in extra:
            info["radius_source"] = "strokes"
        if invalid.any():
            labels[invalid] = 0
            labels = relabel(labels)
    info["n_objects"] = int(labels.max())
    if info["n_objects"] == 0 and not info["message"]:
        info["message"] = (
            "the decoder found no object" if net is not None else "no object above the threshold"
        )
    report(progress, 100, 100, "done")
    return labels, SegmentationInfo(**info)


def single_slice_axis(shape: Sequence[int], channel_axis: int | None = None) -> int | None:
    """The singleton axis of a volume of one slice, counted among the spatial axes; else None.

    Parameters
    ----------
    shape : sequence of int
        The array's shape, channels included.
    channel_axis : int or None
        Which axis holds channels (non-negative), if any.

    Returns
    -------
    int or None
        ``k`` such that spatial axis ``k`` has length 1 and the two others more than 1
        (:func:`segment_instances` segments such a volume as the 2D image it is); None for
        anything else.
    """
    sizes = [n for a, n in enumerate(shape) if a != channel_axis]
    if len(sizes) != 3 or sizes.count(1) != 1 or min(n for n in sizes if n != 1) < 2:
        return None
    return sizes.index(1)


def _drop_axis(value, k: int, ndim: int):
    """``value`` (None, a sequence of ``ndim`` per-axis values, or an array of ``ndim``
    dimensions) without its axis ``k``; anything else unchanged (a 2D one given for the
    single slice is taken as it is, a wrong one is refused by the 2D run's checks)."""
    if value is None:
        return None
    if hasattr(value, "__array__"):
        a = np.asarray(value)
        return np.squeeze(a, k) if a.ndim == ndim and a.shape[k] == 1 else a
    values = tuple(value)
    return tuple(v for i, v in enumerate(values) if i != k) if len(values) == ndim else values


#: Largest image, in pixels, that ``method="auto"`` gives the bundled decoder unasked, on
#: the input grid and on the decoder's (objects under the decoder's radius are upsampled);
#: larger ones take the classical pipeline, which tiles them (``tile_shape``).
AUTO_LEARNED_MAX_PIXELS = 8 * 2**20


#: Smallest side, in pixels, of an image that ``method="auto"`` gives the bundled decoder.
AUTO_LEARNED_MIN_SIDE = 16


def _why_not_bundled(x: np.ndarray, rgb: bool, intensity_range, **given) -> str | None:
    """Why ``method="auto"`` without a model does not try the bundled 2D nuclei decoder; None if it does.

    It was trained on single-channel 2D fluorescence images, so: a 2D image ``x`` (the
    normalised ``(C, Y, X)``) of one channel, or RGB(A) whose colour channels are equal (a
    grey image saved in colour, as the DSB 2018 PNGs are), of at least
    :data:`AUTO_LEARNED_MIN_SIDE` and at most :data:`AUTO_LEARNED_MAX_PIXELS` pixels, not a
    block of a larger image (``intensity_range`` given: blocks run as the caller chose), and
    none of the classical pipeline's own options ``given`` (``threshold``, ``tile_shape``,
    ``params``: the decoder has none of them, and a value the caller set must not be ignored).
    """
    if x.ndim != 3:
        return "a volume"
    if intensity_range is not None:
        return "a block of a larger image"
    named = [k for k, v in given.items() if v is not None]
    if named:
        return f"{', '.join(named)} given (the classical pipeline's)"
    if min(x.shape[1:]) < AUTO_LEARNED_MIN_SIDE:
        return f"an image under {AUTO_LEARNED_MIN_SIDE} pixels on a side"
    if x[0].size > AUTO_LEARNED_MAX_PIXELS:
        return f"an image over {AUTO_LEARNED_MAX_PIXELS / 2**20:g} MPix (tiled by the classical pipeline)"
    if x.shape[0] == 1:
        return None
    if not rgb:
        return f"{x.shape[0]} channels (the decoder takes one)"
    if _grey(x[:3]):
        return None
    return "a colour image (the decoder was trained on grey fluorescence)"


#: Largest difference between colour channels, as a fraction of the normalised range, at
#: which an RGB image still counts as grey (JPEG and a stray pixel leave small differences).
GREY_TOLERANCE = 0.02


def _grey(rgb: np.ndarray) -> bool:
    """Whether the normalised ``(3, Y, X)`` channels are equal within :data:`GREY_TOLERANCE`
    (the 1-99.8 % normalisation maps each channel's range to about [0, 1])."""
    with np.errstate(invalid="ignore"):
        spread = np.nanmax(np.abs(rgb - rgb[:1]), axis=0)
    return bool(np.nanpercentile(spread, 99.9) <= GREY_TOLERANCE) if np.isfinite(spread).any() else True


def _decoder_pixels(shape, radius_px, net) -> float:
    """Pixels of the grid the 2D decoder works on: ``shape`` resampled as
    :func:`~napari_mae.segmentation.learned.segment_plane` does (its first pass)."""
    from napari_mae.segmentation.learned import plane_scale

    scale = plane_scale(float(np.sqrt(np.prod(radius_px))), float(net.decoder_config.object_radius))
    return float(np.prod(shape)) * scale**2


def _is_bundled(model) -> bool:
    """``model`` is None (the bundled default) or the name of a bundled segmentation model."""
    from napari_mae._names import bundled_segmenter_path

    return model is None or (isinstance(model, str) and bundled_segmenter_path(model) is not None)


def _fallback_reason(extra: dict) -> str | None:
    """Why ``method="auto"`` drops the decoder's result for the classical one, or None to keep it.

    A 2D image whose decoder foreground is more ambiguous than
    :data:`~napari_mae.segmentation.learned.MAX_AMBIGUITY` is unlike the images the decoder
    was trained on.
    """
    from napari_mae.segmentation.learned import AMBIGUOUS_RANGE, MAX_AMBIGUITY

    a = extra.get("ambiguity")
    if a is None or not a > MAX_AMBIGUITY:
        return None
    lo, hi = AMBIGUOUS_RANGE
    return (
        f"the decoder was unsure: {a:.0%} of its foreground has a probability between {lo} and {hi} "
        f"(trusted up to {MAX_AMBIGUITY:.0%}), so the image is unlike those it was trained on; "
        "the classical pipeline ran instead"
    )


def _learned_model(model, required: bool):
    """The segmentation model for the learned method, or None to fall back to the classical one."""
    from napari_mae.segmentation.learned import cached_segmenter

    spec = "default-2d" if model is None else model
    _check_model_exists(spec)
    try:
        return cached_segmenter(spec)
    except Exception:
        if required:
            raise
        return None  # no bundled weights, or an MAE (not a segmentation) checkpoint


def _fits_dimensions(net, ndim: int, required: bool):
    """``net``, or None (the classical method) where a 3D model meets a 2D image under "auto".

    A 2D model segments images, and volumes from their planes; a 3D model only volumes.

    Raises
    ------
    ValueError
        ``method="learned"`` with a 3D model on a 2D image.
    """
    if net is None or int(getattr(net, "spatial_dims", 2)) <= ndim:
        return net
    if required:
        raise ValueError(
            f"model {getattr(net, 'source', 'model')!r} is a 3D segmentation model and the image is "
            f"{ndim}D; use a 2D model (default-2d) or method='classical'"
        )
    return None


def _check_model_exists(spec) -> None:
    """Refuse a model name that is neither a bundled or preset name nor an existing file.

    The one check of a mistyped ``model`` (a typo, a missing path) for every caller of
    :func:`segment_instances`: ``method="auto"`` would otherwise fall back to the classical
    method without a word. Model objects are not checked here.

    Raises
    ------
    FileNotFoundError
        If ``spec`` is a str or path naming no bundled model, preset or file.
    """
    import os
    from pathlib import Path

    from napari_mae._names import BUNDLED_MODELS, BUNDLED_SEGMENTERS, PRESET_NAMES, SEGMENTER_ALIASES

    if not isinstance(spec, (str, os.PathLike)):
        return
    names = {
        *BUNDLED_SEGMENTERS,
        *SEGMENTER_ALIASES,
        *BUNDLED_MODELS,
        *(n for v in PRESET_NAMES.values() for n in v),
    }
    if isinstance(spec, str) and spec in names:
        return
    if not Path(spec).exists():
        raise FileNotFoundError(
            f"model {str(spec)!r}: no such file, and not a model name; segmentation models: "
            f"{', '.join(sorted({*BUNDLED_SEGMENTERS, *SEGMENTER_ALIASES}))} or a checkpoint of "
            "napari-mae train --labels / finetune"
        )


def _learned_labels(img, net, sp, r, progress, planes=True):
    """Labels (uint32) of the learned method on the prepared image, and its info entries.

    ``planes``: let a volume's radius be re-estimated from its planes (False for a
    fine-tuned model, which keeps its fitted radius).
    """
    from napari_mae.segmentation.learned import segment_learned

    report(progress, 20, 100, "learned decoder")
    labels, extra = segment_learned(
        img, net, net.decoder_config.object_radius, spacing=sp, radius=r,
        progress=sub_progress(progress, 20, 97, 100), radius_from_planes=planes,
    )  # fmt: skip
    extra = dict(extra)
    extra["model"] = getattr(net, "source", "model")
    extra["threshold"] = float("nan")
    extra["working_shape"] = tuple(int(round(n * f)) for n, f in zip(img.shape, extra["scale"], strict=True))
    return labels.astype(np.uint32, copy=False), extra


def _check_scribbles(scribbles, shape) -> np.ndarray | None:
    """Scribbles as int64 of the image's spatial shape with both kinds of strokes, or None.

    The checks are :func:`napari_mae.segmentation.scribbles.check_scribbles` (shared with fine-tuning).
    """
    if scribbles is None:
        return None
    from napari_mae.segmentation.scribbles import check_scribbles

    return check_scribbles(scribbles, shape).astype(np.int64, copy=False)


def _feature_model(model, ndim: int):
    """The MAE of the scribble classifier's features, loaded, if it fits ``ndim``-D images.

    Raises
    ------
    ValueError
        If its spatial dimensions are not ``ndim``
        (:func:`~napari_mae.segmentation.features.model_features` needs them equal).
    """
    from napari_mae.models.mae import load_model

    net = model if hasattr(model, "encoder_features") else load_model(model)
    cfg = net.config
    sd = int(getattr(cfg, "spatial_dims", len(np.atleast_1d(cfg.img_size))))
    if sd != ndim:
        name = str(model) if isinstance(model, str) else getattr(cfg, "name", "model")
        raise ValueError(
            f"model {name!r} is a {sd}D MAE and the image is {ndim}D; "
            f"the scribble classifier's features need a {ndim}D model (default-{ndim}d) or none"
        )
    return net


def fixed_object_radius(object_radius: float | None, net=None) -> tuple[float, str] | None:
    """The object radius that no estimate may change, and where it came from; None: estimate it.

    The one statement of the radius priority of :func:`segment_instances` and fine-tuning
    (:func:`napari_mae.segmentation.finetune.finetune`, which trains at the radius
    inference will use): the given radius, else the one a fine-tuned model was trained at
    (:func:`napari_mae.models.decoder.fitted_radius`), else the caller estimates it
    (object strokes that disagree with the estimate win over it: ``"strokes"``, else
    ``"estimate"``).

    Parameters
    ----------
    object_radius : float or None
        The radius given by the user, in physical units.
    net : InstanceDecoder or None
        The segmentation model, if any; its ``fitted_radius`` attribute (physical units,
        or None) is used.

    Returns
    -------
    (float, str) or None
        ``(radius, "given")``, ``(radius, "model")``, or None when neither is known.
    """
    if object_radius is not None:
        return float(object_radius), "given"
    fitted = getattr(net, "fitted_radius", None) if net is not None else None
    return None if fitted is None else (float(fitted), "model")
