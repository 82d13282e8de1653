"""Fine-tuning a learned segmentation model on a user's own images, from strokes and corrections.

The decoder (:class:`napari_mae.models.decoder.InstanceDecoder`) is trained a little
further, through the objective-agnostic loop (:func:`napari_mae.training.loop.run`, so
Stop, time limits and atomic checkpoints are the loop's), on three sources of pixel
labels, weighted per pixel (a *partial-label* loss: pixels without a label add
nothing):

(a) **Scribbles** (the convention of :func:`napari_mae.segmentation.segment_instances`):
    0 = unlabelled, 1 = background, 2 (and above) = object. They set the foreground
    target where painted; a stroke says nothing about an object's extent, so the two
    distance maps get no loss there.
(b) **Corrected objects**: an instance-label array of the image's shape in which every
    non-zero id is one object the user painted or corrected *whole* (in napari: the
    objects of the Labels result that were edited, see the Segmentation widget). Inside
    each, all three targets are known (:func:`napari_mae.segmentation.targets.distance_targets`);
    a ring of :data:`RING_PX` pixels around each is background (the user says where it
    ends). Zero means "no statement", not background.
(c) **Pseudo-labels** (self-training; ``pseudo_source``: the model's, the classical
    pipeline's, or the classical ones where the model agrees): the previous model's confident predictions
    (foreground probability at least ``pseudo_confidence`` or at most
    ``1 - pseudo_confidence``) farther than ``pseudo_distance`` object radii from any
    user label, with the distances of the instances it found, at weight
    ``pseudo_weight``. They keep the model from forgetting what it did right away from
    the strokes. Where the strokes show the model wrong (fewer than
    :data:`AGREEMENT` of the background strokes predicted background), its foreground
    pseudo-labels are not used, and likewise its background ones when it misses the
    object strokes.

Priority where sources overlap: strokes, then corrected objects, then pseudo-labels.

**Scale**: training happens at the model's scale, as inference does
(:func:`napari_mae.segmentation.learned.segment_plane`): each image is resampled so that
its objects have the decoder's ``object_radius``; strokes and objects are resampled with
it. The object radius is the given one, else the fitted radius of a model fine-tuned
before, else the classical estimate
(:func:`napari_mae.segmentation.estimate_object_radius`; volumes too, not the untuned
decoder's re-estimate from planes), replaced by the object strokes' size where the strokes show that the
estimate found other things (the classical scribble mode's rule, e.g. a CT's body where
the bones are meant). The radius used (physical units; the median over the images) is
stored in the checkpoint (``extra["object_radius"]``, read by
:func:`napari_mae.models.decoder.fitted_radius`), and the learned method segments at it
with the fine-tuned model instead of estimating it per image, so inference runs at the
scale the model was trained at. **Volumes** are resampled to the isotropic grid of
:func:`napari_mae.segmentation.learned.predict_volume_maps`; strokes may be painted on
any plane, and the 2D model trains on the Z, Y and X planes of that grid that hold
labels (at most ``max_planes``, the most labelled first).

The encoder stays frozen (``encoder_blocks=0``) or its last ``encoder_blocks``
transformer blocks train at ``encoder_lr_scale`` times the rate; the learning rate is
constant (a time limit cuts any schedule short). Every ``eval_every`` steps the loss
on fixed crops of the labelled pixels is measured, and the best model so far is kept;
Stop or the end of the time (``seconds``) or step (``steps``) budget saves it, atomically,
as a normal segmentation checkpoint at ``out`` (``load_segmenter`` reads it with
``weights_only=True``). Nothing is saved before the first evaluation. The model
fine-tuned from is never written to.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_mae._names import PSEUDO_SOURCES
from napari_mae.preprocess import check_object_radius
from napari_mae.segmentation.scribbles import check_scribbles, check_stroke_classes, intensity_like
from napari_mae.training.loop import Objective, decay_groups

__all__ = [
    "AGREEMENT",
    "RING_PX",
    "FinetuneConfig",
    "FinetuneObjective",
    "FinetuneUpdate",
    "check_corrected_labels",
    "check_finetune_inputs",
    "finetune",
    "partial_segmentation_loss",
    "training_planes",
]

#: Background ring, in pixels at the model's scale, around each corrected object.
RING_PX = 2
#: Share of a class's stroke pixels the model must predict right for its pseudo-labels
#: of the other class to be used (see the module docstring).
AGREEMENT = 0.8
#: Largest id of a corrected-objects array (napari Labels may hold int64; the targets use int32).
MAX_LABEL_ID = 2**31 - 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of a fine-tuning run (frozen, validated).

    Parameters
    ----------
    seconds : float or None
        Wall-clock budget in seconds, preparation included; None: ``steps`` decides.
    steps : int or None
        Most optimiser steps; None: ``seconds`` decides. At least one of the two is set.
    lr : float
        Learning rate of the decoder (constant, AdamW).
    encoder_blocks : int
        Last transformer blocks of the encoder that train too (0: the encoder is frozen).
    encoder_lr_scale : float
        Their learning rate relative to ``lr``.
    crop_size : int
        Side of the training crops in pixels at the model's scale (a multiple of 16).
    batch_size : int
        Crops per step.
    eval_every : int
        Steps between evaluations of the loss on the labelled pixels (the best model is
        kept; nothing is saved before the first).
    pseudo_labels : bool
        Use pseudo-labels away from the strokes (source c).
    pseudo_source : {"model", "classical", "agreement"}
        Where they come from: the previous model's confident predictions (farther than
        ``pseudo_distance`` radii from any user label); the classical pipeline's
        segmentation with the same strokes (its scribble mode,
        :func:`napari_mae.segmentation.segment_instances` with ``method="classical"``):
        every pixel the user did not label, except a one-pixel band on its objects'
        outlines, its objects with all three targets; or ``"agreement"``: those classical
        labels only where the previous model confidently says the same (foreground
        probability at least ``pseudo_confidence``, or at most one minus it), as in
        co-training's agreement filter.
    pseudo_confidence : float
        Foreground probability (or one minus it) from which a prediction is confident, in (0.5, 1).
    pseudo_distance : float
        Least distance of a pseudo-label from any user label, in object radii.
    pseudo_weight : float
        Loss weight of a pseudo-labelled pixel (a user label weighs 1).
    bce_weight : float
        Weight of the partial binary cross-entropy beside the partial Dice.
    max_planes : int
        Volumes: the most labelled planes trained on.
    live_every_s : float
        Seconds between live labels of the first image in the updates (2D only; 0: never).
    seed : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.

    Raises
    ------
    ValueError
        Naming the first bad setting.
    """

    seconds: float | None = 60.0
    steps: int | None = None
    lr: float = 1e-3
    encoder_blocks: int = 0
    encoder_lr_scale: float = 0.1
    crop_size: int = 128
    batch_size: int = 4
    eval_every: int = 20
    pseudo_labels: bool = True
    pseudo_source: str = "model"
    pseudo_confidence: float = 0.9
    pseudo_distance: float = 3.0
    pseudo_weight: float = 0.5
    bce_weight: float = 1.0
    max_planes: int = 16
    live_every_s: float = 15.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.seconds is None and self.steps is None:
            raise ValueError("give a time budget (seconds) or a number of steps, or both")
        checks = [
            (self.seconds is None or (self.seconds > 0 and math.isfinite(self.seconds)), "seconds", "> 0"),
            (self.steps is None or (_is_int(self.steps) and self.steps >= 1), "steps", "a positive integer"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "> 0"),
            (_is_int(self.encoder_blocks) and self.encoder_blocks >= 0, "encoder_blocks", "an integer >= 0"),
            (0.0 < self.encoder_lr_scale <= 1.0, "encoder_lr_scale", "in (0, 1]"),
            (_is_int(self.crop_size) and self.crop_size >= 32 and self.crop_size % 16 == 0, "crop_size",
             "a multiple of 16, at least 32"),
            (_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "a positive integer"),
            (_is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "a positive integer"),
            (self.pseudo_source in PSEUDO_SOURCES, "pseudo_source", f"one of {PSEUDO_SOURCES}"),
            (0.5 < self.pseudo_confidence < 1.0, "pseudo_confidence", "in (0.5, 1)"),
            (self.pseudo_distance >= 0, "pseudo_distance", ">= 0"),
            (0.0 <= self.pseudo_weight <= 1.0, "pseudo_weight", "in [0, 1]"),
            (self.bce_weight >= 0, "bce_weight", ">= 0"),
            (_is_int(self.max_planes) and self.max_planes >= 1, "max_planes", "a positive integer"),
            (self.live_every_s >= 0, "live_every_s", ">= 0"),
        ]  # fmt: skip
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_encoder(self, depth: int) -> None:
        """Check ``encoder_blocks`` against the depth of the model's encoder.

        Raises
        ------
        ValueError
            If ``encoder_blocks`` is more than the encoder's ``depth`` transformer blocks.
        """
        if self.encoder_blocks > depth:
            raise ValueError(
                f"encoder_blocks={self.encoder_blocks} is more than the {depth} transformer blocks of "
                f"the model's encoder; give 0 to {depth}"
            )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class FinetuneUpdate:
    """One report of :func:`finetune`.

    Attributes
    ----------
    kind : str
        ``"start"`` (preparing), ``"prepared"`` (what is trained on), ``"step"``,
        ``"evaluated"`` (after each evaluation), then one of
        ``"finished"`` (budget used up), ``"stopped"`` (Stop), ``"failed"`` (non-finite loss).
    step : int
        Optimiser steps done.
    elapsed_s : float
        Seconds since :func:`finetune` started.
    loss : float or None
        The step's training loss (``"step"``), the mean of the last epoch otherwise.
    val_loss : float or None
        Loss on the fixed labelled crops (``"evaluated"``, and the best at the end).
    best_step : int or None
        Step of the best model so far.
    labels : ndarray of int32 or None
        Current instance labels of the first image, its spatial shape (2D, every
        ``live_every_s`` seconds, on ``"evaluated"`` updates).
    checkpoint : Path or None
        The saved model (final updates only; None when nothing was saved).
    message : str
    """

    kind: str
    step: int = 0
    elapsed_s: float = 0.0
    loss: float | None = None
    val_loss: float | None = None
    best_step: int | None = None
    labels: np.ndarray | None = None
    checkpoint: Path | None = None
    message: str = ""


