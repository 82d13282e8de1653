"""The masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

Built on MONAI's :class:`~monai.networks.nets.MaskedAutoEncoderViT` (its patch
embedding, transformer blocks, decoder and sin-cos position embeddings), which
we extend in one way: MONAI draws its mask inside ``forward`` with
``torch.multinomial`` from the global CPU RNG and cannot take a given mask.
:class:`MaskedAutoencoder` takes either a mask (from :mod:`napari_mae.masking`,
the mask a user sees in the viewer) or a ``torch.Generator`` (seeded,
reproducible training), so the mask that is shown is the mask that is
reconstructed.

Token order is MONAI's: the patch grid ``(gy, gx)`` or ``(gz, gy, gx)`` flattened
in C order (the order of ``Conv(stride=patch).flatten(2)``). Inside a token,
:meth:`MaskedAutoencoder.patchify` orders pixels as ``(pz, py, px, C)`` like
MONAI's ``perceptron`` patch embedding (``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``).

Mask convention (paper sec. 3): ``True`` / 1 = removed, ``False`` / 0 = visible.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

from napari_mae._names import BUNDLED_MODELS, WEIGHTS_DIR
from napari_mae.masking import check_mask_ratio, n_removed, normalize_patch_size

__all__ = [
    "DEFAULT_NORMALIZATION",
    "amp_dtype",
    "PRESETS",
    "MAEConfig",
    "MaskedAutoencoder",
    "autocast",
    "build_discriminator",
    "build_model",
    "check_compatible",
    "load_model",
    "model_from_checkpoint",
    "resolve_device",
]

#: Folder of the bundled weights (:data:`napari_mae._names.WEIGHTS_DIR`); tests point it elsewhere.
MODELS_DIR = WEIGHTS_DIR

#: Intensity normalisation the models are trained with (see :mod:`napari_mae.preprocess`).
DEFAULT_NORMALIZATION: dict[str, Any] = {"method": "percentile", "lower": 1.0, "upper": 99.8}

_POS_EMBED_TYPES = ("sincos", "learnable", "none")
_PROJ_TYPES = ("conv", "perceptron")


@dataclass(frozen=True)
class MAEConfig:
    """Architecture and loss of a masked autoencoder, validated on construction.

    Names follow the MAE paper and its code (``embed_dim``, ``depth``, ...);
    :class:`MaskedAutoencoder` maps them to MONAI's (``hidden_size``,
    ``num_layers``, ...).

    Parameters
    ----------
    img_size : tuple of int
        Model input ``(Y, X)`` or ``(Z, Y, X)`` in pixels; the sliding window of
        :func:`napari_mae.reconstruction.reconstruct`. Its length sets ``spatial_dims``.
    patch_size : int or tuple of int
        Pixels per patch along each axis; must divide ``img_size``. Anisotropic
        sizes such as ``(2, 16, 16)`` are fine.
    in_channels : int
        Image channels C.
    embed_dim, depth, num_heads : int
        Encoder width, number of transformer blocks, attention heads.
    mlp_ratio : float
        MLP hidden width relative to ``embed_dim`` (encoder and decoder).
    decoder_embed_dim, decoder_depth, decoder_num_heads : int
        The lightweight decoder (paper sec. 3, "MAE decoder").
    mask_ratio : float
        Default fraction of patches removed, in [0, 1); 0.75 in the paper.
    norm_pix_loss : bool
        Target is each patch normalised by its own mean and std (paper sec. 3,
        "Reconstruction target"), which improves the representation.
    pos_embed_type, decoder_pos_embed_type : {"sincos", "learnable", "none"}
        MONAI's sin-cos embedding needs the width divisible by 4 in 2D and 6 in 3D.
    proj_type : {"conv", "perceptron"}
        MONAI's patch projection.
    qkv_bias : bool
        Bias in the attention projections (True in the MAE code).
    dropout_rate : float
        In [0, 1).
    adversarial_weight : float
        Weight of the optional adversarial term (a MONAI ``PatchDiscriminator``
        judging reconstructions, :func:`build_discriminator`). 0 by default,
        which is the plain MAE loss of the paper.
    name : str
        Preset name or "custom"; informational.

    Raises
    ------
    ValueError
        Naming the bad value, for anything MONAI or the loss cannot take.
    """

    img_size: tuple[int, ...] = (64, 64)
    patch_size: tuple[int, ...] = (8, 8)
    in_channels: int = 1
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 96
    decoder_depth: int = 2
    decoder_num_heads: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    pos_embed_type: str = "sincos"
    decoder_pos_embed_type: str = "sincos"
    proj_type: str = "conv"
    qkv_bias: bool = True
    dropout_rate: float = 0.0
    adversarial_weight: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (int, np.integer)):
            raise ValueError(
                f"img_size={self.img_size} must be a tuple (Y, X) or (Z, Y, X), one size per axis"
            )
        img = tuple(int(s) for s in self.img_size)
        if len(img) not in (2, 3):
            raise ValueError(f"img_size={img} must have 2 (Y, X) or 3 (Z, Y, X) entries")
        if any(s < 1 for s in img):
            raise ValueError(f"img_size={img} must be positive")
        patch = normalize_patch_size(self.patch_size, len(img))
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "patch_size", patch)
        for s, p in zip(img, patch):
            if s % p:
                raise ValueError(f"patch_size={patch} must divide img_size={img}")
        for field in (
            "in_channels",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_embed_dim",
            "decoder_num_heads",
        ):
            value = getattr(self, field)
            if int(value) != value or value < 1:
                raise ValueError(f"{field}={value} must be a positive integer")
        if int(self.decoder_depth) != self.decoder_depth or self.decoder_depth < 0:
            raise ValueError(f"decoder_depth={self.decoder_depth} must be a non-negative integer")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={self.decoder_embed_dim} must be divisible by "
                f"decoder_num_heads={self.decoder_num_heads}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive")
        for field in ("pos_embed_type", "decoder_pos_embed_type"):
            if getattr(self, field) not in _POS_EMBED_TYPES:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {_POS_EMBED_TYPES}")
        if self.proj_type not in _PROJ_TYPES:
            raise ValueError(f"proj_type={self.proj_type!r} is not one of {_PROJ_TYPES}")
        # MONAI's build_sincos_position_embedding splits the width into sin/cos
        # pairs per axis and only raises an AssertionError deep inside.
        divisor = 4 if len(img) == 2 else 6
        for field, kind in (("embed_dim", "pos_embed_type"), ("decoder_embed_dim", "decoder_pos_embed_type")):
            if getattr(self, kind) == "sincos" and getattr(self, field) % divisor:
                raise ValueError(
                    f"{field}={getattr(self, field)} must be divisible by {divisor} for the {len(img)}D sin-cos "
                    f"position embedding (e.g. {getattr(self, field) // divisor * divisor or divisor}), "
                    f"or use {kind}='learnable'"
                )
        check_mask_ratio(self.mask_ratio)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if not self.adversarial_weight >= 0.0:
            raise ValueError(
                f"adversarial_weight={self.adversarial_weight} must be >= 0 (0 disables the term)"
            )

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.img_size)

    @property
    def grid_size(self) -> tuple[int, ...]:
        """Patches per axis of one model input."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    @property
    def n_patches(self) -> int:
        """Tokens per model input."""
        return math.prod(self.grid_size)

    @property
    def patch_dim(self) -> int:
        """Values per token: ``prod(patch_size) * in_channels``."""
        return math.prod(self.patch_size) * self.in_channels

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (for checkpoints loaded with ``weights_only=True``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MAEConfig:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            For unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MAEConfig keys {unknown}; known keys are {sorted(known)}")
        values = dict(data)
        for key in ("img_size", "patch_size"):
            if key in values and not isinstance(values[key], (int, np.integer)):
                values[key] = tuple(values[key])
        return cls(**values)


#: Named architectures. All are CPU-trainable; the bundled default models use
#: ``tiny-2d`` and ``tiny-3d`` (about 7 MB each as float32).
PRESETS: dict[str, MAEConfig] = {
    "tiny-2d": MAEConfig(
        img_size=(64, 64),
        patch_size=(8, 8),
        embed_dim=192,
        depth=4,
        num_heads=3,
        decoder_embed_dim=96,
        decoder_depth=2,
        decoder_num_heads=3,
        name="tiny-2d",
    ),
    "small-2d": MAEConfig(
        img_size=(128, 128),
        patch_size=(16, 16),
        embed_dim=384,
        depth=6,
        num_heads=6,
        decoder_embed_dim=192,
        decoder_depth=2,
        decoder_num_heads=6,
        name="small-2d",
    ),
    "tiny-3d": MAEConfig(
        img_size=(16, 64, 64),
        patch_size=(4, 8, 8),
        embed_dim=192,
        depth=4,
        num_heads=3,
        decoder_embed_dim=96,
        decoder_depth=2,
        decoder_num_heads=3,
        name="tiny-3d",
    ),
    "small-3d": MAEConfig(
        img_size=(32, 128, 128),
        patch_size=(4, 16, 16),
        embed_dim=384,
        depth=6,
        num_heads=6,
        decoder_embed_dim=192,
        decoder_depth=2,
        decoder_num_heads=6,
        name="small-3d",
    ),
}


class MaskedAutoencoder(MaskedAutoEncoderViT):
    """MONAI's ``MaskedAutoEncoderViT`` driven by a given mask or ``torch.Generator``.

    Parameters
    ----------
    config : MAEConfig
        The architecture.

    Attributes
    ----------
    config : MAEConfig
    normalization : dict
        How inputs must be normalised (see :mod:`napari_mae.preprocess`);
        restored from checkpoints.

    Notes
    -----
    Inputs are ``(B, C, *img_size)`` float tensors, intensity-normalised (1st and
    99.8th percentiles at 0 and 1). The encoder sees only the visible tokens
    (paper sec. 3, "MAE encoder"); samples of a batch may have different numbers
    of visible tokens, which are then padded and excluded from attention with a
    key mask, so results do not depend on how windows are batched.
    """

    def __init__(self, config: MAEConfig) -> None:
        # MONAI's sin-cos embedding calls torch.meshgrid without indexing= (it
        # means "ij", the default), which warns on every model built.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.meshgrid", category=UserWarning)
            self._build(config)
        self.config = config
        self.normalization: dict[str, Any] = dict(DEFAULT_NORMALIZATION)
        self._init_mae_weights()

    def _build(self, config: MAEConfig) -> None:
        super().__init__(
            in_channels=config.in_channels,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.embed_dim,
            mlp_dim=int(round(config.embed_dim * config.mlp_ratio)),
            num_layers=config.depth,
            num_heads=config.num_heads,
            # MONAI rejects 0 here; its own _masking is never used by this class.
            masking_ratio=config.mask_ratio if 0.0 < config.mask_ratio < 1.0 else 0.75,
            decoder_hidden_size=config.decoder_embed_dim,
            decoder_mlp_dim=int(round(config.decoder_embed_dim * config.mlp_ratio)),
            decoder_num_layers=config.decoder_depth,
            decoder_num_heads=config.decoder_num_heads,
            proj_type=config.proj_type,
            pos_embed_type=config.pos_embed_type,
            decoder_pos_embed_type=config.decoder_pos_embed_type,
            dropout_rate=config.dropout_rate,
            spatial_dims=config.spatial_dims,
            qkv_bias=config.qkv_bias,
        )

    # ------------------------------------------------------------------ setup
    def _init_mae_weights(self) -> None:
        """Initialise as the MAE code does (``models_mae.py``, ``initialize_weights``).

        MONAI leaves transformer ``nn.Linear`` layers at PyTorch's default; MAE
        uses Xavier-uniform for them and initialises the patch projection like
        a linear layer, which trains more stably at these small widths.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embedding.patch_embeddings
        if isinstance(proj, (nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.cls_token.device

    # ------------------------------------------------------------- patchify
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Cut images into tokens in MONAI's token order.

        Parameters
        ----------
        x : Tensor, shape (B, C, *spatial)
            Each spatial size a multiple of ``patch_size`` (any multiple, not only ``img_size``).

        Returns
        -------
        Tensor, shape (B, N, prod(patch_size) * C)
            ``N = prod(spatial / patch_size)`` in C order over the grid; values
            inside a token ordered ``(pz, py, px, C)``.

        Raises
        ------
        ValueError
            If a spatial size is not a multiple of the patch size.
        """
        patch = self.config.patch_size
        d = len(patch)
        b, c, *spatial = x.shape
        if len(spatial) != d or any(s % p for s, p in zip(spatial, patch)):
            raise ValueError(
                f"patchify needs (B, C, *spatial) with spatial a multiple of {patch}, got {tuple(x.shape)}"
            )
        grid = [s // p for s, p in zip(spatial, patch)]
        x = x.reshape(b, c, *[v for gp in zip(grid, patch) for v in gp])  # (B, C, g0, p0, g1, p1, ...)
        order = [0, *(2 + 2 * i for i in range(d)), *(3 + 2 * i for i in range(d)), 1]
        x = x.permute(order)  # (B, g0, g1, ..., p0, p1, ..., C)
        return x.reshape(b, math.prod(grid), math.prod(patch) * c)  # (B, N, P*C)

    def unpatchify(self, tokens: torch.Tensor, grid_size: Sequence[int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`patchify`.

        Parameters
        ----------
        tokens : Tensor, shape (B, N, prod(patch_size) * C)
        grid_size : sequence of int, optional
            Patches per axis; defaults to the model's ``config.grid_size``.

        Returns
        -------
        Tensor, shape (B, C, *(grid_size * patch_size))

        Raises
        ------
        ValueError
            If ``N`` or the token width do not match.
        """
        patch = self.config.patch_size
        d = len(patch)
        grid = tuple(grid_size) if grid_size is not None else self.config.grid_size
        b, n, width = tokens.shape
        c = width // math.prod(patch)
        if n != math.prod(grid) or width != c * math.prod(patch):
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit grid {grid} and patch {patch}"
            )
        x = tokens.reshape(b, *grid, *patch, c)  # (B, g0, g1, ..., p0, p1, ..., C)
        order = [0, 1 + 2 * d, *(v for i in range(d) for v in (1 + i, 1 + d + i))]
        x = x.permute(order)  # (B, C, g0, p0, g1, p1, ...)
        return x.reshape(b, c, *(g * p for g, p in zip(grid, patch)))

    # ---------------------------------------------------------------- masks
    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.config.in_channels, *self.config.img_size)
        if x.ndim != 2 + self.config.spatial_dims or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model, which takes (B, {', '.join(map(str, expected))}); "
                "tile larger images with napari_mae.reconstruction.reconstruct"
            )

    def random_mask(
        self,
        batch_size: int,
        *,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Per-sample random masks with exactly ``round(mask_ratio * N)`` removed tokens.

        As ``random_masking`` in the MAE code: per-sample argsort of uniform noise,
        the lowest ``N - k`` noise values kept.

        Parameters
        ----------
        batch_size : int
        mask_ratio : float, optional
            In [0, 1); defaults to ``config.mask_ratio``.
        generator : torch.Generator, optional
            Drives the noise (drawn on the generator's device); the global RNG if None.
        device : torch.device, optional
            Device of the returned mask; the model's by default.

        Returns
        -------
        Tensor of bool, shape (B, N); True = removed.
        """
        ratio = check_mask_ratio(self.config.mask_ratio if mask_ratio is None else mask_ratio)
        n = self.config.n_patches
        k = n_removed(n, ratio)
        device = torch.device(device) if device is not None else self.device
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, n, generator=generator, device=noise_device).to(device)  # (B, N)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        mask = torch.zeros(batch_size, n, dtype=torch.bool, device=device)
        mask.scatter_(1, ids_shuffle[:, n - k :], True)  # (B, N), removed = largest noise
        return mask

    def _as_token_mask(self, mask: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        grid = self.config.grid_size
        n = self.config.n_patches
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        shape = tuple(m.shape)
        if shape in ((n,), grid):
            m = m.reshape(1, n).expand(batch_size, n)
        elif shape in ((batch_size, n), (batch_size, *grid)):
            m = m.reshape(batch_size, n)
        else:
            raise ValueError(
                f"mask of shape {shape} does not fit: expected the patch grid {grid}, ({n},), "
                f"({batch_size}, {n}) or ({batch_size}, {', '.join(map(str, grid))})"
            )
        return (m != 0).to(device)

    # -------------------------------------------------------------- forward
    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible tokens only (paper sec. 3, "MAE encoder").

        Parameters
        ----------
        x : Tensor, shape (B, C, *img_size)
        mask : Tensor of bool, shape (B, N); True = removed.

        Returns
        -------
        latent : Tensor, shape (B, 1 + L, embed_dim)
            Class token then the visible tokens in grid order; ``L`` is the
            largest visible count of the batch (shorter samples are padded).
        ids_keep : Tensor of int64, shape (B, L)
            Grid index of each latent token (padding points at removed tokens).
        """
        tokens = self.patch_embedding(x)  # (B, N, D), position embedding added
        b, n, dim = tokens.shape
        n_keep = (~mask).sum(dim=1)  # (B,)
        # Stable sort puts visible tokens first, each group in grid order.
        ids_shuffle = torch.argsort(mask.to(torch.int32), dim=1, stable=True)  # (B, N)
        n_max = int(n_keep.max()) if b else 0
        n_min = int(n_keep.min()) if b else 0
        ids_keep = ids_shuffle[:, :n_max]  # (B, L)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # (B, L, D)
        h = torch.cat([self.cls_token.expand(b, -1, -1), visible], dim=1)  # (B, 1 + L, D)
        attn_mask = None
        if n_min != n_max:
            valid = torch.arange(n_max, device=x.device).unsqueeze(0) < n_keep.unsqueeze(1)  # (B, L)
            # (B, 1 + L); the class token is always valid
            attn_mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        for block in self.blocks[:-1]:
            h = block(h, attn_mask=attn_mask)
        h = self.blocks[-1](h)  # final LayerNorm
        return h, ids_keep

    def forward_decoder(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Decode the full token set (paper sec. 3, "MAE decoder").

        Parameters
        ----------
        latent : Tensor, shape (B, 1 + L, embed_dim)
        ids_keep : Tensor of int64, shape (B, L)
        mask : Tensor of bool, shape (B, N)

        Returns
        -------
        pred : Tensor, shape (B, N, prod(patch_size) * C)
            Every token's predicted pixels (normalised per patch if ``norm_pix_loss``).
        """
        h = self.decoder_embed(latent)  # (B, 1 + L, Dd)
        b, _, dim = h.shape
        n = mask.shape[1]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, dim)  # (B, L, Dd)
        full = torch.zeros(b, n, dim, dtype=h.dtype, device=h.device)
        full = full.scatter(1, index, h[:, 1:])  # (B, N, Dd)
        # Padding slots of ids_keep point at removed tokens; the mask token overwrites them.
        full = torch.where(mask.unsqueeze(-1), self.mask_tokens.to(full.dtype), full)  # (B, N, Dd)
        full = full + self.decoder_pos_embedding
        h = torch.cat([h[:, :1], full], dim=1)  # (B, 1 + N, Dd)
        h = self.decoder_blocks(h)
        return self.decoder_pred(h)[:, 1:]  # (B, N, P*C), class token dropped

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: Any = None,
        generator: torch.Generator | None = None,
        *,
        mask_ratio: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode the visible tokens, decode all tokens.

        Parameters
        ----------
        x : Tensor of float, shape (B, C, *img_size)
            Intensity-normalised images.
        mask : array_like of bool, optional
            1 = removed; shape ``grid_size``, ``(N,)``, ``(B, N)`` or ``(B, *grid_size)``
            (a grid from :func:`napari_mae.masking.make_mask`). Samples may
            remove different numbers of tokens.
        generator : torch.Generator, optional
            Used if ``mask`` is None: random masks of exactly
            ``round(mask_ratio * N)`` removed tokens per sample (:meth:`random_mask`).
        mask_ratio : float, optional
            For the random mask; ``config.mask_ratio`` by default.

        Returns
        -------
        pred : Tensor, shape (B, N, prod(patch_size) * C)
        mask : Tensor of bool, shape (B, N); True = removed.

        Raises
        ------
        ValueError
            If ``x`` or ``mask`` has the wrong shape, or ``mask_ratio`` is outside [0, 1).
        """
        self._check_input(x)
        if mask is None:
            mask = self.random_mask(x.shape[0], mask_ratio=mask_ratio, generator=generator, device=x.device)
        else:
            mask = self._as_token_mask(mask, x.shape[0], x.device)
        latent, ids_keep = self.forward_encoder(x, mask)
        pred = self.forward_decoder(latent, ids_keep, mask)
        return pred, mask

    # ----------------------------------------------------------------- loss
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction target per token (paper sec. 3, "Reconstruction target").

        Returns
        -------
        Tensor, shape (B, N, prod(patch_size) * C)
            ``patchify(x)``, normalised per patch by its mean and standard deviation
            (over all its pixels and channels, eps 1e-6 as in the MAE code) if
            ``config.norm_pix_loss``.
        """
        target = self.patchify(x).float()
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        mask: torch.Tensor,
        *,
        discriminator: nn.Module | None = None,
    ) -> torch.Tensor:
        """Mean squared error over the removed patches only (paper sec. 3).

        ``loss = sum_i m_i * mean_j (pred_ij - target_ij)^2 / sum_i m_i`` over
        tokens ``i`` and their values ``j``; visible tokens do not contribute
        (not even NaN predictions). With ``config.adversarial_weight > 0`` the
        generator term of a least-squares patch GAN is added:
        ``loss += adversarial_weight * L_adv(D(composite))``.

        Parameters
        ----------
        x : Tensor, shape (B, C, *img_size)
            The (normalised) input images.
        pred : Tensor, shape (B, N, prod(patch_size) * C)
        mask : Tensor of bool or float, shape (B, N); 1 = removed.
        discriminator : nn.Module, optional
            From :func:`build_discriminator`; required if ``adversarial_weight > 0``.

        Returns
        -------
        Tensor, scalar float32
            0 if no patch is removed (``mask_ratio=0``).

        Raises
        ------
        ValueError
            If ``adversarial_weight > 0`` and no discriminator is given.
        """
        target = self.target(x)  # (B, N, P*C)
        removed = mask.to(torch.bool)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
        per_patch = torch.where(removed, per_patch, torch.zeros_like(per_patch))
        loss = per_patch.sum() / removed.sum().clamp_min(1)
        if self.config.adversarial_weight > 0:
            if discriminator is None:
                raise ValueError(
                    f"adversarial_weight={self.config.adversarial_weight} needs "
                    "discriminator=build_discriminator(model.config); set it to 0 to train without"
                )
            loss = loss + self.config.adversarial_weight * self.adversarial_loss(discriminator, x, pred, mask)
        return loss

    def adversarial_loss(
        self, discriminator: nn.Module, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Generator term of the least-squares patch GAN, unweighted: ``mean((D(composite) - 1)^2)``.

        Least-squares GAN: Mao et al., *Least Squares Generative Adversarial Networks*,
        ICCV 2017; MONAI's ``PatchAdversarialLoss(criterion="least_squares")``. Gradients
        reach ``pred`` through the composite (removed patches from ``pred``, visible ones
        from ``x``, :meth:`composite`).

        Parameters
        ----------
        discriminator : nn.Module
            From :func:`build_discriminator`.
        x : Tensor, shape (B, C, *img_size)
        pred : Tensor, shape (B, N, prod(patch_size) * C)
        mask : Tensor of bool or float, shape (B, N); 1 = removed.

        Returns
        -------
        Tensor, scalar float32
        """
        from monai.losses import PatchAdversarialLoss

        logits = discriminator(self.composite(x, pred, mask))[-1]
        return PatchAdversarialLoss(criterion="least_squares")(
            logits.float(), target_is_real=True, for_discriminator=False
        )

    def discriminator_loss(
        self, discriminator: nn.Module, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Least-squares patch-GAN loss for the discriminator's own optimiser step.

        Real images ``x`` against composites of ``pred`` (detached), averaged.

        Returns
        -------
        Tensor, scalar
        """
        from monai.losses import PatchAdversarialLoss

        criterion = PatchAdversarialLoss(criterion="least_squares")
        fake = discriminator(self.composite(x, pred.detach(), mask))[-1].float()
        real = discriminator(x)[-1].float()
        return 0.5 * (
            criterion(real, target_is_real=True, for_discriminator=True)
            + criterion(fake, target_is_real=False, for_discriminator=True)
        )

    def composite(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Image with removed patches replaced by the prediction (visible ones from ``x``).

        With ``norm_pix_loss`` the predictions are put back into intensity units
        with each patch's true mean and std, so this is for training (the
        adversarial term), not for inference where those are unknown.

        Returns
        -------
        Tensor, shape (B, C, *img_size)
        """
        tokens = self.patchify(x)  # (B, N, P*C)
        pred = pred.to(tokens.dtype)
        if self.config.norm_pix_loss:
            mean = tokens.mean(dim=-1, keepdim=True)
            std = (tokens.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        out = torch.where(mask.to(torch.bool).unsqueeze(-1), pred, tokens)
        return self.unpatchify(out)

    # ------------------------------------------------------------- features
    def encoder_features(self, x: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
        """Token features of the unmasked encoder at the given blocks, as images.

        Parameters
        ----------
        x : Tensor of float, shape (B, C, *img_size)
            Intensity-normalised images.
        depths : sequence of int
            Transformer block indices, 0-based; negative counts from the end
            (-1 = last block). The outputs are the blocks' own (before the
            encoder's final LayerNorm).

        Returns
        -------
        list of Tensor, each shape (B, embed_dim, *grid_size)
            In the order of ``depths``; one feature vector per patch.

        Raises
        ------
        ValueError
            If ``x`` does not fit the model or a depth is out of range.
        """
        self._check_input(x)
        n_blocks = self.config.depth
        wanted = []
        for d in depths:
            if not -n_blocks <= int(d) < n_blocks:
                raise ValueError(f"depth {d} is out of range for an encoder of {n_blocks} blocks")
            wanted.append(int(d) % n_blocks)
        h = self.patch_embedding(x)  # (B, N, D)
        b, _, dim = h.shape
        h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)  # (B, 1 + N, D)
        found: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:-1]):
            if i > max(wanted, default=-1):
                break
            h = block(h)
            if i in wanted:
                found[i] = h[:, 1:]  # (B, N, D)
        grid = self.config.grid_size
        return [found[i].transpose(1, 2).reshape(b, dim, *grid) for i in wanted]  # (B, D, *grid)


def build_discriminator(config: MAEConfig, *, channels: int = 32, num_layers_d: int = 2) -> nn.Module:
    """MONAI ``PatchDiscriminator`` for the optional adversarial term.

    Parameters
    ----------
    config : MAEConfig
        Gives ``spatial_dims`` and ``in_channels``.
    channels, num_layers_d : int
        Width and number of strided layers of the discriminator.

    Returns
    -------
    monai.networks.nets.PatchDiscriminator
        Train it with :meth:`MaskedAutoencoder.discriminator_loss` and its own optimiser.
    """
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=config.spatial_dims,
        channels=channels,
        in_channels=config.in_channels,
        num_layers_d=num_layers_d,
    )


def build_model(config_or_preset: MAEConfig | str | Mapping[str, Any], **overrides: Any) -> MaskedAutoencoder:
    """A freshly initialised model.

    Parameters
    ----------
    config_or_preset : MAEConfig, preset name or dict
        A name in :data:`PRESETS` (``"tiny-2d"``, ``"small-2d"``, ``"tiny-3d"``, ``"small-3d"``).
    **overrides
        Config fields to replace, e.g. ``in_channels=3``.

    Returns
    -------
    MaskedAutoencoder
        In training mode, on the CPU, initialised from torch's global RNG.

    Raises
    ------
    ValueError
        For an unknown preset or invalid config values.
    """
    if isinstance(config_or_preset, str):
        if config_or_preset not in PRESETS:
            raise ValueError(f"unknown preset {config_or_preset!r}; presets are {sorted(PRESETS)}")
        config = PRESETS[config_or_preset]
    elif isinstance(config_or_preset, MAEConfig):
        config = config_or_preset
    elif isinstance(config_or_preset, Mapping):
        config = MAEConfig.from_dict(config_or_preset)
    else:
        raise ValueError(
            f"expected an MAEConfig, a preset name or a dict, got {type(config_or_preset).__name__}"
        )
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return MaskedAutoencoder(config)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Pick a torch device: ``"auto"`` = CUDA, then Apple MPS, then CPU.

    Raises
    ------
    ValueError
        If an explicit CUDA or MPS device is requested but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'mps'"
            ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(dev)!r} requested but CUDA is not available; use device='auto' or 'cpu'"
        )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                "device='mps' requested but Apple MPS is not available; use device='auto' or 'cpu'"
            )
    return dev


def amp_dtype(device: torch.device, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The reduced precision for ``device``, or None where float32 is the better choice.

    CUDA: bfloat16 where supported, else float16 (which needs a grad scaler to train);
    MPS: float16. CPU: bfloat16 only with ``cpu_bf16`` *and* native bfloat16 dot products
    (AVX512-BF16 or AMX; measured 2.2x faster for the encoder on such a CPU), float32
    otherwise (emulated bfloat16 is slower than float32).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and cpu_bf16 and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool = True, *, cpu_bf16: bool = False):
    """Reduced-precision context on ``device``, in the dtype of :func:`amp_dtype`.

    Parameters
    ----------
    device : torch.device
    enabled : bool
        False always gives float32.
    cpu_bf16 : bool
        Allow bfloat16 on CPU (for features, whose precision matters little).

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast``, or a null context when disabled or unsupported.
    """
    import contextlib

    dtype = amp_dtype(device, cpu_bf16=cpu_bf16) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype)
    except RuntimeError:  # older torch without autocast on this device: run float32
        return contextlib.nullcontext()


def _cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except Exception:  # noqa: BLE001 - private torch helpers: any failure means "unknown", i.e. no
        return False


def check_compatible(
    config: MAEConfig,
    *,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    source: str = "model",
) -> None:
    """Raise a ``ValueError`` saying so if a model cannot take an image of this kind.

    Parameters
    ----------
    config : MAEConfig
    spatial_dims : int, optional
        2 or 3, the image's.
    in_channels : int, optional
        The image's channel count.
    source : str
        How to name the model in the message (e.g. a checkpoint path).
    """
    if spatial_dims is not None and spatial_dims != config.spatial_dims:
        raise ValueError(
            f"{source} is a {config.spatial_dims}D model (img_size {config.img_size}) but the image is "
            f"{spatial_dims}D; use a {spatial_dims}D model (e.g. 'default-{spatial_dims}d' or preset "
            f"'tiny-{spatial_dims}d')"
        )
    if in_channels is not None and in_channels != config.in_channels:
        raise ValueError(
            f"{source} takes {config.in_channels} channel(s) but the image has {in_channels}; use a model "
            f"trained on {in_channels}-channel images, or pass channel_axis= if the channels were guessed wrong"
        )


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    spatial_dims: int | None = None,
    in_channels: int | None = None,
) -> Any:
    """Build the model a checkpoint describes and load its weights.

    Parameters
    ----------
    checkpoint : mapping
        From :func:`napari_mae.io.checkpoint.load_checkpoint`.
    source : str
        How to name it in error messages (a path).
    spatial_dims, in_channels : int, optional
        If given, the kind of image it must take; a mismatch raises.

    Returns
    -------
    MaskedAutoencoder
        On the CPU, in eval mode, with ``normalization`` from the checkpoint.

    Raises
    ------
    CheckpointError
        If it is a segmentation checkpoint (MAE encoder + decoder), the config is
        invalid or the weights do not fit it.
    ValueError
        If the model does not fit ``spatial_dims`` / ``in_channels``.
    """
    from napari_mae.io.checkpoint import CheckpointError
    from napari_mae.models.decoder import is_segmenter_checkpoint  # here: decoder imports this module

    if is_segmenter_checkpoint(checkpoint):
        raise CheckpointError(
            f"{source} is a segmentation model (MAE encoder + decoder), not a masked autoencoder; use it "
            "with `napari-mae segment --method learned --model` or `napari-mae finetune --model`"
        )
    try:
        config = MAEConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has an invalid model config: {exc}") from None
    check_compatible(config, spatial_dims=spatial_dims, in_channels=in_channels, source=source)
    model = MaskedAutoencoder(config)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit its config: {exc}") from None
    model.normalization = dict(checkpoint.get("normalization") or DEFAULT_NORMALIZATION)
    return model.eval()


def load_model(spec: Any, device: str | torch.device = "cpu") -> MaskedAutoencoder:
    """Get a model in eval mode from a model, preset name, bundled name or checkpoint.

    Parameters
    ----------
    spec : MaskedAutoencoder, str or path
        A model (moved to ``device``); a preset name from :data:`PRESETS`
        (freshly initialised from torch's global RNG); ``"default-2d"`` /
        ``"default-3d"`` (the bundled trained models); or a checkpoint path
        written by :func:`napari_mae.io.checkpoint.save_checkpoint`.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` (see :func:`resolve_device`).

    Returns
    -------
    MaskedAutoencoder
        In eval mode on ``device``; ``model.normalization`` from the checkpoint.

    Raises
    ------
    FileNotFoundError
        If a bundled model or a checkpoint file does not exist.
    napari_mae.io.checkpoint.CheckpointError
        If the file is not a napari-mae checkpoint or holds code.
    """
    dev = resolve_device(device)
    if isinstance(spec, MaskedAutoencoder):
        return spec.to(dev).eval()
    if isinstance(spec, str) and spec in PRESETS:
        return build_model(spec).to(dev).eval()
    if isinstance(spec, str) and spec in BUNDLED_MODELS:
        path = MODELS_DIR / f"{spec}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"bundled model {spec!r} not found at {path}; create it with "
                "`python scripts/train_default_models.py`, or pass a preset name "
                f"({', '.join(sorted(PRESETS))}) for an untrained model"
            )
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint file at {path}, and {str(spec)!r} is not a preset "
                f"({', '.join(sorted(PRESETS))}) or bundled model ({', '.join(BUNDLED_MODELS)})"
            )
    from napari_mae.io.checkpoint import load_checkpoint

    model = model_from_checkpoint(load_checkpoint(path), source=str(path))
    if isinstance(spec, str) and spec in BUNDLED_MODELS:
        # Messages and fine-tuned checkpoints then name it as the user did, not by its preset.
        model.config = dataclasses.replace(model.config, name=spec)
    return model.to(dev).eval()
