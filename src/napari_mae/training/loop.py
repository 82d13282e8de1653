"""MAE pre-training / fine-tuning loop as a plain generator of typed updates.

:func:`train` runs the same code behind the Training widget (which wraps the
generator in a ``thread_worker`` and sets a stop flag), the ``napari-mae train``
command, the tests, and ``torchrun`` on several GPUs or CPU processes. It
imports no Qt.

Per step: a batch of crops ``(B, C, *img_size)`` from :mod:`napari_mae.data`,
a random patch mask drawn from a generator seeded by ``(seed, step, rank)``,
the MAE loss (mean squared error over the removed patches), gradient clipping,
an AdamW step, and a warm-up + cosine learning-rate step (He et al., *Masked
Autoencoders Are Scalable Vision Learners*, CVPR 2022, appendix A.1, Table 8:
AdamW with betas (0.9, 0.95), weight decay 0.05 on weights only, linear
warm-up then half-cycle cosine decay, applied per iteration).

The run directory receives:

* ``last.pt``  - model and full training state, every ``checkpoint_every``
  steps, at the end of every epoch, and when stopped;
* ``best.pt``  - the model with the lowest validation loss (training loss
  when there is no validation set), checked at the end of every epoch;
* ``loss_log.csv`` - one row per step: ``step, epoch, loss, val_loss, lr,
  images_per_s, elapsed_s`` (``val_loss`` filled on the last step of each
  epoch);
* ``config.json`` - the :class:`TrainConfig`.

All checkpoint writes are atomic (``napari_mae.io.checkpoint.save_checkpoint``),
so a crash never leaves a half-written ``last.pt``. A non-finite loss stops
training before the bad update is applied and keeps the previous ``last.pt``.

Exact resume: crops depend only on ``(seed, epoch, index)``, the sample order
of each epoch only on ``(seed, epoch)`` (``DistributedSampler``), masks only on
``(seed, step, rank)``; the checkpoint holds model, optimizer, scheduler, grad
scaler, step and the global RNG states. Resuming from a stop therefore
reproduces an uninterrupted run bit for bit on CPU (tested).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel`` (NCCL on GPUs, gloo on CPU), each process reads a
``DistributedSampler`` shard, losses are averaged across processes, and only
rank 0 writes files and yields updates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from napari_mae._names import BUNDLED_MODELS, bundled_weights_path
from napari_mae.data import DEFAULT_EXCLUDE, sample_seed

__all__ = [
    "TrainConfig",
    "TrainUpdate",
    "bundled_model_available",
    "default_model",
    "guess_spatial_dims",
    "lr_at_step",
    "train",
]

UpdateKind = Literal["start", "step", "epoch", "finished", "stopped", "failed"]

LAST = "last.pt"
BEST = "best.pt"
LOSS_LOG = "loss_log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "val_loss", "lr", "images_per_s", "elapsed_s")


@dataclass
class TrainConfig:
    """Settings of one training run.

    Parameters
    ----------
    data_dir : path or sequence of paths
        Image folders (searched recursively) or files, see
        :func:`napari_mae.data.find_images`.
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
        Where preprocessed images are kept, see :func:`napari_mae.data.make_datasets`.
    cache_dir : path, optional
        For ``cache="disk"``; default ``output_dir / "cache"``.
    patterns, exclude : sequence of str
        File-name patterns to include / relative paths to exclude (default:
        :data:`napari_mae.data.DEFAULT_EXCLUDE`, annotation files such as
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

    def validate(self) -> None:
        """Check ranges.

        Raises
        ------
        ValueError
            Naming the first bad value.
        """
        checks = [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (0 < self.mask_ratio < 1, "mask_ratio", "must be in (0, 1)"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or None"),
            (0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)"),
            (self.samples_per_image >= 1, "samples_per_image", "must be >= 1"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
            (self.spatial_dims in (None, 2, 3), "spatial_dims", "must be 2, 3 or None"),
            (self.cache in ("memory", "disk", "none"), "cache", "must be 'memory', 'disk' or 'none'"),
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
        As :attr:`TrainConfig.patterns` (``None``: :data:`napari_mae.data.DEFAULT_PATTERNS`)
        and :attr:`TrainConfig.exclude`.

    Returns
    -------
    (int, pathlib.Path) or None
        3 when that image is a volume (its axes have a Z), else 2, and the image;
        ``None`` when no image is found or it is unreadable (training reports
        that itself, with context).
    """
    from napari_mae.data import DEFAULT_PATTERNS, find_images
    from napari_mae.io.readers import read_image

    try:
        first = find_images(data_dir, tuple(patterns) if patterns else DEFAULT_PATTERNS, exclude=exclude)[0]
        _, _, meta = read_image(first)
    except Exception:  # noqa: BLE001 - training reports unreadable data itself, with context
        return None
    return (3 if "Z" in meta.get("axes", "") else 2), first


def lr_at_step(
    step: int, total_steps: int, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0
) -> float:
    """Learning rate of the MAE schedule for the (0-based) ``step``.

    Linear warm-up to ``lr`` over ``warmup_steps``, then a half-cycle cosine
    decay to ``min_lr`` at ``total_steps`` (MAE paper, appendix A.1; the
    reference ``util/lr_sched.py`` applies it per iteration).

    Parameters
    ----------
    step : int
        Index of the step about to be taken, ``0 <= step < total_steps``.
    total_steps : int
        Steps of the run.
    lr, min_lr : float
        Peak and final learning rates.
    warmup_steps : int
        Length of the warm-up; step ``s < warmup_steps`` uses
        ``lr * (s + 1) / warmup_steps``.

    Returns
    -------
    float
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, want_cuda: bool) -> _Dist:
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        created = False
        if not dist.is_initialized():
            # torch._dynamo, imported lazily by the first optimiser or DDP wrapper, keeps a
            # reference to a process group that exists when it is imported; that group then
            # survives destroy_process_group, its gloo threads outlive the interpreter, and one
            # that frees a collective's tensor during finalisation aborts the process
            # ("terminate called without an active exception", issue 12). Imported first, it
            # holds nothing, and close() joins every gloo thread.
            import torch._dynamo  # noqa: F401

            if want_cuda:  # NCCL needs each process on its own GPU before the group forms
                import torch

                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl" if want_cuda else "gloo"
            dist.init_process_group(backend=backend)
            created = True
        return cls(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), created)

    def all_reduce_sum(self, values: list[float], device) -> list[float]:
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group this object created, joining its threads."""
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.created = False


def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def _resolve_device(name: str, dist: _Dist):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _build_model(cfg: TrainConfig, resume_path: Path | None):
    """Return ``(model, spec description)``."""
    from napari_mae.models import mae

    if resume_path is not None:
        return mae.load_model(str(resume_path), device="cpu"), str(resume_path)
    spec = cfg.model
    overrides: dict[str, Any] = {}
    if cfg.img_size is not None:
        overrides["img_size"] = tuple(int(s) for s in cfg.img_size)
    if cfg.patch_size is not None:
        overrides["patch_size"] = tuple(int(s) for s in cfg.patch_size)
    if isinstance(spec, mae.MAEConfig) or (isinstance(spec, str) and spec in mae.PRESETS):
        base = mae.PRESETS[spec] if isinstance(spec, str) else spec
        for key, value in overrides.items():
            if len(value) == 1:  # one number: the same along every axis
                overrides[key] = value * base.spatial_dims
        conf = dataclasses.replace(base, mask_ratio=cfg.mask_ratio, **overrides)
        return mae.build_model(conf), (spec if isinstance(spec, str) else "config")
    if overrides:
        raise ValueError(
            "img_size and patch_size can only be changed for a preset "
            f"({', '.join(mae.PRESETS)}), not for the trained model {spec!r}"
        )
    model = mae.load_model(spec, device="cpu")
    if model.config.mask_ratio != cfg.mask_ratio:
        model.config = dataclasses.replace(model.config, mask_ratio=cfg.mask_ratio)
    return model, str(spec)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only (MAE / timm convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_emb" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _rng_state() -> dict:
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class _ShardSampler:
    """Indices ``rank::world_size`` of ``range(n)``, no padding (validation)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _LossLog:
    """Append-only CSV of per-step metrics, flushed every row."""

    def __init__(self, path: Path, *, keep_until_step: int | None):
        self.path = path
        rows: list[dict] = []
        if keep_until_step is not None and path.is_file():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= keep_until_step]
        self._fh = path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=LOG_COLUMNS)
        self._writer.writeheader()
        for r in rows:
            self._writer.writerow({k: r.get(k, "") for k in LOG_COLUMNS})
        self._fh.flush()

    def write(self, **row) -> None:
        self._writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _forward_loss(net, model, x, generator, autocast_dtype, mask_ratio=None):
    """Masked forward pass and MAE loss (float32). Separate so tests can patch it."""
    import torch

    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    else:
        pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    return model.loss(x, pred.float(), mask)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


