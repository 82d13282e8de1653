"""What the training loop optimises: one objective per kind of training.

:class:`MAEObjective` is masked-autoencoder pretraining and fine-tuning (He et al., *Masked
Autoencoders Are Scalable Vision Learners*, CVPR 2022): crops of image folders, a random
patch mask per sample drawn from the step's generator, the mean squared error over the
removed patches (:meth:`napari_mae.models.mae.MaskedAutoencoder.loss`). The loop
(:func:`napari_mae.training.loop.run`) owns everything else.

With ``TrainConfig.adversarial_weight > 0`` it also trains a discriminator of its own
(:class:`_Adversary`): a MONAI ``PatchDiscriminator`` that learns to tell real crops from
composites (removed patches replaced by the reconstruction), and the MAE loss gains its
least-squares generator term.
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
    """The loop's share of a :class:`~napari_mae.training.config.TrainConfig`.

    Loop settings that ``TrainConfig`` does not have keep the loop's defaults.
    """
    names = {f.name for f in dataclasses.fields(LoopConfig)} & {f.name for f in dataclasses.fields(cfg)}
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


def _forward(net, x, generator, autocast_dtype, mask_ratio=None):
    """Masked forward pass: ``(pred float32, mask)``."""
    import torch

    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    else:
        pred, mask = net(x, generator=generator, mask_ratio=mask_ratio)
    return pred.float(), mask


def _forward_loss(net, model, x, generator, autocast_dtype, mask_ratio=None):
    """Masked forward pass and MAE loss (float32). Separate so tests can patch it."""
    pred, mask = _forward(net, x, generator, autocast_dtype, mask_ratio)
    return model.loss(x, pred, mask)


#: The discriminator's Adam: the learning rate and betas of pix2pix's patch GAN (Isola et
#: al., *Image-to-Image Translation with Conditional Adversarial Networks*, CVPR 2017,
#: after DCGAN, Radford et al., ICLR 2016). beta1 = 0.5 rather than 0.9 damps the momentum
#: that makes the two players oscillate. Constant: no warm-up or decay.
DISCRIMINATOR_LR = 2.0e-4
DISCRIMINATOR_BETAS = (0.5, 0.999)


class _Adversary:
    """The discriminator, its optimiser and its grad scaler, stepped once per MAE step.

    Loss: the least-squares GAN (Mao et al., *Least Squares Generative Adversarial
    Networks*, ICCV 2017) through MONAI's ``PatchAdversarialLoss`` (see
    :meth:`~napari_mae.models.mae.MaskedAutoencoder.discriminator_loss` and
    :meth:`~napari_mae.models.mae.MaskedAutoencoder.adversarial_loss`); chosen over the
    non-saturating loss because its gradients do not vanish for composites the
    discriminator already rejects with confidence, and it is the loss MONAI's own patch
    GAN examples use.

    Order within a step (as pix2pix): the MAE's forward pass, one discriminator update on
    real crops against the detached composites, then the generator term with the updated
    discriminator (its parameters frozen, so the MAE loss's backward leaves them alone).
    Under ``torchrun`` the discriminator's gradients are averaged across processes
    (:meth:`StepContext.average_gradients`) before its step, so every copy stays equal;
    its BatchNorm running statistics may differ between processes, but the
    discriminator is only ever run in training mode, which does not read them.
    Clipping: the run's ``grad_clip`` on the discriminator's own gradient norm; a
    non-finite norm skips its update (the same decision on every process: the
    gradients were averaged first). Mixed precision: its forward passes run under the
    run's autocast; float16 gets a grad scaler of its own.
    """

    def __init__(self, model, device, seed: int, grad_clip: float | None):
        import torch

        from napari_mae.models.mae import build_discriminator

        # Its own seed, so its initial weights do not depend on what the model or data
        # drew from the global generator before (and are the same on every process).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_discriminator(model.config).to(device)
        self.net.train()
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=DISCRIMINATOR_LR, betas=DISCRIMINATOR_BETAS
        )
        self.grad_clip = grad_clip
        self.scaler = None  # made at the first step, when the run's AMP dtype is known
        self._scaler_state: dict = {}

    def _ensure_scaler(self, ctx: StepContext):
        import torch

        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
            if self._scaler_state and self.scaler.is_enabled():
                self.scaler.load_state_dict(self._scaler_state)
        return self.scaler

    def step(self, model, x, pred, mask, ctx: StepContext) -> tuple[float, bool]:
        """One update on real ``x`` against composites of ``pred``; ``(loss, applied)``."""
        import math

        import torch

        scaler = self._ensure_scaler(ctx)
        params = list(self.net.parameters())
        for p in params:
            p.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = model.discriminator_loss(self.net, x, pred.detach(), mask)
        scaler.scale(loss).backward()
        ctx.average_gradients(params)
        scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else math.inf)
        if scaler.is_enabled():  # float16: the scaler skips a non-finite step itself, and lowers its scale
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            applied = scaler.get_scale() >= scale
        else:
            applied = bool(torch.isfinite(norm))
            if applied:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)  # the generator term's backward must not reach them
        return float(loss.detach()), applied

    def generator_loss(self, model, x, pred, mask, ctx: StepContext):
        """The unweighted generator term, gradients to ``pred`` only."""
        with ctx.autocast():
            return model.adversarial_loss(self.net, x, pred, mask).float()

    def state_dict(self) -> dict:
        scaler = self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else {}
        return {
            "discriminator": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler or dict(self._scaler_state),
        }

    def load_state_dict(self, state) -> None:
        self.net.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scaler_state = dict(state.get("scaler") or {})
        self.scaler = None


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
    removed patches of the validation crops, masks seeded per batch; never the
    adversarial term, which depends on the discriminator of the moment).

    With ``config.adversarial_weight > 0`` the training loss is
    ``MAE loss + adversarial_weight * L_adv`` and a discriminator trains alongside
    (:class:`_Adversary`); each step's update reports ``mse``, ``adversarial`` and
    ``d_loss`` in its ``metrics``. The discriminator and its optimiser are kept in
    ``last.pt``'s training state (for ``resume``), not in the model: checkpoints load
    as before and the model's own ``config.adversarial_weight`` stays 0.
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
        self.adversary: _Adversary | None = None

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
        if mconf.adversarial_weight not in (0.0, cfg.adversarial_weight):
            raise ValueError(
                f"the model config has adversarial_weight={mconf.adversarial_weight}; training reads "
                f"TrainConfig.adversarial_weight (now {cfg.adversarial_weight}): set that instead"
            )
        if mconf.adversarial_weight:
            # The weight is a training setting (TrainConfig); the model saved stays free of it, so
            # its loss() needs no discriminator wherever it is loaded.
            model.config = dataclasses.replace(mconf, adversarial_weight=0.0)
        model.to(ctx.device)
        self.adversary = (
            _Adversary(model, ctx.device, cfg.seed, cfg.grad_clip) if cfg.adversarial_weight > 0 else None
        )
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
        skipped = f"; skipped {len(data.skipped)} unusable" if data.skipped else ""
        n_train, n_val = len(data.train_files), len(data.val_files)
        self._description = (
            f"{model_desc} ({spatial_dims}D, crops {img_size}) on {n_train} image{'s' * (n_train != 1)} "
            f"for training and {n_val} for validation{skipped}"
        )

    def training_step(self, batch, ctx: StepContext):
        x = batch.to(ctx.device, non_blocking=True)
        if self.adversary is None:
            return _forward_loss(ctx.net, self.model, x, ctx.generator, ctx.amp_dtype, self.config.mask_ratio)
        pred, mask = _forward(ctx.net, x, ctx.generator, ctx.amp_dtype, self.config.mask_ratio)
        d_loss, _ = self.adversary.step(self.model, x, pred, mask, ctx)
        mse = self.model.loss(x, pred, mask)
        adversarial = self.adversary.generator_loss(self.model, x, pred, mask, ctx)
        return {
            "loss": mse + self.config.adversarial_weight * adversarial,
            "mse": float(mse.detach()),
            "adversarial": float(adversarial.detach()),
            "d_loss": d_loss,
        }

    def validation_step(self, batch, ctx: StepContext) -> dict[str, float]:
        x = batch.to(ctx.device, non_blocking=True)
        loss = _forward_loss(self.model, self.model, x, ctx.generator, ctx.amp_dtype, self.config.mask_ratio)
        return {"val_loss": float(loss), "n": int(x.shape[0])}

    def state_dict(self) -> dict:
        return {"adversary": self.adversary.state_dict()} if self.adversary is not None else {}

    def load_state_dict(self, state) -> None:
        if self.adversary is None:
            if "adversary" in state:
                warnings.warn(
                    "resuming with adversarial_weight 0 a run that trained a discriminator: the discriminator "
                    "is dropped and the run is no longer an exact continuation",
                    UserWarning,
                    stacklevel=2,
                )
            return
        if "adversary" not in state:
            raise ValueError(
                "the run being resumed trained without the adversarial term (adversarial_weight 0): resume it "
                "with adversarial_weight 0, or start a new run from its checkpoint"
            )
        self.adversary.load_state_dict(state["adversary"])

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
