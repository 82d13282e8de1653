"""One training loop for every objective, as a plain generator of typed updates.

:func:`run` knows nothing of the loss: an :class:`Objective` builds its model(s) and
datasets, computes the training loss of a batch and the validation metrics of a batch
(PyTorch Lightning's ``training_step`` / ``validation_step``). The loop owns the rest:
the optimiser of the objective's model (AdamW, weight decay on weight matrices only), the
warm-up + cosine learning-rate schedule per step (He et al., *Masked Autoencoders Are
Scalable Vision Learners*, CVPR 2022, appendix A.1), mixed precision, gradient
clipping, checkpoints, exact resume, ``torchrun`` (DDP) and the updates. MAE
pretraining (:class:`napari_mae.training.objectives.MAEObjective`) is one objective; the
learned segmentation decoder's is another, run by the same loop.

The run directory receives:

* ``last.pt``  - model and full training state, every ``checkpoint_every``
  steps, at the end of every epoch, and when stopped;
* ``best.pt``  - the model with the best value of the objective's metric
  (:attr:`Objective.metric`, in the direction :attr:`Objective.higher_is_better`),
  checked at the end of every epoch; without validation data, the lowest
  training loss;
* ``loss_log.csv`` - one row per step: ``step, epoch, loss, <validation metrics>, lr,
  images_per_s, elapsed_s`` (the metrics filled on the last step of each epoch;
  ``elapsed_s`` counts from the run's first start, across resumes);
* ``config.json`` - the objective's settings (:meth:`Objective.config_json`).

All checkpoint writes are atomic (``napari_mae.io.checkpoint.save_checkpoint``),
so a crash never leaves a half-written ``last.pt``. A non-finite loss stops
training before the bad update is applied and keeps the previous ``last.pt``.

Exact resume: the sample order of each epoch depends only on ``(seed, epoch)``
(``DistributedSampler``), the step's generator (:attr:`StepContext.generator`) only on
``(seed, step, rank)``; objectives whose samples depend only on ``(seed, epoch, index)``
(``set_epoch`` on their dataset) reproduce an uninterrupted run bit for bit on CPU. The
checkpoint holds model, optimiser, scheduler, grad scaler, step, the global RNG states
and the objective's own state (:meth:`Objective.state_dict`: extra modules and their
optimisers, e.g. a discriminator).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the objective's model is wrapped
in ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPU) and passed to the objective
as :attr:`StepContext.net`; each process reads a ``DistributedSampler`` shard, losses and
metrics are averaged across processes, and only rank 0 writes files and yields updates.
Extra modules that the objective trains itself average their gradients with
:meth:`StepContext.average_gradients`.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_mae._names import BEST, LAST
from napari_mae.training.config import LOSS_LOG, TrainUpdate, check_loop_fields
from napari_mae.training.files import sample_seed

__all__ = [
    "LoopConfig",
    "Objective",
    "SetupContext",
    "StepContext",
    "decay_groups",
    "lr_at_step",
    "run",
]


@dataclass
class LoopConfig:
    """What the loop needs, whatever the objective.

    Parameters
    ----------
    output_dir : path
        Run directory (created).
    epochs : int
        Passes over the objective's training data.
    batch_size : int
        Samples per step and process.
    lr, min_lr : float
        Peak learning rate after warm-up and the final one of the cosine decay.
    weight_decay : float
        AdamW weight decay (on weight matrices, see :func:`decay_groups`).
    betas : (float, float)
        AdamW betas.
    warmup_fraction : float
        Fraction of all steps spent in linear warm-up.
    grad_clip : float or None
        Maximum global gradient norm of the model; ``None`` disables clipping.
    num_workers : int
        DataLoader worker processes.
    checkpoint_every : int
        Also write ``last.pt`` every this many steps (0: only at epoch ends).
    seed : int
        Seed of initialisation, order and the step generators.
    device : str
        ``"auto"`` (CUDA, then Apple MPS, then CPU; :func:`napari_mae.models.mae.resolve_device`),
        ``"cpu"``, ``"cuda"``, ``"mps"``. Under ``torchrun`` with CUDA, each process uses
        ``cuda:LOCAL_RANK``.
    amp : bool, optional
        Mixed precision (:func:`napari_mae.models.mae.amp_dtype`: bfloat16 where supported,
        else float16 with a grad scaler). ``None``: on for CUDA, off elsewhere.
    resume, overwrite : bool
        Continue from ``output_dir / "last.pt"``; start afresh in a folder holding a run.
    max_seconds : float or None
        Time limit in seconds of wall-clock time, counted from the start of :func:`run`
        (setup included); checked before every step. When it is reached the epoch under
        way ends there (validation, ``last.pt``, ``best.pt`` if it improved) and a
        ``"finished"`` update says so. None: no limit.
    max_steps : int or None
        End the same way once this many optimiser steps are done (in all, resumed steps
        included). None: ``epochs`` decide. The learning-rate schedule still spans
        ``epochs``; use ``min_lr = lr`` and no warm-up for a constant rate.
    """

    output_dir: str | os.PathLike
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
    num_workers: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    resume: bool = False
    overwrite: bool = False
    max_seconds: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        check_loop_fields(self)
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise ValueError(f"max_seconds={self.max_seconds!r} must be a positive number of seconds or None")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps={self.max_steps!r} must be a positive integer or None")


@dataclass
class SetupContext:
    """What :meth:`Objective.setup` may use.

    Attributes
    ----------
    device : torch.device
        Where the model must be.
    rank, world_size : int
        This process and the number of processes.
    seed : int
        The run's seed (``torch.manual_seed(seed)`` was called just before ``setup``).
    output_dir : pathlib.Path
    checkpoint : dict or None
        The loaded ``last.pt`` when resuming (:func:`napari_mae.io.checkpoint.load_checkpoint`):
        build the model from it.
    """

    device: Any
    rank: int
    world_size: int
    seed: int
    output_dir: Path
    checkpoint: dict | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class StepContext:
    """What :meth:`Objective.training_step` and :meth:`Objective.validation_step` get.

    Attributes
    ----------
    net : torch.nn.Module
        The objective's model, wrapped in ``DistributedDataParallel`` under ``torchrun``:
        call this one in ``training_step`` (gradients are averaged by its backward).
        In ``validation_step`` it is the bare model.
    device : torch.device
    step, epoch : int
        Optimiser steps done so far; the 0-based epoch.
    rank, world_size : int
    generator : torch.Generator
        On ``device``, seeded from ``(seed, 0, step, rank)`` for a training step and
        ``(seed, 1, rank, batch)`` for a validation batch: random masks and noise drawn
        from it are reproduced on resume.
    amp_dtype : torch.dtype or None
        The reduced precision of :meth:`autocast`, None for float32.
    training : bool
    """

    net: Any
    device: Any
    step: int
    epoch: int
    rank: int
    world_size: int
    generator: Any
    amp_dtype: Any = None
    training: bool = True
    _dist: Any = field(default=None, repr=False)

    def autocast(self):
        """Mixed-precision context of this run (a null context in float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def average_gradients(self, parameters) -> None:
        """Average the gradients of modules the objective trains itself (one all-reduce)."""
        self._dist.average_gradients(parameters)


class Objective:
    """What is learnt: model(s), data, loss and validation metrics; the loop does the rest.

    Subclasses implement :meth:`setup`, :meth:`training_step` and
    :meth:`validation_step`, and set :attr:`model`, :attr:`train_data` and
    :attr:`val_data` in ``setup``. An objective that trains extra modules with its own
    optimisers (a discriminator) steps them inside ``training_step`` and returns their
    state from :meth:`state_dict`, which the loop checkpoints and gives back to
    :meth:`load_state_dict` on resume.

    Attributes
    ----------
    metric : str
        The validation metric that selects ``best.pt``; one of :attr:`metrics`.
    higher_is_better : bool
        Direction of :attr:`metric` (a loss: False; an accuracy: True).
    metrics : tuple of str
        Names of the values :meth:`validation_step` returns (besides ``"n"``).
    metric_labels : dict
        Words for messages, e.g. ``{"val_loss": "validation loss"}``.
    ddp_static_graph : bool
        The same parameters get gradients every step (DDP ``static_graph``).
    ddp_find_unused_parameters : bool
        Some steps leave parameters without gradients (a frozen encoder for the first
        epochs): DDP's ``find_unused_parameters``.
    model : torch.nn.Module
        The network optimised by the loop and written to checkpoints (``config`` with
        ``to_dict()`` and ``state_dict()``, see :func:`napari_mae.io.checkpoint.save_checkpoint`).
    train_data, val_data : map-style datasets
        ``val_data`` may be empty. A ``set_epoch(epoch)`` method, if present, is called
        before each epoch.
    """

    metric: str = "val_loss"
    higher_is_better: bool = False
    metrics: tuple[str, ...] = ("val_loss",)
    metric_labels: Mapping[str, str] = {"val_loss": "validation loss"}
    ddp_static_graph: bool = True
    ddp_find_unused_parameters: bool = False
    model: Any = None
    train_data: Any = None
    val_data: Any = None

    def setup(self, ctx: SetupContext) -> None:
        """Build the model (on ``ctx.device``; from ``ctx.checkpoint`` when resuming) and the data."""
        raise NotImplementedError

    def training_step(self, batch, ctx: StepContext):
        """Return the batch's training loss, a scalar tensor (mean over the batch).

        A mapping ``{"loss": tensor, name: float, ...}`` also works; the other values
        are reported in the step's update ``metrics``.
        """
        raise NotImplementedError

    def validation_step(self, batch, ctx: StepContext) -> Mapping[str, float]:
        """Return the batch's mean of each of :attr:`metrics`, and its sample count as ``"n"``."""
        raise NotImplementedError

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of :attr:`model` (see :func:`decay_groups`)."""
        return decay_groups(self.model, weight_decay)

    def state_dict(self) -> dict:
        """State beyond the model and its optimiser (builtins and tensors only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming."""

    def checkpoint_extras(self) -> dict:
        """``normalization`` and ``extra`` for :func:`napari_mae.io.checkpoint.save_checkpoint`."""
        return {}

    def describe(self) -> str:
        """What is trained on what, for the ``start`` message."""
        return type(self).__name__

    def config_json(self) -> dict:
        """The settings written to ``config.json`` and into checkpoints."""
        return {}


def _batch_size(batch) -> int:
    """Samples in a batch: the first axis of its first tensor."""
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


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


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False
    _recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16), repr=False)

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
        self._hold(t)
        return t.tolist()

    def average_gradients(self, parameters) -> None:
        """Replace each gradient by its mean over the processes (one all-reduce).

        Parameters without a gradient are left out (the same on every process: the same
        graph runs everywhere).
        """
        if self.world_size == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        self._hold(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _hold(self, tensor) -> None:
        """Keep the tensors of the last collectives referenced from Python until :meth:`close`.

        A gloo worker thread drops its reference to a collective's tensor a moment after
        the collective returns. Were that the last reference to a tensor created in Python,
        the worker would need the GIL to free it: a deadlock if the main thread is then
        joining that worker in ``destroy_process_group`` (seen as a hang at the end of a
        run on a loaded machine), an abort if Python is already finalising.
        """
        self._recent.append(tensor)

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
        self._recent.clear()


def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of ``model``: decay on weight matrices only (MAE / timm convention).

    Biases, norms, tokens and position embeddings get no weight decay.
    """
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

    def __init__(self, path: Path, columns: Sequence[str], *, keep_until_step: int | None):
        self.path = path
        self.columns = tuple(columns)
        rows: list[dict] = []
        if keep_until_step is not None and path.is_file():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= keep_until_step]
        self._fh = path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns)
        self._writer.writeheader()
        for r in rows:
            self._writer.writerow({k: r.get(k, "") for k in self.columns})
        self._fh.flush()

    def write(self, **row) -> None:
        self._writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _nonfinite_message(out: Path, step: int, value: float, what: str) -> str:
    last = out / LAST
    kept = (
        f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint had been written yet"
    )
    return (
        f"training stopped: the {what} became {value} at step {step + 1}; the update was not applied and "
        f"{kept}. Lower the learning rate (lr) or check the images for extreme values."
    )


