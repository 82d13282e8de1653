"""Training: one objective-agnostic loop (:mod:`~napari_mae.training.loop`), its objectives
(:mod:`~napari_mae.training.objectives`), the MONAI data pipeline
(:mod:`~napari_mae.training.data`) and the run settings (:mod:`~napari_mae.training.config`).

:func:`train` runs MAE pretraining or fine-tuning: the code behind the Training widget (which
wraps the generator in a ``thread_worker`` and sets a stop flag), ``napari-mae train``, the
tests and ``torchrun``. Importing this package imports no torch (the widget asks
:func:`bundled_model_available` on the GUI thread).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from napari_mae.training.config import (
    BEST,
    LAST,
    LOG_COLUMNS,
    LOSS_LOG,
    TrainConfig,
    TrainUpdate,
    bundled_model_available,
    default_model,
    guess_spatial_dims,
)
from napari_mae.training.loop import lr_at_step

__all__ = [
    "BEST",
    "LAST",
    "LOG_COLUMNS",
    "LOSS_LOG",
    "TrainConfig",
    "TrainUpdate",
    "bundled_model_available",
    "default_model",
    "guess_spatial_dims",
    "lr_at_step",
    "train",
]


def train(config: TrainConfig, *, stop: Any = None) -> Iterator[TrainUpdate]:
    """Train an MAE, yielding a :class:`TrainUpdate` after every step.

    :class:`~napari_mae.training.objectives.MAEObjective` run by
    :func:`napari_mae.training.loop.run`; see there for ``stop``, the updates, the files
    written and the errors raised (``ValueError`` for bad settings, no usable images or a
    model/spatial_dims mismatch; ``FileNotFoundError``; ``FileExistsError``).
    """
    from napari_mae.training.loop import run
    from napari_mae.training.objectives import MAEObjective, loop_config

    yield from run(MAEObjective(config), loop_config(config), stop=stop)