def train(config: TrainConfig, *, stop: Any = None) -> Iterator[TrainUpdate]:
    """Train an MAE, yielding a :class:`TrainUpdate` after every step.

    Parameters
    ----------
    config : TrainConfig
        The run's settings.
    stop : threading.Event or callable, optional
        Checked before every step (``stop.is_set()`` or ``stop()``); when true,
        ``last.pt`` is written and a ``"stopped"`` update ends the run, which
        ``resume=True`` continues exactly. Under ``torchrun`` a stop in any
        process stops all.

    Yields
    ------
    TrainUpdate
        ``start``, then ``step`` / ``epoch`` updates, then one of
        ``finished``, ``stopped``, ``failed``. Processes other than rank 0
        yield nothing.

    Raises
    ------
    ValueError
        Bad settings, no usable images, a model/spatial_dims mismatch, or
        resuming a run that already finished.
    FileNotFoundError
        A data folder does not exist, or ``resume=True`` but
        ``output_dir/last.pt`` does not exist.
    FileExistsError
        ``output_dir`` already holds a run and neither ``resume`` nor
        ``overwrite`` is set.

    Notes
    -----
    Closing the generator early (``gen.close()``) ends training without
    writing a checkpoint; use ``stop`` to keep the progress.
    """
    import torch

    config.validate()
    cfg = config
    out = Path(cfg.output_dir)
    dist = _Dist.from_env(want_cuda=(cfg.device in ("auto", "cuda") and torch.cuda.is_available()))
    try:
        yield from _train(cfg, out, dist, stop)
        dist.barrier()  # no process tears down its connections while another is in a collective
    finally:
        dist.close()