def _resolve_device(name: str, dist: _Dist):
    """The run's device: :func:`napari_mae.models.mae.resolve_device`, ``cuda:LOCAL_RANK`` under torchrun."""
    import torch

    from napari_mae.models.mae import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def run(objective: Objective, config: LoopConfig, *, stop: Any = None) -> Iterator[TrainUpdate]:
    """Train ``objective``, yielding a :class:`~napari_mae.training.config.TrainUpdate` after every step.

    Parameters
    ----------
    objective : Objective
        What is learnt (its :meth:`~Objective.setup` is called here).
    config : LoopConfig
        Optimisation, checkpoint and device settings.
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
        Resuming a run that already finished; whatever the objective's setup raises.
    FileNotFoundError
        ``resume=True`` but ``output_dir/last.pt`` does not exist.
    FileExistsError
        ``output_dir`` already holds a run and neither ``resume`` nor
        ``overwrite`` is set.

    Notes
    -----
    Closing the generator early (``gen.close()``) ends training without
    writing a checkpoint; use ``stop`` to keep the progress.
    """
    import torch

    want_cuda = str(config.device).startswith(("auto", "cuda")) and torch.cuda.is_available()
    dist = _Dist.from_env(want_cuda=want_cuda)
    try:
        yield from _run(objective, config, Path(config.output_dir), dist, stop, torch)
        dist.barrier()  # no process tears down its connections while another is in a collective
    finally:
        dist.close()