# ----------------------------------------------------------------------------- inputs


def _as_list(x, n: int | None, what: str) -> list:
    if x is None:
        return [None] * (n or 0)
    if isinstance(x, np.ndarray) or not isinstance(x, Sequence):
        x = [x]
    x = list(x)
    if n is not None and len(x) != n:
        raise ValueError(f"{len(x)} {what} for {n} images: give one per image")
    return x


def _spatial_shape(image: np.ndarray, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(image.shape)
    shape = list(image.shape)
    del shape[channel_axis]
    return tuple(shape)


def check_corrected_labels(corrected, shape, *, name: str = "corrected objects", image: str = "the image"):
    """The one check of a corrected-objects array (``finetune --labels``, the widget's layer).

    Parameters
    ----------
    corrected : array-like of int, shape ``shape``
        Instance ids of objects corrected or painted whole, 0 = no statement.
    shape : tuple of int
        The image's spatial shape, ``([Z,] Y, X)``.
    name, image : str
        How the messages name the array and its image.

    Returns
    -------
    ndarray of the input's integer dtype, shape ``shape``

    Raises
    ------
    ValueError
        Another shape than ``shape``; a dtype that is not integer; negative ids; no 0
        pixel (every pixel labelled: instance labels keep 0 where there is no corrected
        object); ids of 2**31 and above; an intensity image
        (:func:`~napari_mae.segmentation.scribbles.intensity_like`).
    """
    c = np.asarray(corrected)
    shape = tuple(int(n) for n in shape)
    if c.shape != shape:
        raise ValueError(f"{name} have shape {c.shape}, but {image} has {shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{name} must be integer instance ids, not {c.dtype}")
    if c.size and c.min() < 0:
        raise ValueError(f"{name} hold negative ids")
    if c.size and c.min() > 0:
        # instance labels keep 0 for what is not an object; an intensity image has none
        raise ValueError(
            f"{name} label every pixel (values {int(c.min())}..{int(c.max())}, no 0): "
            "give instance labels, 0 where there is no corrected object (an image given as labels?)"
        )
    if c.size and int(c.max()) > MAX_LABEL_ID:
        raise ValueError(
            f"{name} hold ids above 2**31 (largest {int(c.max())}); relabel them "
            "(e.g. skimage.segmentation.relabel_sequential)"
        )
    why = intensity_like(c)
    if why is not None:
        raise ValueError(
            f"{name} look like an intensity image, not instance labels: {why}; give instance labels, "
            "0 where there is no corrected object"
        )
    return c


def check_finetune_inputs(images, scribbles, corrected=None, *, channel_axis=None):
    """Check the arrays of a fine-tuning run; return them as lists of arrays.

    Parameters
    ----------
    images : ndarray or sequence of ndarray, each ``([Z,] Y, X)`` (or with ``channel_axis``)
    scribbles : ndarray or sequence of ndarray of int, each the image's spatial shape
        0 = unlabelled, 1 = background, 2 and above = object.
    corrected : None, ndarray or sequence of (ndarray or None)
        Corrected objects per image (instance ids, 0 = no statement), the image's spatial shape.
    channel_axis : int or None

    Returns
    -------
    images, scribbles, corrected : lists (``corrected`` entries may be None)

    Raises
    ------
    ValueError
        Another count of scribbles or corrected arrays than images; scribbles or
        corrected objects of another shape than their image; non-integer or negative
        values; an intensity image given as scribbles
        (:func:`~napari_mae.segmentation.scribbles.check_scribbles`) or as corrected objects
        (:func:`check_corrected_labels`); ids of 2**31 and above in the corrected objects; no object label
        (stroke 2 or corrected object) or no background label (stroke 1 or the ring of a
        corrected object) in all the images together (the message says which is missing).
    """
    imgs = [np.asarray(im) for im in _as_list(images, None, "images")]
    if not imgs:
        raise ValueError("no image to fine-tune on")
    scrib = _as_list(scribbles, len(imgs), "scribble arrays")
    corr = _as_list(corrected, len(imgs), "corrected-object arrays")
    has_object = has_background = False
    out_s, out_c = [], []
    for i, (im, s, c) in enumerate(zip(imgs, scrib, corr, strict=True)):
        shape = _spatial_shape(im, channel_axis)
        if len(shape) not in (2, 3):
            raise ValueError(f"image {i} has {len(shape)} spatial dimensions (shape {im.shape}); need 2 or 3")
        if s is None:
            s = np.zeros(shape, np.uint8)
        s = check_scribbles(s, shape, name=f"scribbles {i}", require_both=False)
        has_object |= bool((s >= 2).any())
        has_background |= bool((s == 1).any())
        if c is not None:
            c = check_corrected_labels(c, shape, name=f"corrected objects {i}", image=f"image {i}")
            if c.any():
                has_object = has_background = True  # its inside and its ring
            else:
                c = None
        out_s.append(s)
        out_c.append(c)
    check_stroke_classes(has_background, has_object, name="the scribbles (of all images together)")
    return imgs, out_s, out_c


# ----------------------------------------------------------------------------- planes


def _resize_strokes(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Strokes on another grid: each class's coverage, linearly resampled, kept above 1/4.

    Nearest-neighbour resampling drops one-pixel strokes when shrinking; this keeps them.
    """
    if s.shape == tuple(shape):
        return s
    from skimage.transform import resize

    out = np.zeros(shape, np.uint8)
    masks = []
    for v in (1, 2):
        m = s >= 2 if v == 2 else s == 1
        masks.append(
            resize(m.astype(np.float32), shape, order=1, anti_aliasing=False) > 0.25 if m.any() else None
        )
    bg, obj = masks
    if bg is not None:
        out[bg] = 1
    if obj is not None:
        out[obj] = 2
        if bg is not None:
            out[obj & bg] = 0  # both: no statement
    return out


def _resize_labels(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if lab.shape == tuple(shape):
        return lab
    from skimage.transform import resize

    return resize(lab, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)


@dataclass
class _Plane:
    """One 2D training plane at the model's scale."""

    image: np.ndarray  # (H, W) float32
    strokes: np.ndarray  # (H, W) uint8, 0 / 1 / 2
    corrected: np.ndarray | None  # (H, W) int32
    invalid: np.ndarray | None  # (H, W) bool
    source: tuple  # (image index, axis or None, plane index)
    teacher: np.ndarray | None = None  # (H, W) int32: the classical pipeline's labels


@dataclass
class _Prepared:
    images: list  # prepared images at the input grid
    work: list  # images at the model's scale
    factors: list  # per image: per-axis factor (work / input)
    radii: list  # per image: object radius used (physical)
    planes: list
    sources: list = dataclasses.field(default_factory=list)  # per image: where the radius came from


def _prepare(net, images, scribbles, corrected, spacings, channel_axis, object_radius, cfg, check):
    """Images at the model's scale and their labelled planes (volumes: Z, Y and X planes)."""
    from napari_mae.segmentation.learned import (
        _clip_scale,
        decoder_input,
        isotropic_factor,
        prepare_image,
        rescaled,
    )
    from napari_mae.segmentation.segment import fixed_object_radius

    r_ref = float(net.decoder_config.object_radius)
    prep = _Prepared([], [], [], [], [])
    # The radius as inference with the fine-tuned model will take it (segment_instances):
    # the given one, else the model's own fitted radius (a model fine-tuned before), else
    # the classical estimate (see _estimated_radius), which the fine-tuned model keeps.
    fixed = fixed_object_radius(object_radius, net)
    for i, (im, s, c) in enumerate(zip(images, scribbles, corrected, strict=True)):
        check()
        img, info = prepare_image(im, channel_axis=channel_axis)
        sp = np.asarray(spacings[i], float)
        if fixed is not None:
            radius, source = fixed
        else:
            radius, source = _estimated_radius(img, s, sp)
        if img.ndim == 2:
            r_px = radius / float(np.sqrt(sp[0] * sp[1]))
            scale = _clip_scale(r_ref / max(r_px, 1e-3))
            factor = (scale, scale)
        else:
            factor = isotropic_factor(sp, radius, r_ref)
        # the radius was estimated on the prepared image, as inference does; the decoder
        # sees it rescaled as inference's (segment_instances)
        work = rescaled(
            decoder_input(img, invalid=info["invalid"], inverted=not info["bright_objects"]), factor
        )
        factor = tuple(w / n for w, n in zip(work.shape, img.shape, strict=True))
        ws = _resize_strokes(s, work.shape)
        wc = None if c is None else _resize_labels(c.astype(np.int32), work.shape)
        inv = info["invalid"]
        wi = _resize_labels(inv.astype(np.int32), work.shape).astype(bool) if inv.any() else None
        wt = None
        if cfg.pseudo_labels and cfg.pseudo_weight > 0 and cfg.pseudo_source != "model":
            wt = _resize_labels(_classical_labels(im, s, sp, channel_axis), work.shape)
        prep.images.append(img)
        prep.work.append(work)
        prep.factors.append(factor)
        prep.radii.append(radius)
        prep.sources.append(source)
        if work.ndim == 2:
            if ws.any() or (wc is not None and wc.any()):  # an image without labels teaches nothing
                prep.planes.append(_Plane(work, ws, wc, wi, (i, None, 0), wt))
            continue
        candidates = []
        for axis in range(3):
            s_ax = np.moveaxis(ws, axis, 0)
            c_ax = None if wc is None else np.moveaxis(wc, axis, 0)
            counts = np.count_nonzero(s_ax.reshape(s_ax.shape[0], -1), axis=1)
            if c_ax is not None:
                counts = counts + np.count_nonzero(c_ax.reshape(c_ax.shape[0], -1), axis=1)
            for k in np.flatnonzero(counts):
                candidates.append((
                    float(counts[k]),
                    _Plane(
                        np.ascontiguousarray(np.moveaxis(work, axis, 0)[k]),
                        np.ascontiguousarray(s_ax[k]),
                        None if c_ax is None else np.ascontiguousarray(c_ax[k]),
                        None if wi is None else np.ascontiguousarray(np.moveaxis(wi, axis, 0)[k]),
                        (i, axis, int(k)),
                        None if wt is None else np.ascontiguousarray(np.moveaxis(wt, axis, 0)[k]),
                    ),
                ))  # fmt: skip
        candidates.sort(key=lambda c: -c[0])  # the most labelled planes of this volume
        prep.planes.extend(p for _, p in candidates[: cfg.max_planes])
    if not prep.planes:
        raise ValueError("no stroke is left at the model's scale; paint longer strokes")
    return prep


def _classical_labels(image, strokes, spacing, channel_axis) -> np.ndarray:
    """The classical pipeline's labels of an image with the user's strokes (its scribble
    mode, its own radius estimate and preparation): the pseudo-labels of
    ``pseudo_source="classical"``."""
    from napari_mae.segmentation import segment_instances

    labels, _ = segment_instances(
        image, method="classical", scribbles=strokes, spacing=tuple(spacing), channel_axis=channel_axis
    )
    return np.asarray(labels).astype(np.int32)


def _estimated_radius(img, strokes, sp) -> tuple[float, str]:
    """An image's object radius (physical) without a given one, and where it came from.

    The classical estimate (:func:`~napari_mae.segmentation.estimate_object_radius`), unless
    the object strokes say it found other things than the user's objects: the classical
    scribble mode's rule
    (:func:`napari_mae.segmentation.classical.segment_classical`): object strokes far
    shorter than the estimated diameter, lying in automatic objects that background
    strokes cross too (a CT: the body found, the bones meant). Then the strokes' size
    (half their median length) is the radius: ``"strokes"``; else ``"estimate"``.

    Volumes too take the classical estimate, not the untuned decoder's re-estimate from a
    few planes that inference uses: fine-tuning is for data the decoder gets wrong, and
    there its planes' estimate is wrong with it (on a blurred nuclei volume the decoder
    merged nuclei and its estimate came out 1.4x the labels' radius; fine-tuned at it,
    acc@0.5 stayed near 0.1, at the classical estimate it reached 0.5-0.6).
    """
    from napari_mae.segmentation import estimate_object_radius
    from napari_mae.segmentation.classical import _stroke_radius, _strokes_disagree

    estimate = float(estimate_object_radius(img, sp)["radius"])
    r_strokes = _stroke_radius(strokes, sp)
    if 0 < r_strokes < 0.5 * estimate and _strokes_disagree(img, strokes, estimate, sp):
        return max(r_strokes, float(sp.min())), "strokes"
    return estimate, "estimate"


def training_planes(net, prep: _Prepared, cfg: FinetuneConfig, check=lambda: None) -> list[dict]:
    """Targets and per-pixel weights of every plane (sources a, b, c; see the module docstring).

    Returns
    -------
    list of dict
        ``image`` (1, H, W) float32; ``target`` (3, H, W) float32 (foreground, centre and
        boundary distance); ``weight`` (2, H, W) float32 (of the foreground terms, of the
        distance terms); ``user`` (1, H, W) float32, 1 where the user labelled; ``source``.
    """
    import torch
    from skimage.segmentation import find_boundaries

    from napari_mae.models.mae import amp_dtype
    from napari_mae.segmentation.learned import LearnedParams, instances_from_maps, predict_maps
    from napari_mae.segmentation.targets import distance_targets

    r_ref = float(net.decoder_config.object_radius)
    bf16 = amp_dtype(next(net.parameters()).device, cpu_bf16=True) == torch.bfloat16
    out, preds = [], []
    agree = {1: [0, 0], 2: [0, 0]}  # per stroke class: pixels predicted right, pixels
    for pl in prep.planes:
        check()
        shape = pl.image.shape
        target = np.ones((3,) + shape, np.float32)
        target[0] = 0.0
        weight = np.zeros((2,) + shape, np.float32)
        user = pl.strokes > 0
        if pl.corrected is not None and pl.corrected.any():
            inside = pl.corrected > 0
            ring = ndi.binary_dilation(inside, iterations=RING_PX) & ~inside
            target[:, inside] = distance_targets(pl.corrected)[:, inside]
            weight[:, inside] = 1.0
            weight[0, ring] = 1.0
            user = user | inside | ring
        bg, obj = pl.strokes == 1, pl.strokes >= 2
        target[0, bg], target[0, obj] = 0.0, 1.0
        weight[0, bg | obj] = 1.0
        weight[1, bg] = 0.0  # a background stroke inside a corrected object wins
        pred = None
        if cfg.pseudo_labels and cfg.pseudo_weight > 0:
            if pl.teacher is not None:
                # The classical labels: certain except on their outlines (a pixel either
                # side), which are where the two pipelines' boundaries differ.
                inst, maps = pl.teacher, None
                p = np.where(find_boundaries(inst, mode="thick"), 0.5, (inst > 0).astype(np.float32))
                far = ~user
                if cfg.pseudo_source == "agreement":  # only where the model says so too, confidently
                    q = predict_maps(net, pl.image, bf16=bf16)[0]
                    conf = float(cfg.pseudo_confidence)
                    p = np.where((p == 1) & (q >= conf), 1.0, np.where((p == 0) & (q <= 1 - conf), 0.0, 0.5))
            else:
                maps = predict_maps(net, pl.image, bf16=bf16)
                p, inst = maps[0], None
                far = ndi.distance_transform_edt(~user) > cfg.pseudo_distance * r_ref if user.any() else None
            for v, m, right in ((1, bg, p < 0.5), (2, obj, p >= 0.5)):
                agree[v][0] += int(np.count_nonzero(right & m))
                agree[v][1] += int(np.count_nonzero(m))
            pred = (p, inst, maps, far)
        preds.append(pred)
        out.append({
            "image": pl.image[None].astype(np.float32),
            "target": target,
            "weight": weight,
            "user": user[None].astype(np.float32),
            "source": pl.source,
        })  # fmt: skip
    # Pseudo-labels of a class only where the strokes show the model right about the other.
    use_fg = agree[1][1] == 0 or agree[1][0] >= AGREEMENT * agree[1][1]
    use_bg = agree[2][1] == 0 or agree[2][0] >= AGREEMENT * agree[2][1]
    pw, conf = float(cfg.pseudo_weight), float(cfg.pseudo_confidence)
    for item, pred in zip(out, preds, strict=True):
        if pred is None or pred[3] is None:
            continue
        check()
        p, inst, maps, far = pred
        free = far & (item["weight"][0] == 0)
        if use_bg:
            sel = free & (p <= 1.0 - conf)
            item["target"][0, sel] = 0.0
            item["weight"][0, sel] = pw
        if use_fg:
            if inst is None:
                inst = instances_from_maps(maps, LearnedParams())
            sel = free & (p >= conf) & (inst > 0)
            if sel.any():
                t = distance_targets(inst)
                item["target"][:, sel] = t[:, sel]
                item["weight"][:, sel] = pw
    for item, pl in zip(out, prep.planes, strict=True):
        if pl.invalid is not None:  # non-finite pixels: no loss
            item["weight"][:, pl.invalid] = 0.0
            item["user"][0, pl.invalid] = 0.0
        item["pseudo"] = {"foreground": use_fg, "background": use_bg}
    return out


# ----------------------------------------------------------------------------- loss


def partial_segmentation_loss(y, target, weight, *, bce_weight: float = 1.0):
    """Partial-label Dice + cross-entropy on the foreground, MSE of the distances; only where labelled.

    Parameters
    ----------
    y : Tensor, shape (B, 3, *spatial)
        Decoder output: foreground logit, centre and boundary distance (sigmoid).
    target : Tensor, shape (B, 3, *spatial)
        Foreground (0/1) and the two distances (where known).
    weight : Tensor, shape (B, 2, *spatial)
        Per-pixel weights of the foreground terms and of the distance terms; 0 = unlabelled.
    bce_weight : float
        Weight of the binary cross-entropy, averaged over the labelled pixels (partial
        cross-entropy, as in scribble-supervised segmentation: Tang et al., *Normalized
        Cut Loss for Weakly-supervised CNN Segmentation*, CVPR 2018).

    Returns
    -------
    Tensor, scalar. With all weights 1 and ``bce_weight=0`` it equals
    :func:`napari_mae.training.segmentation.segmentation_loss`.
    """
    import torch
    import torch.nn.functional as F

    logit = y[:, 0].float()
    p = torch.sigmoid(logit)
    fg, w = target[:, 0], weight[:, 0]
    dice = 1.0 - (2.0 * (w * p * fg).sum() + 1.0) / ((w * p).sum() + (w * fg).sum() + 1.0)
    loss = dice
    if bce_weight:
        bce = F.binary_cross_entropy_with_logits(logit, fg, reduction="none")
        loss = loss + bce_weight * (w * bce).sum() / w.sum().clamp_min(1.0)
    wd = weight[:, 1] * (fg > 0.5).float()
    dist = y[:, 1:].float() - target[:, 1:]
    mse = ((dist**2).sum(dim=1) * wd).sum() / wd.sum().clamp_min(1.0)
    return loss + mse


# ----------------------------------------------------------------------------- objective


class _Crops:
    """Random crops of the planes around labelled pixels, augmented.

    MONAI's ``RandCropByPosNegLabeld`` picks the crops (centred on a user label 3 times
    in 4, elsewhere otherwise), from indices computed once per plane (``FgBgToIndicesd``).
    Flips, rot90, intensity scaling and noise are plain numpy here: MONAI's dict versions
    cost about 15 ms a crop in MetaTensor bookkeeping, a third of a CPU training step.
    """

    KEYS = ("image", "target", "weight", "user")

    def __init__(self, planes: list[dict], crop: int, length: int, seed: int):
        from monai.transforms import FgBgToIndicesd, RandCropByPosNegLabeld

        to_indices = FgBgToIndicesd("user")
        self.planes = [to_indices({k: q[k] for k in self.KEYS}) for q in (_pad_to(p, crop) for p in planes)]
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        # Planes are drawn by how much the user labelled on them (and a little by pseudo-labels).
        counts = np.array([p["user"].sum() + 1e-3 * (p["weight"][0] > 0).sum() for p in self.planes], float)
        self.p = counts / counts.sum() if counts.sum() > 0 else None
        self.crop = RandCropByPosNegLabeld(
            list(self.KEYS),
            label_key="user",
            spatial_size=(crop, crop),
            pos=3,
            neg=1,
            num_samples=1,
            fg_indices_key="user_fg_indices",
            bg_indices_key="user_bg_indices",
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        from napari_mae.training.files import sample_seed

        seed = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(seed)
        plane = self.planes[int(rng.choice(len(self.planes), p=self.p))]
        self.crop.set_random_state(seed=seed % (2**32))
        item = self.crop(dict(plane))[0]
        out = {k: np.asarray(item[k], np.float32) for k in ("image", "target", "weight")}
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        for key, a in out.items():
            a = np.rot90(a, k, axes=(1, 2))
            out[key] = np.ascontiguousarray(a[:, :, ::-1] if flip else a)
        if rng.random() < 0.5:
            out["image"] = out["image"] * np.float32(1.0 + rng.uniform(-0.2, 0.2))
        if rng.random() < 0.2:
            out["image"] = out["image"] + rng.normal(0, 0.03, out["image"].shape).astype(np.float32)
        return out


def _pad_to(plane: dict, crop: int) -> dict:
    """A plane padded (image: reflect; labels: weight 0) to at least ``crop`` and a multiple of 16."""
    h, w = plane["image"].shape[1:]
    ph, pw = max(crop, -(-h // 16) * 16) - h, max(crop, -(-w // 16) * 16) - w
    if not (ph or pw):
        return plane
    pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    out = dict(plane)
    out["image"] = np.pad(plane["image"], pads, mode="symmetric")
    out["target"] = np.pad(plane["target"], pads, constant_values=1.0)
    out["target"][0] = np.pad(plane["target"][0], pads[1:], constant_values=0.0)
    out["weight"] = np.pad(plane["weight"], pads)
    out["user"] = np.pad(plane["user"], pads)
    return out


def _val_tiles(planes: list[dict], crop: int, n_max: int = 8) -> list[dict]:
    """Fixed crops holding the most user labels (the evaluation of the best model)."""
    tiles = []
    for p in planes:
        q = _pad_to(p, crop)
        h, w = q["image"].shape[1:]
        for y0 in sorted({*range(0, h - crop + 1, crop), h - crop}):
            for x0 in sorted({*range(0, w - crop + 1, crop), w - crop}):
                sl = (slice(None), slice(y0, y0 + crop), slice(x0, x0 + crop))
                n = float(q["user"][sl].sum())
                if n > 0:
                    tiles.append(
                        (n, {k: np.ascontiguousarray(q[k][sl]) for k in ("image", "target", "weight")})
                    )
    tiles.sort(key=lambda t: -t[0])
    return [t for _, t in tiles[:n_max]]


class FinetuneObjective(Objective):
    """Fine-tuning on prepared planes (:func:`training_planes`) for :func:`napari_mae.training.loop.run`.

    The partial-label loss (:func:`partial_segmentation_loss`) on random crops around the
    labels; ``best.pt`` by the same loss on fixed crops holding the most user labels.
    """

    metric = "val_loss"
    higher_is_better = False
    metrics = ("val_loss",)
    metric_labels = {"val_loss": "loss on the labelled crops"}
    ddp_static_graph = False
    ddp_find_unused_parameters = True

    def __init__(self, net, planes, cfg: FinetuneConfig, description: str, extra: dict):
        self.net, self.planes, self.cfg = net, planes, cfg
        self._description = description
        self._extra = extra

    def setup(self, ctx) -> None:
        import torch

        from napari_mae.models.mae import amp_dtype

        cfg, net = self.cfg, self.net
        n_blocks = int(net.encoder.depth)
        k = min(int(cfg.encoder_blocks), n_blocks)
        for p in net.encoder.parameters():
            p.requires_grad_(False)
        if k:
            # blocks[:depth] are the transformer blocks, blocks[depth] the final LayerNorm
            for block in list(net.encoder.blocks)[n_blocks - k :]:
                for p in block.parameters():
                    p.requires_grad_(True)
        net.freeze_encoder = k == 0
        self.model = net.to(ctx.device).train()
        self.train_data = _Crops(self.planes, cfg.crop_size, cfg.eval_every * cfg.batch_size, ctx.seed)
        self.val_data = _val_tiles(self.planes, cfg.crop_size)
        self.bf16 = amp_dtype(ctx.device, cpu_bf16=True) == torch.bfloat16

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        enc = {id(p) for p in self.model.encoder.parameters()}
        groups = []
        for group in decay_groups(self.model, weight_decay):
            d = [p for p in group["params"] if id(p) not in enc]
            e = [p for p in group["params"] if id(p) in enc]
            if d:
                groups.append({**group, "params": d})
            if e:
                groups.append({**group, "params": e, "lr": self.cfg.lr * self.cfg.encoder_lr_scale})
        return groups

    def _forward(self, net, x, device):
        import torch

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return net(x)

    def training_step(self, batch, ctx):
        x = batch["image"].to(ctx.device)
        y = self._forward(ctx.net, x, ctx.device)
        return partial_segmentation_loss(
            y, batch["target"].to(ctx.device), batch["weight"].to(ctx.device), bce_weight=self.cfg.bce_weight
        )

    def validation_step(self, batch, ctx) -> dict:
        y = self._forward(self.model, batch["image"].to(ctx.device), ctx.device)
        loss = partial_segmentation_loss(
            y, batch["target"].to(ctx.device), batch["weight"].to(ctx.device), bce_weight=self.cfg.bce_weight
        )
        return {"val_loss": float(loss), "n": int(batch["image"].shape[0])}

    def checkpoint_extras(self) -> dict:
        return {"normalization": dict(self.model.normalization), "extra": dict(self._extra)}

    def describe(self) -> str:
        return self._description

    def config_json(self) -> dict:
        return {"task": "finetune", **self.cfg.to_dict()}


# ----------------------------------------------------------------------------- entry point


def _spacings(spacing, images, channel_axis) -> list:
    ndims = [len(_spatial_shape(im, channel_axis)) for im in images]
    if spacing is None:
        return [(1.0,) * n for n in ndims]
    first = spacing[0] if len(spacing) else None
    per_image = isinstance(first, (Sequence, np.ndarray)) or first is None
    sps = list(spacing) if per_image else [tuple(spacing)] * len(images)
    if len(sps) != len(images):
        raise ValueError(f"{len(sps)} spacings for {len(images)} images")
    out = []
    for i, (sp, n) in enumerate(zip(sps, ndims, strict=True)):
        sp = (1.0,) * n if sp is None else tuple(float(v) for v in sp)
        if len(sp) != n or not all(math.isfinite(v) and v > 0 for v in sp):
            raise ValueError(f"spacing of image {i} must be {n} positive numbers, got {sp}")
        out.append(sp)
    return out


def _load_net(model):
    """A fresh, trainable copy of the segmentation model (never the cached one) and its name."""
    from napari_mae.models.decoder import InstanceDecoder, load_segmenter

    if isinstance(model, InstanceDecoder):
        net = copy.deepcopy(model)
        return net, getattr(model, "source", "model"), None
    from napari_mae._names import bundled_segmenter_path

    path = bundled_segmenter_path(model) if isinstance(model, str) else None
    path = Path(model) if path is None else path
    net = load_segmenter(model)
    if net.spatial_dims != 2:
        raise ValueError(f"fine-tuning trains a 2D segmentation model; {model} is {net.spatial_dims}D")
    return net, str(model), path


def finetune(
    images,
    scribbles,
    *,
    out: str | os.PathLike,
    model: Any = "default-2d",
    corrected=None,
    spacing=None,
    channel_axis: int | None = None,
    object_radius: float | None = None,
    config: FinetuneConfig | None = None,
    stop: Any = None,
    overwrite: bool = False,
) -> Iterator[FinetuneUpdate]:
    """Fine-tune a segmentation model on images with scribbles (and corrected objects).

    A generator: iterate it to run; it yields :class:`FinetuneUpdate` records (start,
    steps, evaluations, then one final update) and saves the best model to ``out``.

    Parameters
    ----------
    images : ndarray or sequence of ndarray, each ``([Z,] Y, X)`` (or with ``channel_axis``)
        Any real dtype; prepared as inference prepares them (normalised, bright objects).
    scribbles : ndarray or sequence of ndarray of int, each the image's spatial shape
        0 = unlabelled, 1 = background, 2 and above = object.
    out : path
        The fine-tuned model (``.pt``); written atomically, only once a model was evaluated.
    model : str, path or InstanceDecoder
        The 2D segmentation model to start from (``"default-2d"`` or a checkpoint); it is
        never written to.
    corrected : None, ndarray or sequence of (ndarray or None)
        Objects corrected or painted whole, per image (see the module docstring).
    spacing : sequence of float, or one per image, optional
        Physical pixel size per spatial axis; default 1.
    channel_axis : int or None
    object_radius : float or None
        Object radius in physical units; when None, the model's fitted radius or the
        estimate per image (see the module docstring). Stored in the fine-tuned model.
    config : FinetuneConfig, optional
    stop : threading.Event or callable, optional
        Checked between preparation stages and before every step; the best model so far
        is saved (nothing if none was evaluated yet; the final update says so).
    overwrite : bool
        Replace an existing ``out``.

    Yields
    ------
    FinetuneUpdate

    Raises
    ------
    ValueError
        Bad inputs (see :func:`check_finetune_inputs`), bad spacing, ``out`` not a
        ``.pt`` file or the model itself, a model that is not a 2D segmentation model
        (``CheckpointError``), ``config.encoder_blocks`` above the encoder's depth
        (:meth:`FinetuneConfig.check_encoder`), before anything is written.
    FileExistsError
        ``out`` exists and ``overwrite`` is False.
    FileNotFoundError
        The model file does not exist.
    """
    from napari_mae._progress import Cancelled

    t0 = time.perf_counter()
    cfg = config or FinetuneConfig()
    out = Path(out)
    if out.suffix.lower() not in (".pt", ".pth"):
        raise ValueError(f"out {out}: the fine-tuned model is a checkpoint; use a name ending in .pt")
    imgs, scrib, corr = check_finetune_inputs(images, scribbles, corrected, channel_axis=channel_axis)
    sps = _spacings(spacing, imgs, channel_axis)
    shapes = [_spatial_shape(im, channel_axis) for im in imgs]
    if len({len(sh) for sh in shapes}) > 1:
        # one model keeps one radius (its checkpoint's); a pixel image's and a calibrated
        # volume's radii are in different units, and their median fits neither
        raise ValueError("fine-tune on images of one kind, 2D images or volumes, not both in one run")
    for sh, sp in zip(shapes, sps, strict=True):
        check_object_radius(object_radius, sh, sp)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another name, or overwrite it (--overwrite)")
    net, source, source_path = _load_net(model)
    cfg.check_encoder(int(net.encoder.depth))
    if source_path is not None and out.resolve() == source_path.resolve():
        raise ValueError(f"out {out} is the model being fine-tuned; write the new model to another file")

    def check() -> None:
        if stop is not None and (stop.is_set() if hasattr(stop, "is_set") else stop()):
            raise Cancelled("stopped")

    nothing = "nothing was saved; the previous model is unchanged"
    try:
        check()
        yield FinetuneUpdate("start", elapsed_s=time.perf_counter() - t0, message="preparing the images")
        prep = _prepare(net, imgs, scrib, corr, sps, channel_axis, object_radius, cfg, check)
        planes = training_planes(net, prep, cfg, check)
    except Cancelled:
        yield FinetuneUpdate(
            "stopped", elapsed_s=time.perf_counter() - t0, message=f"stopped while preparing: {nothing}"
        )
        return
    yield from _train(net, prep, planes, cfg, out, source, stop, t0, nothing)


def _train(net, prep, planes, cfg, out, source, stop, t0, nothing):
    from napari_mae._names import BEST
    from napari_mae.io.checkpoint import load_checkpoint, save_checkpoint
    from napari_mae.models.decoder import FITTED_RADIUS_KEY, segmenter_from_checkpoint
    from napari_mae.training.loop import LoopConfig, run

    n_user = int(sum(p["user"].sum() for p in planes))
    pseudo = planes[0]["pseudo"] if planes else {}
    used = [k for k, v in pseudo.items() if v] if cfg.pseudo_labels else []
    description = (
        f"fine-tuning {source} on {len(prep.images)} image(s), {len(planes)} plane(s), "
        f"{n_user} labelled pixels at the model's scale; pseudo-labels ({cfg.pseudo_source}): "
        f"{', '.join(used) or 'none'}; "
        f"object radius {np.median(prep.radii):.3g} ({', '.join(sorted(set(prep.sources)))})"
    )
    extra = {
        "task": "segmentation",
        "finetuned_from": str(source),
        "finetune": cfg.to_dict(),
        "n_images": len(prep.images),
        # the scale trained at, which inference with this model keeps (decoder.fitted_radius)
        FITTED_RADIUS_KEY: float(np.median(prep.radii)),
        "object_radii": [float(r) for r in prep.radii],
        "object_radius_sources": list(prep.sources),
    }
    objective = FinetuneObjective(net, planes, cfg, description, extra)
    run_dir = Path(tempfile.mkdtemp(prefix="napari-mae-finetune-"))
    remaining = None if cfg.seconds is None else max(1e-3, cfg.seconds - (time.perf_counter() - t0))
    epochs = math.ceil(cfg.steps / cfg.eval_every) if cfg.steps is not None else 10**6
    loop_cfg = LoopConfig(
        output_dir=run_dir,
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr=cfg.lr,
        weight_decay=1e-4,
        betas=(0.9, 0.999),
        warmup_fraction=0.0,
        grad_clip=1.0,
        checkpoint_every=0,
        seed=cfg.seed,
        device=cfg.device,
        amp=False,  # bfloat16 autocast is the objective's (CPUs with native bf16 too)
        overwrite=True,
        max_seconds=remaining,
        max_steps=cfg.steps,
    )
    best_step = best_val = None
    last_live = -math.inf
    loss = None
    final = None
    try:
        yield FinetuneUpdate("prepared", elapsed_s=time.perf_counter() - t0, message=description)
        for u in run(objective, loop_cfg, stop=stop):
            now = time.perf_counter() - t0
            if u.kind == "step":
                loss = u.loss
                yield FinetuneUpdate("step", step=u.step, elapsed_s=now, loss=u.loss, best_step=best_step)
            elif u.kind == "epoch":
                val = (u.metrics or {}).get("val_loss")
                if val is not None and (best_val is None or val < best_val):
                    best_val, best_step = val, u.step
                labels = None
                if cfg.live_every_s and prep.work[0].ndim == 2 and now - last_live >= cfg.live_every_s:
                    labels = _current_labels(objective.model, prep, objective.bf16)
                    last_live = time.perf_counter() - t0
                yield FinetuneUpdate(
                    "evaluated",
                    step=u.step,
                    elapsed_s=now,
                    loss=u.loss,
                    val_loss=val,
                    best_step=best_step,
                    labels=labels,
                    message=f"step {u.step}: loss on the labelled crops {val:.4f}" if val is not None else "",
                )
            elif u.kind in ("finished", "stopped", "failed"):
                final = u
        kind = final.kind if final is not None else "failed"
        best = run_dir / BEST
        elapsed = time.perf_counter() - t0
        if kind == "failed" or not best.is_file():
            if kind == "failed":
                why = final.message
            elif kind == "stopped":
                why = "stopped before the first evaluation"
            else:
                why = f"the time budget ({cfg.seconds:g} s) was used up before the first step; give it more seconds"
            yield FinetuneUpdate(
                kind,
                step=getattr(final, "step", 0),
                elapsed_s=elapsed,
                loss=loss,
                message=f"{why} (after {getattr(final, 'step', 0)} steps): {nothing}",
            )
            return
        ckpt = load_checkpoint(best)
        tuned = segmenter_from_checkpoint(ckpt, source=str(best))
        extra = {**extra, "steps": int(ckpt["training_state"]["step"]), "seconds": round(elapsed, 1)}
        saved = save_checkpoint(out, tuned, normalization=tuned.normalization, extra=extra)
        verb = "stopped" if kind == "stopped" else "finished"
        yield FinetuneUpdate(
            kind,
            step=final.step,
            elapsed_s=time.perf_counter() - t0,
            loss=loss,
            val_loss=best_val,
            best_step=best_step,
            checkpoint=saved,
            message=f"{verb} after {final.step} steps in {elapsed:.0f} s; saved the best model "
            f"(step {best_step}, loss on the labelled crops {best_val:.4f}) to {saved}",
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _current_labels(net, prep, bf16: bool) -> np.ndarray:
    """Instance labels of the first (2D) image with the model as it is now, its input shape."""
    from skimage.transform import resize

    from napari_mae.segmentation.learned import LearnedParams, instances_from_maps, predict_maps

    was_training = net.training
    net.eval()
    try:
        maps = predict_maps(net, prep.work[0], bf16=bf16)
    finally:
        net.train(was_training)
    lab = instances_from_maps(maps, LearnedParams())
    shape = prep.images[0].shape
    if lab.shape != shape:
        lab = resize(lab, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
    return lab
