"""Settings and progress records of a training run, and the choice of the model to start from.

Torch-free: the Training widget imports this on the GUI thread. The loop itself is
:mod:`napari_mae.training.loop`; the MAE objective :mod:`napari_mae.training.objectives`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from napari_mae._names import BEST, BUNDLED_MODELS, LAST, bundled_weights_path
from napari_mae.training.files import DEFAULT_EXCLUDE

__all__ = [
    "BEST",
    "LAST",
    "LOG_COLUMNS",
    "LOSS_LOG",
    "TrainConfig",
    "TrainUpdate",
    "check_loop_fields",
    "bundled_model_available",
    "default_model",
    "guess_spatial_dims",
]

UpdateKind = Literal["start", "step", "epoch", "finished", "stopped", "failed"]

LOSS_LOG = "loss_log.csv"
#: Columns of ``loss_log.csv`` for the MAE objective; an objective's own validation
#: metrics take the place of ``val_loss``.
LOG_COLUMNS = ("step", "epoch", "loss", "val_loss", "lr", "images_per_s", "elapsed_s")


def check_loop_fields(config) -> None:
    """Check the loop's settings on any config that carries them (the one check).

    :class:`~napari_mae.training.loop.LoopConfig`, :class:`TrainConfig` and
    :class:`~napari_mae.training.segmentation.SegmentationConfig` each hold the loop's
    fields, with defaults of their own task; all three call this.

    Raises
    ------
    ValueError
        Naming the first bad value.
    """
    checks = [
        (config.epochs >= 1, "epochs", "must be >= 1"),
        (config.batch_size >= 1, "batch_size", "must be >= 1"),
        (config.lr > 0, "lr", "must be > 0"),
        (0 <= config.min_lr <= config.lr, "min_lr", "must be in [0, lr]"),
        (config.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (0 <= config.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
        (config.grad_clip is None or config.grad_clip > 0, "grad_clip", "must be > 0 or None"),
        (config.num_workers >= 0, "num_workers", "must be >= 0"),
        (config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
    ]
    for ok, name, why in checks:
        if not ok:
            raise ValueError(f"{name} {why}, got {getattr(config, name)!r}")


@dataclass
class TrainConfig:
    """Settings of one training run.

    Parameters
    ----------
    data_dir : path or sequence of paths
        Image folders (searched recursively) or files, see
        :func:`napari_mae.training.files.find_images`.
    output_dir : path
        Run directory (created); holds checkpoints, ``loss_log.csv`` and
        ``config.json``.
    model : str or path or MAEConfig
        Preset name (``"tiny-2d"``, ...) to train from scratch; ``"default-2d"``
        / ``"default-3d"`` or a checkpoint path to fine-tune; or an
        ``MAEConfig``.
    spatial_dims : {2, 3}, optional
        Must match the model if given (a check, not a conversion).
    img_size, patch_size : sequence of int, optional
        Override the preset's crop size and patch size ``([Z,] Y, X)`` in
        pixels (one number: the same along every axis). Only for presets and
        configs (a trained model keeps its own).
    mask_ratio : float
        Fraction of patches removed, in (0, 1). The MAE paper uses 0.75.
    epochs : int
        Passes over the training images (times ``samples_per_image``).
    batch_size : int
        Crops per step and process.
    lr : float
        Peak learning rate after warm-up. The paper's rule
        ``1.5e-4 * batch / 256`` gives far too small a value for the small
        batches and short runs of local training, so the default is 1e-3.
    min_lr : float
        Learning rate at the end of the cosine decay.
    weight_decay : float
        AdamW weight decay, not applied to biases, norms, tokens and
        position embeddings.
    betas : (float, float)
        AdamW betas.
    warmup_fraction : float
        Fraction of all steps spent in linear warm-up (the paper: 40 of 800
        epochs, 0.05).
    grad_clip : float or None
        Maximum global gradient norm; ``None`` disables clipping.
    val_fraction : float
        Fraction of the files held out for validation.
    samples_per_image : int
        Random crops per image and epoch.
    spacing : sequence of float, optional
        Resample images to this spacing before cropping.
    cache : {"memory", "disk", "none"}
        Where preprocessed images are kept, see :func:`napari_mae.training.data.make_datasets`.
    cache_dir : path, optional
        For ``cache="disk"``; default ``output_dir / "cache"``.
    patterns, exclude : sequence of str
        File-name patterns to include / relative paths to exclude (default:
        :data:`napari_mae.training.files.DEFAULT_EXCLUDE`, annotation files such as
        ``labels/*`` and ``*_mask.*``).
    num_workers : int
        DataLoader worker processes (0: load in the training process).
    checkpoint_every : int
        Also write ``last.pt`` every this many steps (0: only at epoch ends).
    seed : int
        Seed of model initialisation, split, augmentation, masks and order.
    device : str
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ...
        Under ``torchrun`` with CUDA, each process uses ``cuda:LOCAL_RANK``.
    amp : bool, optional
        Mixed precision (bfloat16 where supported, else float16 with a grad
        scaler). ``None``: on for CUDA, off on CPU.
    resume : bool
        Continue from ``output_dir / "last.pt"``.
    overwrite : bool
        Start afresh in an ``output_dir`` that already holds a run (its
        checkpoints are replaced). Without it, such a folder is refused unless
        ``resume`` is set, so a forgotten ``--resume`` never loses a run.
    adversarial_weight : float
        Weight of the adversarial term, >= 0 (0, the default, turns it off). Above 0 a
        MONAI ``PatchDiscriminator`` trains alternately with the MAE on real crops
        against composites (removed patches replaced by the reconstruction), and the
        MAE loss gains ``adversarial_weight * L_adv``; see
        :class:`napari_mae.training.objectives.MAEObjective`. The discriminator is
        training state (kept in ``last.pt`` for ``resume``), not part of the model.
    """

    data_dir: Any
    output_dir: str | os.PathLike
    model: Any = "tiny-2d"
    spatial_dims: int | None = None
    img_size: Sequence[int] | None = None
    patch_size: Sequence[int] | None = None
    mask_ratio: float = 0.75
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
    val_fraction: float = 0.1
    samples_per_image: int = 1
    spacing: Sequence[float] | None = None
    cache: str = "memory"
    cache_dir: str | os.PathLike | None = None
    patterns: Sequence[str] | None = None
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    num_workers: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    resume: bool = False
    overwrite: bool = False
    adversarial_weight: float = 0.0

    def validate(self) -> None:
        """Check ranges.

        Raises
        ------
        ValueError
            Naming the first bad value.
        """
        check_loop_fields(self)
        checks = [
            (0 < self.mask_ratio < 1, "mask_ratio", "must be in (0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)"),
            (self.samples_per_image >= 1, "samples_per_image", "must be >= 1"),
            (self.spatial_dims in (None, 2, 3), "spatial_dims", "must be 2, 3 or None"),
            (self.cache in ("memory", "disk", "none"), "cache", "must be 'memory', 'disk' or 'none'"),
            (
                math.isfinite(self.adversarial_weight) and self.adversarial_weight >= 0,
                "adversarial_weight",
                "must be a finite number >= 0 (0 disables the adversarial term)",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    def to_json(self) -> dict:
        """JSON-safe dict of the settings."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, os.PathLike):
                v = str(v)
            elif isinstance(v, (list, tuple)):
                v = [str(e) if isinstance(e, os.PathLike) else e for e in v]
            elif not isinstance(v, (str, int, float, bool, type(None))):
                v = repr(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class TrainUpdate:
    """One progress record yielded by :func:`train`.

    Attributes
    ----------
    kind : {"start", "step", "epoch", "finished", "stopped", "failed"}
        ``start`` once (``message`` describes the data), ``step`` after every
        optimizer step, ``epoch`` after each epoch's validation, then exactly
        one of ``finished``, ``stopped`` (stop flag) or ``failed`` (non-finite
        loss; ``message`` says why and which checkpoint was kept).
    epoch : int
        Current epoch, 1-based (0 in ``start``).
    n_epochs : int
        Total epochs.
    step : int
        Optimizer steps done so far (global, across epochs).
    n_steps : int
        Steps of the whole run.
    loss : float or None
        ``step``: this step's training loss (mean over processes);
        ``epoch``: the epoch's mean training loss.
    val_loss : float or None
        Validation loss (``epoch`` and later; ``None`` without a validation set).
    lr : float
        Learning rate of the last step.
    images_per_s : float
        Training throughput, crops per second over all processes (smoothed).
    eta_s : float
        Estimated seconds to the end of the run.
    message : str
        Human-readable summary.
    checkpoint : pathlib.Path or None
        The checkpoint written with this update, if any.
    metrics : dict or None
        Every validation metric the objective reports (``epoch`` and later), e.g.
        ``{"val_loss": 0.41}``; ``val_loss`` above is ``metrics["val_loss"]``.
    """

    kind: UpdateKind
    epoch: int
    n_epochs: int
    step: int
    n_steps: int
    loss: float | None = None
    val_loss: float | None = None
    lr: float = 0.0
    images_per_s: float = 0.0
    eta_s: float = 0.0
    message: str = ""
    checkpoint: Path | None = None
    metrics: dict[str, float] | None = None


def default_model(spatial_dims: int | None = None) -> str:
    """The model a run starts from when none is chosen: the bundled one, fine-tuned.

    Shared by ``napari-mae train`` and the Training widget.

    Parameters
    ----------
    spatial_dims : {2, 3}, optional
        Spatial dimensions of the data (see :func:`guess_spatial_dims`); ``None`` means 2.

    Returns
    -------
    str
        ``"default-2d"`` or ``"default-3d"``.

    Raises
    ------
    ValueError
        If ``spatial_dims`` is not 2, 3 or None.
    """
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
    return f"default-{spatial_dims or 2}d"


def bundled_model_available(name: str) -> bool:
    """Whether the bundled model ``name`` (``"default-2d"`` ...) ships with this installation.

    Checked without importing torch, so the Training widget can ask on the GUI thread.
    """
    return name in BUNDLED_MODELS and bundled_weights_path(name).is_file()


def guess_spatial_dims(
    data_dir: Any, patterns: Sequence[str] | None = None, *, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> tuple[int, Path] | None:
    """Spatial dimensions of a training folder, from the first image :func:`train` would read.

    Parameters
    ----------
    data_dir : path or sequence of paths
        As :attr:`TrainConfig.data_dir`.
    patterns, exclude : sequence of str, optional
        As :attr:`TrainConfig.patterns` (``None``: :data:`napari_mae.training.files.DEFAULT_PATTERNS`)
        and :attr:`TrainConfig.exclude`.

    Returns
    -------
    (int, pathlib.Path) or None
        3 when that image is a volume (its axes have a Z), else 2, and the image;
        ``None`` when no image is found or it is unreadable (training reports
        that itself, with context).
    """
    from napari_mae.io.readers import read_image
    from napari_mae.training.files import DEFAULT_PATTERNS, find_images

    try:
        first = find_images(data_dir, tuple(patterns) if patterns else DEFAULT_PATTERNS, exclude=exclude)[0]
        _, _, meta = read_image(first)
    except Exception:  # noqa: BLE001 - training reports unreadable data itself, with context
        return None
    return (3 if "Z" in meta.get("axes", "") else 2), first