def _train(cfg: TrainConfig, out: Path, dist: _Dist, stop) -> Iterator[TrainUpdate]:
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from napari_mae.data import DEFAULT_PATTERNS, DEFAULT_PERCENTILES, make_datasets
    from napari_mae.io.checkpoint import load_checkpoint, save_checkpoint

    t_start = time.perf_counter()
    device = _resolve_device(cfg.device, dist)
    resume_path = out / LAST if cfg.resume else None
    if resume_path is not None and not resume_path.is_file():
        raise FileNotFoundError(f"cannot resume: {resume_path} does not exist")
    if not cfg.resume and not cfg.overwrite and (out / LAST).is_file():
        raise FileExistsError(
            f"{out} already holds a training run ({LAST}); resume it, choose another output folder, "
            "or overwrite it explicitly (--overwrite)"
        )
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- model -----------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model, model_desc = _build_model(cfg, resume_path)
    mconf = model.config
    spatial_dims = int(mconf.spatial_dims)
    if cfg.spatial_dims is not None and cfg.spatial_dims != spatial_dims:
        raise ValueError(f"spatial_dims={cfg.spatial_dims} but the model {model_desc!r} is {spatial_dims}D")
    img_size = tuple(int(s) for s in mconf.img_size)
    model.to(device)

    # ---- data ------------------------------------------------------------------------
    with warnings.catch_warnings():
        if not dist.main:
            warnings.simplefilter("ignore")
        data = make_datasets(
            cfg.data_dir,
            spatial_dims=spatial_dims,
            img_size=img_size,
            in_channels=int(mconf.in_channels),
            val_fraction=cfg.val_fraction,
            spacing=cfg.spacing,
            patterns=tuple(cfg.patterns) if cfg.patterns else DEFAULT_PATTERNS,
            exclude=tuple(cfg.exclude),
            cache=cfg.cache,
            cache_dir=cfg.cache_dir if cfg.cache_dir is not None else out / "cache",
            samples_per_image=cfg.samples_per_image,
            seed=cfg.seed,
        )
    sampler = DistributedSampler(
        data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_fraction * total_steps))

    # ---- optimisation ----------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )

    def _factor(s: int) -> float:
        return lr_at_step(s, total_steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps) / cfg.lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor)
    use_amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp and device.type == "cuda")
    autocast_dtype = None
    if use_amp:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    step = 0
    best = math.inf
    if resume_path is not None:
        state = load_checkpoint(resume_path)["training_state"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        best = float(state["best_metric"])
        if int(state.get("total_steps", total_steps)) != total_steps and dist.main:
            warnings.warn(
                f"resuming with {total_steps} total steps instead of {state['total_steps']}: "
                "the learning-rate schedule changes, the run is no longer an exact continuation",
                UserWarning,
                stacklevel=3,
            )
        if int(state.get("world_size", 1)) != dist.world_size and dist.main:
            warnings.warn(
                f"resuming on {dist.world_size} processes a run started on {state['world_size']}: the "
                "sample order differs, the run is no longer an exact continuation",
                UserWarning,
                stacklevel=3,
            )
        _set_rng_state(state["rng"])
        if step >= total_steps:
            raise ValueError(
                f"{resume_path} already finished all {total_steps} steps; raise epochs to continue"
            )

    net = model
    if dist.world_size > 1:
        # static_graph: MONAI's transformer blocks hold never-used cross-attention norms;
        # the set of parameters with gradients is the same every step.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
        )

    # What the data pipeline does (ScaleIntensityRangePercentilesd, per channel), in the
    # format napari_mae.preprocess / reconstruction read back from the checkpoint.
    normalization = {"method": "percentile", "lower": DEFAULT_PERCENTILES[0], "upper": DEFAULT_PERCENTILES[1]}
    model.normalization = dict(normalization)
    log: _LossLog | None = None
    if dist.main:
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
        log = _LossLog(out / LOSS_LOG, keep_until_step=step if resume_path is not None else None)

    def _save(path_name: str, epoch_done: int) -> Path:
        path = out / path_name
        if dist.main:
            training_state = {
                "step": step,
                "epoch": epoch_done,
                "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "best_metric": best,
                "rng": _rng_state(),
                "world_size": dist.world_size,
                "config": cfg.to_json(),
            }
            save_checkpoint(
                path,
                model,
                normalization=normalization,
                training_state=training_state,
                extra={
                    "train_files": [str(f) for f in data.train_files],
                    "val_files": [str(f) for f in data.val_files],
                },
            )
        return path

    def _update(kind, epoch, **kw) -> TrainUpdate:
        return TrainUpdate(kind=kind, epoch=epoch, n_epochs=cfg.epochs, step=step, n_steps=total_steps, **kw)

    def _validate() -> float | None:
        if len(data.val) == 0:
            return None
        vsampler = _ShardSampler(len(data.val), dist.rank, dist.world_size)
        loader = DataLoader(
            data.val, batch_size=cfg.batch_size, sampler=vsampler, num_workers=cfg.num_workers
        )
        model.eval()
        total = count = 0.0
        gen = torch.Generator(device=device)
        with torch.no_grad():
            for b, x in enumerate(loader):
                x = x.to(device, non_blocking=True)
                gen.manual_seed(sample_seed(cfg.seed, 1, dist.rank, b))
                loss = _forward_loss(model, model, x, gen, autocast_dtype, cfg.mask_ratio)
                total += float(loss) * x.shape[0]
                count += x.shape[0]
        model.train()
        total, count = dist.all_reduce_sum([total, count], device)
        return total / count if count else None

    skipped = f", skipped {len(data.skipped)} unusable" if data.skipped else ""
    start_msg = (
        f"{'resuming' if resume_path else 'training'} {model_desc} ({spatial_dims}D, crops {img_size}) on "
        f"{len(data.train_files)} images ({len(data.val_files)} for validation{skipped}); "
        f"{total_steps} steps of {cfg.batch_size * dist.world_size} crops on {device}"
        + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
    )
    if dist.main:
        yield _update("start", 0, lr=optimizer.param_groups[0]["lr"], message=start_msg)

    gen = torch.Generator(device=device)
    step_time = None  # smoothed seconds per step
    val_loss: float | None = None
    last_lr = optimizer.param_groups[0]["lr"]
    model.train()
    start_epoch = step // steps_per_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)
            skip = step - epoch * steps_per_epoch
            indices = list(sampler)[skip * cfg.batch_size :]
            loader = DataLoader(
                data.train,
                batch_size=cfg.batch_size,
                sampler=indices,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=False,
            )
            epoch_sum = epoch_n = 0.0
            t_prev = time.perf_counter()
            for x in loader:
                if dist.all_reduce_sum([float(_stop_requested(stop))], device)[0] > 0:
                    ckpt = _save(LAST, epoch)
                    if dist.main:
                        yield _update(
                            "stopped",
                            epoch + 1,
                            val_loss=val_loss,
                            lr=last_lr,
                            message=f"stopped at step {step}/{total_steps}; resume from {ckpt}",
                            checkpoint=ckpt,
                        )
                    return
                x = x.to(device, non_blocking=True)
                gen.manual_seed(sample_seed(cfg.seed, 0, step, dist.rank))
                loss = _forward_loss(net, model, x, gen, autocast_dtype, cfg.mask_ratio)
                loss_sum, n_sum = dist.all_reduce_sum(
                    [float(loss.detach()) * x.shape[0], float(x.shape[0])], device
                )
                step_loss = loss_sum / n_sum
                if not math.isfinite(step_loss):
                    if dist.main:
                        yield _update(
                            "failed",
                            epoch + 1,
                            loss=step_loss,
                            lr=last_lr,
                            message=_nonfinite_message(out, step, step_loss, "loss"),
                        )
                    return
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    if not scaler.is_enabled() and not torch.isfinite(norm):
                        if dist.main:
                            yield _update(
                                "failed",
                                epoch + 1,
                                loss=step_loss,
                                lr=last_lr,
                                message=_nonfinite_message(out, step, float(norm), "gradient norm"),
                            )
                        return
                last_lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                epoch_sum += loss_sum
                epoch_n += n_sum

                now = time.perf_counter()
                dt = now - t_prev
                t_prev = now
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                ips = n_sum / step_time
                eta = step_time * (total_steps - step)
                last_of_epoch = step == (epoch + 1) * steps_per_epoch
                ckpt = None
                if not last_of_epoch and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    ckpt = _save(LAST, epoch)
                if dist.main:
                    if not last_of_epoch:
                        log.write(
                            step=step,
                            epoch=epoch + 1,
                            loss=f"{step_loss:.6g}",
                            lr=f"{last_lr:.6g}",
                            images_per_s=f"{ips:.3g}",
                            elapsed_s=f"{now - t_start:.2f}",
                        )
                    yield _update(
                        "step",
                        epoch + 1,
                        loss=step_loss,
                        val_loss=val_loss,
                        lr=last_lr,
                        images_per_s=ips,
                        eta_s=eta,
                        checkpoint=ckpt,
                    )

            # ---- end of epoch ------------------------------------------------------------
            val_loss = _validate()
            train_loss = epoch_sum / epoch_n if epoch_n else math.nan
            metric = val_loss if val_loss is not None else train_loss
            improved = math.isfinite(metric) and metric < best
            if improved:
                best = metric
            ckpt = _save(LAST, epoch + 1)
            if improved:
                _save(BEST, epoch + 1)
            if dist.main:
                log.write(
                    step=step,
                    epoch=epoch + 1,
                    loss=f"{step_loss:.6g}",
                    val_loss=None if val_loss is None else f"{val_loss:.6g}",
                    lr=f"{last_lr:.6g}",
                    images_per_s=f"{ips:.3g}",
                    elapsed_s=f"{time.perf_counter() - t_start:.2f}",
                )
                vtxt = "" if val_loss is None else f", validation loss {val_loss:.4f}"
                yield _update(
                    "epoch",
                    epoch + 1,
                    loss=train_loss,
                    val_loss=val_loss,
                    lr=last_lr,
                    images_per_s=ips,
                    eta_s=step_time * (total_steps - step),
                    message=f"epoch {epoch + 1}/{cfg.epochs}: training loss {train_loss:.4f}{vtxt}"
                    + (" (best)" if improved else ""),
                    checkpoint=ckpt,
                )
        if dist.main:
            yield _update(
                "finished",
                cfg.epochs,
                loss=train_loss,
                val_loss=val_loss,
                lr=last_lr,
                message=f"finished {total_steps} steps in {time.perf_counter() - t_start:.0f} s; "
                f"best {'validation' if val_loss is not None else 'training'} loss {best:.4f} in {out / BEST}",
                checkpoint=out / LAST,
            )
    finally:
        if log is not None:
            log.close()


def _nonfinite_message(out: Path, step: int, value: float, what: str) -> str:
    last = out / LAST
    kept = (
        f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint had been written yet"
    )
    return (
        f"training stopped: the {what} became {value} at step {step + 1}; the update was not applied and "
        f"{kept}. Lower the learning rate (lr) or check the images for extreme values."
    )
