"""Segmentation training: the instance decoder on the MAE encoder, from images + labels.

:class:`SegmentationObjective` plugs into the objective-agnostic loop
(:func:`napari_mae.training.loop.run`), so resume, DDP, progress updates and
atomic checkpoints are the MAE pretraining's. What it adds:

* **Data** (:class:`LabelledImages`): image/label pairs matched by file name,
  each image prepared as at inference (one channel, normalised, bright objects:
  :func:`napari_mae.segmentation.learned.prepare_image`, then
  :func:`~napari_mae.segmentation.learned.decoder_input`) and resampled so that
  its objects' median radius is the decoder's ``object_radius`` (the scale the
  inference resamples every image to); targets from
  :func:`napari_mae.segmentation.targets.distance_targets`. Training samples are
  random crops augmented with MONAI dict transforms (flips, rot90, random zoom,
  intensity scale, gamma, noise), seeded by ``(seed, epoch, index)`` so a
  resumed run is exact. Validation is split by file: a fixed central crop per
  validation image.
* **Volumes** (3D labels, a 3D encoder such as ``tiny-3d`` or ``default-3d``): the
  decoder is 3D. Each volume is resampled (linear; labels nearest) to isotropic
  voxels of ``r / object_radius`` physical units, ``r`` the labels' median
  equivalent-sphere radius in the units of the file's spacing, so that its objects
  have ``object_radius`` voxels radius on every axis: the grid
  :func:`napari_mae.segmentation.learned.segment_volume` resamples to at inference
  (the same :func:`~napari_mae.segmentation.learned.isotropic_factor`, growth caps
  included). Targets are computed there with that grid's spacing; crops are cubes of
  ``crop_size_3d`` voxels (validation: ``2 * crop_size_3d``, zero-padded where the
  volume is smaller), rot90 in the Y-X plane, flips on all three axes.
* **Loss**: Dice on the foreground plus the mean squared error of the centre
  and boundary distances inside objects (torch-em's ``DiceBasedDistanceLoss``
  with ``mask_distances_in_bg``).
* **Schedule**: the encoder is frozen for the first ``frozen_epochs`` epochs,
  then trains at ``encoder_lr_scale`` times the decoder's rate.
* **Validation metric**: acc@0.5 = TP / (TP + FP + FN) of the instances of the
  full post-processing, mean over validation crops; ``best.pt`` is the best.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_mae.training.config import check_loop_fields
from napari_mae.training.loop import Objective, SetupContext, StepContext, decay_groups

__all__ = [
    "LabelledImages",
    "SegmentationConfig",
    "SegmentationObjective",
    "match_label_files",
    "segmentation_loss",
    "train_segmentation",
]

#: Side of the central validation crop, in pixels at the model's scale.
VAL_CROP = 256


@dataclass
class SegmentationConfig:
    """Settings of a segmentation training run.

    Parameters
    ----------
    data_dir : path or sequence of paths
        Image folders (or files), searched as for MAE training.
    labels_dir : path
        Folder of instance label images with the same file names (any suffix the
        readers know), 0 = background, one id per object.
    output_dir : path
        Run directory.
    model : str or path
        Where the encoder comes from: an MAE (``"default-2d"``, a preset for a
        random encoder, an MAE checkpoint) — the decoder then starts fresh — or a
        segmentation checkpoint, whose decoder training continues (fine-tuning).
    features : int
        Decoder width (:class:`napari_mae.models.decoder.DecoderConfig`).
    object_radius : float
        Median object radius in pixels that training images are resampled to.
    crop_size : int
        Side of the training crops in pixels (a multiple of the patch size).
    crop_size_3d : int
        Volumes: side of the cubic training crops in voxels (a multiple of the patch size
        on every axis); validation crops are twice as large.
    samples_per_image : int
        Crops per image and epoch.
    val_fraction : float
        Fraction of the files held out for validation (at least one when > 0 and
        there are two or more pairs).
    frozen_epochs : int
        Epochs with the encoder frozen before everything trains.
    encoder_lr_scale : float
        Encoder learning rate relative to ``lr`` after the frozen epochs.
    use_encoder : bool
        False trains the convolutional branch alone (the ablation without encoder).
    epochs, batch_size, lr, min_lr, weight_decay, betas, warmup_fraction, grad_clip, num_workers,
    checkpoint_every, seed, device, amp, resume, overwrite
        The loop's settings (:class:`napari_mae.training.loop.LoopConfig`).
    """

    data_dir: Any
    labels_dir: Any
    output_dir: Any
    model: Any = "default-2d"
    features: int = 16
    object_radius: float = 8.0
    crop_size: int = 112
    crop_size_3d: int = 64
    samples_per_image: int = 4
    val_fraction: float = 0.1
    frozen_epochs: int = 1
    encoder_lr_scale: float = 0.1
    use_encoder: bool = True
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.03
    grad_clip: float | None = 1.0
    num_workers: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        checks = [
            (self.features >= 1, "features", "must be >= 1"),
            (self.object_radius > 0 and math.isfinite(self.object_radius), "object_radius", "must be > 0"),
            (self.crop_size >= 16, "crop_size", "must be >= 16"),
            (self.crop_size_3d >= 16, "crop_size_3d", "must be >= 16"),
            (self.samples_per_image >= 1, "samples_per_image", "must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)"),
            (self.frozen_epochs >= 0, "frozen_epochs", "must be >= 0"),
            (0.0 <= self.encoder_lr_scale <= 1.0, "encoder_lr_scale", "must be in [0, 1]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        check_loop_fields(self)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (list, tuple)):
                v = [str(x) if isinstance(x, os.PathLike) else x for x in v]
            elif isinstance(v, os.PathLike):
                v = str(v)
            out[f.name] = v
        out["task"] = "segmentation"
        return out


def match_label_files(images: Sequence[Path], labels_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair each image with the label file of the same name.

    Parameters
    ----------
    images : sequence of Path
        Image files.
    labels_dir : path
        Folder holding one label file per image, same stem (``a.tif`` and
        ``a.tif``, or ``a.nii.gz`` and ``a.tif``).

    Returns
    -------
    list of (image, labels) paths, in the order of ``images``.

    Raises
    ------
    ValueError
        Naming the images without labels and the label files without an image.
    FileNotFoundError
        If ``labels_dir`` is not a folder.
    """
    from napari_mae.training.files import find_images

    folder = Path(labels_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"labels folder {folder} does not exist")
    by_stem = {_stem(p): p for p in find_images(folder)}
    pairs, missing = [], []
    for img in images:
        lab = by_stem.pop(_stem(img), None)
        if lab is None:
            missing.append(img.name)
        else:
            pairs.append((img, lab))
    problems = []
    if missing:
        problems.append(
            f"no labels in {folder} for {', '.join(sorted(missing)[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    if by_stem:
        extra = sorted(p.name for p in by_stem.values())
        problems.append(
            f"labels without an image: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    if problems:
        raise ValueError("; ".join(problems))
    return pairs


def _stem(path: Path) -> str:
    from napari_mae.io.readers import image_stem

    return image_stem(path)


def _read_pair(
    image_path: Path, labels_path: Path, spatial_dims: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prepared image (float32, bright objects, :func:`decoder_input`'s scaling), checked labels and spacing of one pair.

    Raises ``ValueError`` naming the file: float or negative labels, a shape other than
    the image's, labels of other dimensions than the encoder's ``spatial_dims``.
    """
    from napari_mae.io.readers import read_image
    from napari_mae.segmentation.learned import decoder_input, prepare_image

    image, spacing, meta = read_image(image_path)
    labels, _, _ = read_image(labels_path)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path}: labels must be integer instance ids, not {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{labels_path}: labels must not be negative")
    channel_axis = -1 if meta.get("rgb") or image.ndim == labels.ndim + 1 else None
    spatial = image.shape[:-1] if channel_axis is not None else image.shape
    if tuple(spatial) != tuple(labels.shape):
        raise ValueError(
            f"{labels_path}: shape {labels.shape} does not match its image {image_path} {spatial}"
        )
    if labels.ndim not in (2, 3):
        raise ValueError(f"{labels_path}: labels must be 2D or 3D, got {labels.ndim} dims")
    if labels.ndim != spatial_dims:
        hint = "default-2d or tiny-2d" if labels.ndim == 2 else "tiny-3d or default-3d"
        raise ValueError(
            f"{labels_path}: the labels are {labels.ndim}D and the encoder is {spatial_dims}D; "
            f"{labels.ndim}D labels train a decoder on a {labels.ndim}D encoder (model {hint})"
        )
    prepared, info = prepare_image(image, channel_axis=channel_axis)
    scaled = decoder_input(prepared, invalid=info["invalid"], inverted=not info["bright_objects"])
    return scaled, labels.astype(np.int32), tuple(spacing)


def _rescaled_pair(image: np.ndarray, labels: np.ndarray, object_radius: float):
    """Image and labels resampled so that the labels' median radius is ``object_radius`` pixels."""
    from skimage.transform import resize

    from napari_mae.segmentation.learned import median_radius

    r = median_radius(labels)
    s = object_radius / r
    if abs(s - 1.0) <= 0.05:
        return image, labels
    shape = tuple(max(8, int(round(n * s))) for n in labels.shape)
    image = resize(image, shape, order=1, anti_aliasing=s < 1, preserve_range=True).astype(np.float32)
    labels = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return image, labels


def _rescaled_volume(image, labels, object_radius, spacing):
    """A volume and its labels on the isotropic grid where objects have ``object_radius`` voxels.

    Returns the volume, the labels and the physical voxel size (Z, Y, X) of that grid.
    The labels' median equivalent-sphere radius in physical units (``spacing``) sets the
    grid, through the inference's :func:`~napari_mae.segmentation.learned.isotropic_factor`.
    """
    from skimage.transform import resize

    from napari_mae.segmentation.learned import isotropic_factor, median_radius

    sp = np.asarray(spacing if spacing is not None else (1.0,) * 3, dtype=float)
    r_phys = median_radius(labels) * float(np.prod(sp)) ** (1 / 3)  # same volume, physical units
    factor = isotropic_factor(sp, r_phys, object_radius)
    orig = labels.shape
    shape = tuple(max(8, int(round(n * f))) for n, f in zip(orig, factor, strict=True))
    if shape != orig:
        shrink = any(f < 1 for f in factor)
        image = resize(image, shape, order=1, anti_aliasing=shrink, preserve_range=True).astype(np.float32)
        labels = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    grid = tuple(float(s * n / m) for s, n, m in zip(sp, orig, shape, strict=True))  # physical voxel size
    return image, labels, grid


class LabelledImages:
    """Prepared image/target pairs: random augmented crops (training) or central crops (validation).

    Parameters
    ----------
    pairs : list of (image, labels) paths
    object_radius : float
        Median radius in pixels the images are resampled to.
    crop_size : int
        Training crop side; validation crops are :data:`VAL_CROP` (images) or twice
        ``crop_size`` (volumes).
    samples : int
        Crops per image and epoch (training).
    train : bool
    seed : int
    spatial_dims : {2, 3}
        The encoder's: labels of other dimensions raise.

    Notes
    -----
    Items are dicts ``{"image": (1, *S) float32, "target": (3, *S) float32}``
    and, for validation, ``"labels": S int32``, ``S = (S,) * spatial_dims``. The
    transform classes are MONAI's own (picklable), so ``num_workers > 0`` works
    under spawn.

    Raises
    ------
    ValueError
        Naming the label file: empty, float or negative labels, a shape other than
        its image's, or dimensions other than ``spatial_dims``.
    """

    def __init__(
        self,
        pairs,
        object_radius: float,
        crop_size: int,
        *,
        samples: int = 1,
        train: bool = True,
        seed: int = 0,
        spatial_dims: int = 2,
    ):
        from napari_mae.segmentation.targets import distance_targets

        self.items = []
        for img_path, lab_path in pairs:
            image, labels, spacing = _read_pair(img_path, lab_path, spatial_dims)
            if not labels.any():
                raise ValueError(f"{lab_path}: the label image is empty (no object)")
            if labels.ndim == 3:
                image, labels, grid = _rescaled_volume(image, labels, object_radius, spacing)
            else:
                image, labels = _rescaled_pair(image, labels, object_radius)
                grid = None
            if not train and spatial_dims == 3:
                # zeros, not a reflection, where the volume is smaller: a mirrored object
                # would have no label and count as a false positive
                image, labels = _central_crop(image, labels, 2 * crop_size, mode="constant")
            elif not train:
                image, labels = _central_crop(image, labels, VAL_CROP)
            self.items.append((image, labels, distance_targets(labels, spacing=grid)))
        self.train = train
        self.samples = samples if train else 1
        self.seed = seed
        self.epoch = 0
        self.transform = _train_transforms(crop_size, spatial_dims) if train else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items) * self.samples

    def __getitem__(self, index: int) -> dict:
        image, labels, target = self.items[index % len(self.items)]
        if not self.train:
            return {"image": image[None], "target": target, "labels": labels}
        from napari_mae.training.files import sample_seed

        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, index))
        out = self.transform({"image": image[None], "target": target})
        return {
            "image": np.asarray(out["image"], np.float32),
            "target": np.asarray(out["target"], np.float32),
        }


def _central_crop(image, labels, size, mode="reflect"):
    """Central crop of side ``size``, padded (``mode``; labels: 0) where the image is smaller."""
    pads = [(max(0, size - n) // 2, max(0, size - n) - max(0, size - n) // 2) for n in image.shape]
    if any(a or b for a, b in pads):
        image = np.pad(image, pads, mode=mode)
        labels = np.pad(labels, pads)
    starts = [(n - size) // 2 for n in image.shape]
    sl = tuple(slice(s, s + size) for s in starts)
    return np.ascontiguousarray(image[sl]), np.ascontiguousarray(labels[sl])


def _train_transforms(crop: int, spatial_dims: int = 2):
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandSpatialCropd,
        RandZoomd,
        SpatialPadd,
    )

    keys = ["image", "target"]
    size = (crop,) * spatial_dims
    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    # The normalised distances are scale-free, so zooming the target maps with the image
    # is exact up to interpolation: no need to recompute them per crop.
    return Compose(
        [
            SpatialPadd(keys, spatial_size=size, mode="reflect"),
            RandSpatialCropd(keys, roi_size=size, random_size=False),
            RandZoomd(
                keys,
                prob=0.5,
                min_zoom=0.75,
                max_zoom=1.33,
                mode=(linear, linear),
                padding_mode="reflect",
                keep_size=True,
            ),
            *(RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)),
            # volumes: in the Y-X plane only (isotropic voxels, but Z is the optical axis)
            RandRotate90d(keys, prob=0.5, spatial_axes=(spatial_dims - 2, spatial_dims - 1)),
            RandScaleIntensityd("image", factors=0.3, prob=0.5),
            RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.5)),
            RandGaussianNoised("image", prob=0.3, std=0.05),
        ]
    )