def check_output_dir(output_dir, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder as :func:`run` would, without importing torch (the CLI asks first).

    Parameters
    ----------
    output_dir : path
        The run folder.
    resume, overwrite : bool
        As :class:`LoopConfig`'s.

    Raises
    ------
    FileNotFoundError
        ``resume`` but ``output_dir/last.pt`` does not exist.
    FileExistsError
        ``output_dir`` already holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    out = Path(output_dir)
    if resume and not (out / LAST).is_file():
        raise FileNotFoundError(f"cannot resume: {out / LAST} does not exist")
    if not resume and not overwrite and (out / LAST).is_file():
        raise FileExistsError(
            f"{out} already holds a training run ({LAST}); resume it (--resume), choose another output "
            "folder, or overwrite it explicitly (--overwrite)"
        )


def _run(objective: Objective, cfg: LoopConfig, out: Path, dist: _Dist, stop, torch) -> Iterator[TrainUpdate]:
    from torch.utils.data import DataLoader, DistributedSampler

    from napari_mae.io.checkpoint import load_checkpoint, save_checkpoint
    from napari_mae.models.mae import amp_dtype

    t_start = time.perf_counter()
    device = _resolve_device(cfg.device, dist)
    check_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
    resume_path = out / LAST if cfg.resume else None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- the objective's model and data --------------------------------------------------
    checkpoint = load_checkpoint(resume_path) if resume_path is not None else None
    torch.manual_seed(cfg.seed)
    objective.setup(SetupContext(device, dist.rank, dist.world_size, cfg.seed, out, checkpoint=checkpoint))
    model = objective.model
    metric_names = tuple(objective.metrics)
    if objective.metric not in metric_names:
        raise ValueError(f"objective metric {objective.metric!r} is not one of its metrics {metric_names}")
    sampler = DistributedSampler(
        objective.train_data,
        num_replicas=dist.world_size,
        rank=dist.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=False,
    )
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_fraction * total_steps))

    # ---- optimisation ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        objective.parameter_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )

    def _factor(s: int) -> float:
        return lr_at_step(s, total_steps, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps) / cfg.lr

    use_amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    autocast_dtype = amp_dtype(device) if use_amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    step = 0
    elapsed_before = 0.0  # seconds of training before this run (from the checkpoint when resuming)
    sign = -1.0 if objective.higher_is_better else 1.0  # best is the smallest sign * metric
    best = math.inf
    if checkpoint is not None:
        state = checkpoint["training_state"]
        optimizer.load_state_dict(state["optimizer"])  # its groups keep "initial_lr", the base lr
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        best = float(state["best_metric"])
        if int(state.get("total_steps", total_steps)) != total_steps and dist.main:
            warnings.warn(
                f"resuming with {total_steps} total steps instead of {state['total_steps']}: "
                f"the learning rate follows the new schedule from step {step}, the run is no longer "
                "an exact continuation",
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
        elapsed_before = float(state.get("elapsed_s", 0.0))
        objective.load_state_dict(state.get("objective") or {})
        _set_rng_state(state["rng"])
        if step >= total_steps:
            raise ValueError(
                f"{resume_path} already finished all {total_steps} steps; raise epochs to continue"
            )
        del checkpoint, state
    # Built at ``step`` from this run's schedule (its constructor steps once, to ``last_epoch + 1``):
    # a resumed run's lr is base_lr * factor(step) of the *new* schedule, not the saved value of the
    # old one (with ``--epochs`` raised on resume that was its end value, often 0). With the same
    # settings that is the value an uninterrupted run has, so an exact resume stays bit-identical.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor, last_epoch=step - 1)

    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            static_graph=objective.ddp_static_graph,
            find_unused_parameters=getattr(objective, "ddp_find_unused_parameters", False),
        )

    columns = ("step", "epoch", "loss", *metric_names, "lr", "images_per_s", "elapsed_s")
    log: _LossLog | None = None
    if dist.main:
        (out / "config.json").write_text(json.dumps(objective.config_json(), indent=2))
        log = _LossLog(out / LOSS_LOG, columns, keep_until_step=step if resume_path is not None else None)

    def _save(path_name: str, epoch_done: int, elapsed: float | None = None) -> Path:
        # elapsed: the time the caller also logs, so a resumed run's elapsed_s never goes
        # back below the last row written (it did by the time the save itself took)
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
                "metric": objective.metric if has_val else "loss",
                "higher_is_better": bool(objective.higher_is_better) if has_val else False,
                "objective": objective.state_dict(),
                "rng": _rng_state(),
                "world_size": dist.world_size,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start if elapsed is None else elapsed,
                "config": objective.config_json(),
            }
            extras = objective.checkpoint_extras()
            save_checkpoint(
                path,
                model,
                normalization=extras.get("normalization"),
                training_state=training_state,
                extra=extras.get("extra"),
            )
        return path

    def _update(kind, epoch, metrics=None, **kw) -> TrainUpdate:
        return TrainUpdate(
            kind=kind,
            epoch=epoch,
            n_epochs=cfg.epochs,
            step=step,
            n_steps=total_steps,
            val_loss=None if not metrics else metrics.get("val_loss"),
            metrics=metrics,
            **kw,
        )

    def _ctx(generator, epoch: int, training: bool) -> StepContext:
        return StepContext(
            net=net if training else model,
            device=device,
            step=step,
            epoch=epoch,
            rank=dist.rank,
            world_size=dist.world_size,
            generator=generator,
            amp_dtype=autocast_dtype,
            training=training,
            _dist=dist,
        )

    has_val = objective.val_data is not None and len(objective.val_data) > 0

    def _validate(epoch: int) -> dict[str, float] | None:
        if not has_val:
            return None
        vsampler = _ShardSampler(len(objective.val_data), dist.rank, dist.world_size)
        loader = DataLoader(
            objective.val_data, batch_size=cfg.batch_size, sampler=vsampler, num_workers=cfg.num_workers
        )
        model.eval()
        sums = [0.0] * (len(metric_names) + 1)  # weighted sums of each metric, then the count
        gen = torch.Generator(device=device)
        with torch.no_grad():
            for b, batch in enumerate(loader):
                gen.manual_seed(sample_seed(cfg.seed, 1, dist.rank, b))
                values = objective.validation_step(batch, _ctx(gen, epoch, training=False))
                n = float(values.get("n", _batch_size(batch)))
                for i, name in enumerate(metric_names):
                    sums[i] += float(values[name]) * n
                sums[-1] += n
        model.train()
        sums = dist.all_reduce_sum(sums, device)
        if not sums[-1]:
            return None
        return {name: sums[i] / sums[-1] for i, name in enumerate(metric_names)}

    if dist.main:
        yield _update(
            "start",
            0,
            lr=optimizer.param_groups[0]["lr"],
            message=(
                f"{'resuming' if resume_path else 'training'} {objective.describe()}; "
                f"{total_steps} steps of {cfg.batch_size * dist.world_size} crops on {device}"
                + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
            ),
        )

    gen = torch.Generator(device=device)
    step_time = None  # smoothed seconds per step
    val_metrics: dict[str, float] | None = None
    last_lr = optimizer.param_groups[0]["lr"]
    ips = 0.0
    model.train()
    start_epoch = step // steps_per_epoch
    step_loss = train_loss = math.nan
    limited = ""  # why the run ended before its epochs: the time or step limit

    def _limit() -> str:
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return f"the step limit ({cfg.max_steps} steps)"
        if cfg.max_seconds is not None and time.perf_counter() - t_start >= cfg.max_seconds:
            return f"the time limit ({cfg.max_seconds:g} s)"
        return ""

    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            if hasattr(objective.train_data, "set_epoch"):
                objective.train_data.set_epoch(epoch)
            skip = step - epoch * steps_per_epoch
            indices = list(sampler)[skip * cfg.batch_size :]
            loader = DataLoader(
                objective.train_data,
                batch_size=cfg.batch_size,
                sampler=indices,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=False,
            )
            epoch_sum = epoch_n = 0.0
            t_prev = time.perf_counter()
            for batch in loader:
                why = _limit()
                stop_now, limit_now = dist.all_reduce_sum(
                    [float(_stop_requested(stop)), float(bool(why))], device
                )
                if limit_now > 0 and not stop_now:
                    limited = why or "the time limit of another process"
                    break
                if stop_now > 0:
                    ckpt = _save(LAST, epoch)
                    if dist.main:
                        yield _update(
                            "stopped",
                            epoch + 1,
                            val_metrics,
                            lr=last_lr,
                            message=f"stopped at step {step}/{total_steps}; resume from {ckpt}",
                            checkpoint=ckpt,
                        )
                    return
                gen.manual_seed(sample_seed(cfg.seed, 0, step, dist.rank))
                result = objective.training_step(batch, _ctx(gen, epoch, training=True))
                loss = result["loss"] if isinstance(result, Mapping) else result
                n_batch = _batch_size(batch)
                loss_sum, n_sum = dist.all_reduce_sum(
                    [float(loss.detach()) * n_batch, float(n_batch)], device
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
                            elapsed_s=f"{elapsed_before + now - t_start:.2f}",
                        )
                    extra = (
                        {k: float(v) for k, v in result.items() if k != "loss"}
                        if isinstance(result, Mapping)
                        else None
                    )
                    yield _update(
                        "step",
                        epoch + 1,
                        val_metrics if not extra else {**(val_metrics or {}), **extra},
                        loss=step_loss,
                        lr=last_lr,
                        images_per_s=ips,
                        eta_s=eta,
                        checkpoint=ckpt,
                    )

            # ---- end of epoch ------------------------------------------------------------
            if limited and not epoch_n:
                break  # the limit came before this epoch's first step: nothing to evaluate
            val_metrics = _validate(epoch)
            train_loss = epoch_sum / epoch_n if epoch_n else math.nan
            value = sign * val_metrics[objective.metric] if val_metrics is not None else train_loss
            improved = math.isfinite(value) and value < best
            if improved:
                best = value
            elapsed = elapsed_before + time.perf_counter() - t_start
            ckpt = _save(LAST, epoch + 1, elapsed)
            if improved:
                _save(BEST, epoch + 1, elapsed)
            if dist.main:
                log.write(
                    step=step,
                    epoch=epoch + 1,
                    loss=f"{step_loss:.6g}",
                    lr=f"{last_lr:.6g}",
                    images_per_s=f"{ips:.3g}",
                    elapsed_s=f"{elapsed:.2f}",
                    **{k: f"{v:.6g}" for k, v in (val_metrics or {}).items()},
                )
                vtxt = "".join(
                    f", {objective.metric_labels.get(k, k)} {v:.4f}" for k, v in (val_metrics or {}).items()
                )
                yield _update(
                    "epoch",
                    epoch + 1,
                    val_metrics,
                    loss=train_loss,
                    lr=last_lr,
                    images_per_s=ips,
                    eta_s=step_time * (total_steps - step),
                    message=f"epoch {epoch + 1}/{cfg.epochs}: training loss {train_loss:.4f}{vtxt}"
                    + (" (best)" if improved else ""),
                    checkpoint=ckpt,
                )
            if limited:
                break
        if dist.main:
            what = (
                objective.metric_labels.get(objective.metric, objective.metric)
                if has_val
                else "training loss"
            )
            yield _update(
                "finished",
                cfg.epochs,
                val_metrics,
                loss=train_loss,
                lr=last_lr,
                message=(
                    f"stopped at {limited} after {step} steps" if limited else f"finished {total_steps} steps"
                )
                + f" in {time.perf_counter() - t_start:.0f} s; "
                f"best {what} {sign * best if has_val else best:.4f} in {out / BEST}",
                checkpoint=out / LAST,
            )
    finally:
        if log is not None:
            log.close()
