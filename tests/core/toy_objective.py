"""A toy objective for the training loop's tests: no MAE, no images.

Regression of ``y = x @ w`` by a linear model, plus an extra module trained by the
objective itself with its own optimiser (as a discriminator would be), whose state goes
through :meth:`Objective.state_dict`. Its validation metric is an accuracy (higher is
better), so ``best.pt`` follows the objective's direction, not "lowest loss".
"""

from __future__ import annotations

import torch
from torch import nn

from napari_mae.training.loop import Objective


class _Config:
    def __init__(self, n_in: int):
        self.n_in = n_in

    def to_dict(self) -> dict:
        return {"n_in": self.n_in}


class ToyModel(nn.Linear):
    def __init__(self, n_in: int = 4):
        super().__init__(n_in, 1)
        self.config = _Config(n_in)


class ToyData(torch.utils.data.Dataset):
    """Samples that depend only on ``(seed, epoch, index)`` (as the MAE crops do)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.w = torch.arange(1.0, 5.0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch * 100 + i)
        x = torch.randn(4, generator=g)
        return {"x": x, "y": (x @ self.w).reshape(1)}


class ToyObjective(Objective):
    metric = "acc"
    higher_is_better = True
    metrics = ("acc", "mse")
    metric_labels = {"acc": "validation accuracy", "mse": "validation mse"}

    def __init__(self, n_train: int = 12, n_val: int = 4):
        self.n_train, self.n_val = n_train, n_val
        self.setups = 0

    def setup(self, ctx) -> None:
        self.setups += 1
        self.model = ToyModel()
        if ctx.checkpoint is not None:
            self.model.load_state_dict(ctx.checkpoint["state_dict"])
        self.model.to(ctx.device)
        self.extra = nn.Linear(1, 1).to(ctx.device)  # trained here, with its own optimiser
        self.extra_opt = torch.optim.SGD(self.extra.parameters(), lr=0.05, momentum=0.9)
        self.train_data = ToyData(self.n_train, ctx.seed)
        self.val_data = ToyData(self.n_val, ctx.seed + 1)

    def training_step(self, batch, ctx):
        x, y = batch["x"].to(ctx.device), batch["y"].to(ctx.device)
        pred = ctx.net(x)
        noise = torch.randn(y.shape, generator=ctx.generator, device=ctx.device) * 0.01
        # the extra module: one step of its own on a detached target, gradients averaged
        self.extra_opt.zero_grad()
        extra_loss = ((self.extra(pred.detach()) - y) ** 2).mean()
        extra_loss.backward()
        ctx.average_gradients(self.extra.parameters())
        self.extra_opt.step()
        return {"loss": ((pred - y - noise) ** 2).mean(), "extra_loss": float(extra_loss)}

    def validation_step(self, batch, ctx):
        x, y = batch["x"].to(ctx.device), batch["y"].to(ctx.device)
        err = (ctx.net(x) - y).abs()
        return {"acc": float((err < 1.0).float().mean()), "mse": float((err**2).mean()), "n": len(x)}

    def state_dict(self) -> dict:
        return {"extra": self.extra.state_dict(), "extra_opt": self.extra_opt.state_dict()}

    def load_state_dict(self, state) -> None:
        self.extra.load_state_dict(state["extra"])
        self.extra_opt.load_state_dict(state["extra_opt"])

    def describe(self) -> str:
        return "a toy regression"

    def config_json(self) -> dict:
        return {"toy": True}