def segmentation_loss(y, target):
    """Dice on the foreground plus MSE of the two distances inside objects.

    Parameters
    ----------
    y : Tensor, shape (B, 3, *spatial)
        Decoder output: foreground logit, centre and boundary distance (sigmoid).
    target : Tensor, shape (B, 3, *spatial)
        :func:`napari_mae.segmentation.targets.distance_targets` maps.

    Returns
    -------
    Tensor, scalar: soft Dice loss over the batch + the distances' squared error
    averaged over object pixels.
    """
    import torch

    p = torch.sigmoid(y[:, 0].float())
    fg = target[:, 0]
    dice = 1.0 - (2.0 * (p * fg).sum() + 1.0) / (p.sum() + fg.sum() + 1.0)
    inside = (fg > 0.5).float()
    n = inside.sum().clamp_min(1.0)
    dist = y[:, 1:].float() - target[:, 1:]
    mse = ((dist**2).sum(dim=1) * inside).sum() / n
    return dice + mse


class SegmentationObjective(Objective):
    """Instance-decoder training on images + labels (see the module docstring).

    ``best.pt`` is the model with the highest validation acc@0.5.
    """

    metric = "val_acc50"
    higher_is_better = True
    metrics = ("val_acc50",)
    metric_labels = {"val_acc50": "validation acc@0.5"}
    # The frozen epochs leave the encoder without gradients, then it trains: the set of
    # parameters with gradients changes, so DDP must look for unused ones.
    ddp_static_graph = False
    ddp_find_unused_parameters = True

    def __init__(self, config: SegmentationConfig):
        config.validate()
        self.config = config
        self._pairs = self._pairs_or_raise()
        self._description = ""

    def _pairs_or_raise(self):
        from napari_mae.training.files import find_images

        images = find_images(self.config.data_dir)
        if not images:
            raise ValueError(f"no images found in {self.config.data_dir}")
        return match_label_files(images, self.config.labels_dir)

    def _build_model(self, checkpoint):
        from napari_mae.io.checkpoint import load_checkpoint
        from napari_mae.models import decoder as dec
        from napari_mae.models import mae

        cfg = self.config
        if checkpoint is not None:
            return dec.segmenter_from_checkpoint(checkpoint, source="last.pt"), "resumed"
        spec = cfg.model
        if isinstance(spec, dec.InstanceDecoder):
            return spec, "model"
        path = None if (isinstance(spec, str) and spec in mae.PRESETS) else _model_path(spec)
        if path is not None:
            ckpt = load_checkpoint(path)
            if dec.is_segmenter_checkpoint(ckpt):
                return dec.segmenter_from_checkpoint(ckpt, source=str(path)), str(spec)
        encoder = mae.load_model(spec)
        conf = dec.DecoderConfig(features=cfg.features, object_radius=cfg.object_radius)
        net = dec.InstanceDecoder(encoder.train(), conf, use_encoder=cfg.use_encoder)
        net.normalization = dict(encoder.normalization)
        return net, str(spec)

    def setup(self, ctx: SetupContext) -> None:
        cfg = self.config
        model, desc = self._build_model(ctx.checkpoint)
        model.train()
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(self._pairs))
        n_val = int(round(cfg.val_fraction * len(self._pairs)))
        if cfg.val_fraction > 0 and len(self._pairs) >= 2:
            n_val = max(1, n_val)
        val_pairs = [self._pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [self._pairs[i] for i in sorted(order[n_val:])]
        radius = model.decoder_config.object_radius
        dims = model.spatial_dims
        crop = cfg.crop_size if dims == 2 else cfg.crop_size_3d
        patch = model.encoder.patch_size
        if any(crop % q for q in patch):
            name = "crop_size" if dims == 2 else "crop_size_3d"
            raise ValueError(f"{name}={crop} must be a multiple of the encoder's patch_size {patch}")
        self.train_data = LabelledImages(
            train_pairs, radius, crop, samples=cfg.samples_per_image, train=True, seed=cfg.seed,
            spatial_dims=dims,
        )  # fmt: skip
        self.val_data = LabelledImages(val_pairs, radius, crop, train=False, spatial_dims=dims)
        self.model = model.to(ctx.device)
        self.train_files = [str(p[0]) for p in train_pairs]
        self.val_files = [str(p[0]) for p in val_pairs]
        self._description = (
            f"segmentation decoder on {desc} ({len(train_pairs)} labelled image{'s' * (len(train_pairs) != 1)} "
            f"for training and {len(val_pairs)} for validation; objects resampled to radius {radius:g} "
            + ("px)" if dims == 2 else "voxels, isotropic)")
        )

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        enc = {id(p) for p in self.model.encoder.parameters()}
        groups = []
        for group in decay_groups(self.model, weight_decay):
            e = [p for p in group["params"] if id(p) in enc]
            d = [p for p in group["params"] if id(p) not in enc]
            if d:
                groups.append({**group, "params": d})
            if e:
                groups.append({**group, "params": e, "lr": self.config.lr * self.config.encoder_lr_scale})
        return groups

    def training_step(self, batch, ctx: StepContext):
        import torch

        x = batch["image"].to(ctx.device, non_blocking=True)
        t = batch["target"].to(ctx.device, non_blocking=True)
        self.model.freeze_encoder = ctx.epoch < self.config.frozen_epochs
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
            y = ctx.net(x)
        return segmentation_loss(y, t)

    def validation_step(self, batch, ctx: StepContext) -> dict[str, float]:
        import torch

        from napari_mae.segmentation.learned import instances_from_maps
        from napari_mae.segmentation.metrics import match_instances

        x = batch["image"].to(ctx.device)
        with torch.no_grad():
            y = self.model(x).float().cpu().numpy()
        y[:, 0] = 1.0 / (1.0 + np.exp(-y[:, 0]))
        accs = []
        for maps, labels in zip(y, batch["labels"].numpy(), strict=True):
            m = match_instances(labels, instances_from_maps(maps), iou_threshold=0.5)
            accs.append(m["accuracy"])
        return {"val_acc50": float(np.mean(accs)), "n": len(accs)}

    def checkpoint_extras(self) -> dict:
        return {
            "normalization": dict(self.model.normalization),
            "extra": {"task": "segmentation", "train_files": self.train_files, "val_files": self.val_files},
        }

    def describe(self) -> str:
        return self._description

    def config_json(self) -> dict:
        return self.config.to_json()


def _model_path(spec) -> Path | None:
    from napari_mae._names import BUNDLED_MODELS, bundled_weights_path

    if isinstance(spec, str) and spec in BUNDLED_MODELS:
        return bundled_weights_path(spec)
    p = Path(spec)
    return p if p.is_file() else None


def train_segmentation(config: SegmentationConfig, *, stop: Any = None):
    """Train the instance decoder, yielding a :class:`~napari_mae.training.config.TrainUpdate` per step.

    :class:`SegmentationObjective` run by :func:`napari_mae.training.loop.run` (see there
    for ``stop``, the updates, the files written and the errors raised). Bad labels
    (missing or extra names, mismatched shapes, float or negative ids, empty label images)
    raise ``ValueError`` naming the file before anything is written.
    """
    from napari_mae.training.loop import run
    from napari_mae.training.objectives import loop_config

    yield from run(SegmentationObjective(config), loop_config(config), stop=stop)
