"""What the training loop optimises: one objective per kind of training.

:class:`MAEObjective` is masked-autoencoder pretraining and fine-tuning (He et al., *Masked
Autoencoders Are Scalable Vision Learners*, CVPR 2022): crops of image folders, a random
patch mask per sample drawn from the step's generator, the mean squared error over the
removed patches (:meth:`napari_mae.models.mae.MaskedAutoencoder.loss`). The loop
(:func:`napari_mae.training.loop.run`) owns everything else.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from napari_mae._names import LAST
from napari_mae.training.config import TrainConfig
from napari_mae.training.loop import LoopConfig, Objective, SetupContext, StepContext

__all__ = ["MAEObjective", "loop_config"]


def loop_config(cfg: TrainConfig) -> LoopConfig:
    """The loop's share of a :class:`~napari_mae.training.config.TrainConfig`."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    return LoopConfig(**{name: getattr(cfg, name) for name in names})


def _build_model(cfg: TrainConfig, checkpoint: dict | None):
    """Return ``(model, spec description)``: from the resumed checkpoint, a preset or a trained model."""
    from napari_mae.models import mae

    if checkpoint is not None:
        source = str(Path(cfg.output_dir) / LAST)
        return mae.model_from_checkpoint(checkpoint, source=source), source
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


def _forward_loss(net, model, x, generator, autocast_dtype, mask_ratio=None):
    """Masked forward pass and MAE loss (float32). Separate so tests can patch it."""
    import torch

    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    else:
        pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    return model.loss(x, pred.float(), mask)


class MAEObjective(Objective):
    """Masked-autoencoder training on image folders.

    Parameters
    ----------
    config : TrainConfig
        Model, data and mask settings (the loop's settings are read by
        :func:`loop_config`).

    Notes
    -----
    ``best.pt`` is the model with the lowest validation loss (mean MAE loss over the
    removed patches of the validation crops, masks seeded per batch).
    """

    metric = "val_loss"
    higher_is_better = False
    metrics = ("val_loss",)
    metric_labels = {"val_loss": "validation loss"}
    # MONAI's transformer blocks hold never-used cross-attention norms; the set of
    # parameters with gradients is the same every step.
    ddp_static_graph = True

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.data = None
        self._description = ""

    def setup(self, ctx: SetupContext) -> None:
        from napari_mae.training.data import DEFAULT_PATTERNS, DEFAULT_PERCENTILES, make_datasets

        cfg = self.config
        model, model_desc = _build_model(cfg, ctx.checkpoint)
        mconf = model.config
        spatial_dims = int(mconf.spatial_dims)
        if cfg.spatial_dims is not None and cfg.spatial_dims != spatial_dims:
            raise ValueError(
                f"spatial_dims={cfg.spatial_dims} but the model {model_desc!r} is {spatial_dims}D"
            )
        img_size = tuple(int(s) for s in mconf.img_size)
        model.to(ctx.device)
        with warnings.catch_warnings():
            if not ctx.main:
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
                cache_dir=cfg.cache_dir if cfg.cache_dir is not None else ctx.output_dir / "cache",
                samples_per_image=cfg.samples_per_image,
                seed=cfg.seed,
            )
        # What the data pipeline does (ScaleIntensityRangePercentilesd, per channel), in the
        # format napari_mae.preprocess / reconstruction read back from the checkpoint.
        self.normalization = {
            "method": "percentile",
            "lower": DEFAULT_PERCENTILES[0],
            "upper": DEFAULT_PERCENTILES[1],
        }
        model.normalization = dict(self.normalization)
        self.model = model
        self.data = data
        self.train_data, self.val_data = data.train, data.val
        skipped = f", skipped {len(data.skipped)} unusable" if data.skipped else ""
        self._description = (
            f"{model_desc} ({spatial_dims}D, crops {img_size}) on "
            f"{len(data.train_files)} images ({len(data.val_files)} for validation{skipped})"
        )

    def training_step(self, batch, ctx: StepContext):
        x = batch.to(ctx.device, non_blocking=True)
        return _forward_loss(ctx.net, self.model, x, ctx.generator, ctx.amp_dtype, self.config.mask_ratio)

    def validation_step(self, batch, ctx: StepContext) -> dict[str, float]:
        x = batch.to(ctx.device, non_blocking=True)
        loss = _forward_loss(self.model, self.model, x, ctx.generator, ctx.amp_dtype, self.config.mask_ratio)
        return {"val_loss": float(loss), "n": int(x.shape[0])}

    def checkpoint_extras(self) -> dict:
        return {
            "normalization": self.normalization,
            "extra": {
                "train_files": [str(f) for f in self.data.train_files],
                "val_files": [str(f) for f in self.data.val_files],
            },
        }

    def describe(self) -> str:
        return self._description

    def config_json(self) -> dict:
        return self.config.to_json()
