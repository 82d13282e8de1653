"""A UNETR-style multi-scale decoder on the MAE's ViT encoder.

Hatamizadeh et al., *UNETR: Transformers for 3D Medical Image Segmentation*,
WACV 2022, Section 3.2 and Figure 2: hidden states of several encoder depths,
reshaped to grids, brought up to full resolution by transposed convolutions and
merged with a convolutional branch on the image (UNETR's first skip), which
gives the sharp boundaries that a patch-``p`` token grid cannot. Built from
MONAI's ``UnetrBasicBlock`` / ``UnetrPrUpBlock`` / ``UnetrUpBlock`` /
``UnetOutBlock`` because MONAI's ``UNETR`` class builds its own 12-layer ViT
and reads hidden states 3/6/9, where ours has ``depth`` blocks and patch 8.

The encoder runs over the full token grid, in patch order and unmasked
(:meth:`MAEEncoder.hidden_states`): ``MaskedAutoEncoderViT.forward`` shuffles
tokens even at ``mask_ratio=0``. Its fixed sin-cos position embedding is
rebuilt for the input's grid, so any input whose size is a multiple of the
patch size works (sin-cos positions extend to larger grids unchanged).

Levels for patch size ``p = 8`` (for ``p = 16`` one more up-step per level):

=========  =========================================  ==========
level      from                                       channels
=========  =========================================  ==========
1          image, UnetrBasicBlock                     f
1/2        hidden state 1, UnetrPrUpBlock (x4)        2f
1/4        hidden state 2, UnetrPrUpBlock (x2)        4f
1/8        hidden state 3, UnetrBasicBlock            8f
bottom     last hidden state (normed), 1/8            8f
=========  =========================================  ==========
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

__all__ = [
    "DecoderConfig",
    "InstanceDecoder",
    "SegmenterConfig",
    "fitted_radius",
    "is_segmenter_checkpoint",
    "load_segmenter",
    "segmenter_from_checkpoint",
]


class MAEEncoder(nn.Module):
    """The MAE's ViT encoder without masking, on any multiple of its patch size.

    Parameters
    ----------
    mae : MaskedAutoencoder
        Its ``patch_embedding``, ``cls_token`` and ``blocks`` are shared, not
        copied (the decoder's checkpoint holds them).
    """

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.patch_embedding = mae.patch_embedding
        self.cls_token = mae.cls_token
        self.blocks = mae.blocks  # TransformerBlocks + final LayerNorm
        self.patch_size = tuple(int(p) for p in mae.config.patch_size)
        self.embed_dim = int(mae.config.embed_dim)
        self.depth = int(mae.config.depth)
        self._pos_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _pos_embed(self, grid: tuple[int, ...], device, dtype) -> torch.Tensor:
        if grid not in self._pos_cache:
            pos = build_sincos_position_embedding(list(grid), self.embed_dim, len(grid))
            self._pos_cache[grid] = pos.detach()
        return self._pos_cache[grid].to(device=device, dtype=dtype)  # (1, N, D)

    def hidden_states(self, x: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states after the given blocks, as grids.

        Parameters
        ----------
        x : Tensor, shape (B, C, *spatial)
            Each spatial size a multiple of the patch size.
        depths : sequence of int
            0-based block indices; ``depth - 1`` is the last block, returned
            after the encoder's final LayerNorm.

        Returns
        -------
        list of Tensor, each shape (B, embed_dim, *grid), grid = spatial / patch
        """
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size, strict=True))
        h = self.patch_embedding.patch_embeddings(x)  # (B, D, *grid)
        b = h.shape[0]
        h = h.flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + self._pos_embed(grid, h.device, h.dtype)
        h = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)  # (B, 1 + N, D)
        out: dict[int, torch.Tensor] = {}
        last = max(depths)
        for i in range(last + 1):
            h = self.blocks[i](h)
            if i in depths:
                hs = self.blocks[-1](h) if i == self.depth - 1 else h  # final LayerNorm on the last
                out[i] = hs[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, *grid)  # (B, D, *grid)
        return [out[d] for d in depths]


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of :class:`InstanceDecoder` (frozen, validated).

    Parameters
    ----------
    features : int
        ``f``, channels of the full-resolution level (then 2f, 4f, 8f).
    out_channels : int
        Output maps: 3 = foreground logit, centre distance, boundary distance
        (:data:`napari_mae.segmentation.targets.TARGET_NAMES`).
    object_radius : float
        Median object radius, in pixels, of the training images after they were
        resampled: the size the decoder expects. Inference resamples each image
        so that its objects have this radius (scale adaptation).

    Raises
    ------
    ValueError
        Naming the bad value.
    """

    features: int = 16
    out_channels: int = 3
    object_radius: float = 8.0

    def __post_init__(self) -> None:
        for name in ("features", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        r = self.object_radius
        if (
            isinstance(r, bool)
            or not isinstance(r, (int, float, np.number))
            or not (np.isfinite(r) and r > 0)
        ):
            raise ValueError(f"object_radius={r!r} must be a positive number of pixels")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown decoder settings {sorted(unknown)}")
        return cls(**values)


#: ``config["task"]`` of a segmentation checkpoint (an MAE checkpoint has none).
TASK = "segmentation"


@dataclass(frozen=True)
class SegmenterConfig:
    """What a segmentation checkpoint's ``config`` holds: the MAE's and the decoder's settings.

    Parameters
    ----------
    mae : MAEConfig
    decoder : DecoderConfig
    """

    mae: Any
    decoder: DecoderConfig

    def to_dict(self) -> dict:
        return {"task": TASK, "mae": self.mae.to_dict(), "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> SegmenterConfig:
        from napari_mae.models.mae import MAEConfig

        if values.get("task") != TASK:
            raise ValueError("not a segmentation model config")
        return cls(MAEConfig.from_dict(values["mae"]), DecoderConfig.from_dict(values["decoder"]))


class InstanceDecoder(nn.Module):
    """MAE encoder + UNETR decoder predicting the maps of ``targets.TARGET_NAMES``.

    Parameters
    ----------
    mae : MaskedAutoencoder
        The pretrained (or randomly initialised) MAE whose encoder is used.
    config : DecoderConfig, optional
    use_encoder : bool
        False for the ablation "convolutional branch alone": the encoder is
        not run and its levels get zeros.

    Notes
    -----
    ``forward(x)`` takes (B, C, *spatial) with each size a multiple of the
    patch size and returns (B, out_channels, *spatial): channel 0 a logit,
    the others in [0, 1] (sigmoid).
    """

    def __init__(self, mae: nn.Module, config: DecoderConfig | None = None, *, use_encoder: bool = True):
        super().__init__()
        cfg = config or DecoderConfig()
        self.decoder_config = cfg
        self.mae_config = mae.config
        self.use_encoder = bool(use_encoder)
        #: Run the encoder without gradients (the decoder-only phase of training).
        self.freeze_encoder = False
        self.encoder = MAEEncoder(mae)
        nd = len(self.encoder.patch_size)
        p = self.encoder.patch_size
        _check_patch_size(p)
        # up-steps from the token grid to 1/2 and 1/4 resolution, per axis (anisotropic patches)
        steps = [int(round(math.log2(s))) for s in p]
        self.n_up = max(steps)
        depth = self.encoder.depth
        # depths read: evenly spaced, the last block last (UNETR: 3, 6, 9, 12 of 12)
        self.depths = sorted({max(0, round((k + 1) * depth / 4) - 1) for k in range(4)})
        while len(self.depths) < 4:  # encoders shallower than 4 blocks repeat the last
            self.depths.append(self.depths[-1])
        f, d_model = cfg.features, self.encoder.embed_dim
        in_ch = int(mae.config.in_channels)
        self.enc1 = UnetrBasicBlock(
            nd, in_ch, f, kernel_size=3, stride=1, norm_name="instance", res_block=True
        )
        # level 1/2: the token grid up by p/2; level 1/4 by p/4; level 1/8 (= grid for p = 8) no upsampling
        self.enc2 = _up_from_grid(nd, d_model, 2 * f, [max(s - 1, 0) for s in steps])
        self.enc3 = _up_from_grid(nd, d_model, 4 * f, [max(s - 2, 0) for s in steps])
        # the two 1/8 levels project the tokens with 1 x 1 convolutions (a 3 x 3 block from
        # embed_dim channels cost as much as the whole full-resolution branch on CPU)
        self.enc4 = _up_from_grid(nd, d_model, 8 * f, [max(s - 3, 0) for s in steps], kernel_size=1)
        self.bottom = _up_from_grid(nd, d_model, 8 * f, [max(s - 3, 0) for s in steps], kernel_size=1)
        self.dec4 = UnetrBasicBlock(
            nd, 16 * f, 8 * f, kernel_size=3, stride=1, norm_name="instance", res_block=True
        )
        # level k has 1 / min(2^k, p) of the resolution per axis: an axis with a smaller patch
        # (Z of tiny-3d's 4 x 8 x 8) reaches its token grid sooner, and is not upsampled there
        ups = [_level_step(steps, k) for k in (3, 2, 1)]
        self.dec3 = UnetrUpBlock(
            nd, 8 * f, 4 * f, kernel_size=3, upsample_kernel_size=ups[0], norm_name="instance", res_block=True
        )
        self.dec2 = UnetrUpBlock(
            nd, 4 * f, 2 * f, kernel_size=3, upsample_kernel_size=ups[1], norm_name="instance", res_block=True
        )
        self.dec1 = UnetrUpBlock(
            nd, 2 * f, f, kernel_size=3, upsample_kernel_size=ups[2], norm_name="instance", res_block=True
        )
        self.out = UnetOutBlock(nd, f, cfg.out_channels)

    @property
    def config(self) -> SegmenterConfig:
        """The checkpoint's ``config`` (:func:`napari_mae.io.checkpoint.save_checkpoint`)."""
        return SegmenterConfig(self.mae_config, self.decoder_config)

    @property
    def spatial_dims(self) -> int:
        return len(self.encoder.patch_size)

    @property
    def in_channels(self) -> int:
        return int(self.mae_config.in_channels)

    def encoder_parameters(self):
        return self.encoder.parameters()

    def decoder_parameters(self):
        enc = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in enc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        p = self.encoder.patch_size
        if any(s % q for s, q in zip(spatial, p, strict=True)):
            raise ValueError(f"input size {tuple(spatial)} must be a multiple of patch_size {p}")
        e1 = self.enc1(x)  # (B, f, *spatial)
        if self.use_encoder and self.freeze_encoder:
            with torch.no_grad():
                h1, h2, h3, h4 = self.encoder.hidden_states(x, self.depths)  # each (B, D, *grid)
        elif self.use_encoder:
            h1, h2, h3, h4 = self.encoder.hidden_states(x, self.depths)  # each (B, D, *grid)
        else:
            grid = tuple(s // q for s, q in zip(spatial, p, strict=True))
            h1 = h2 = h3 = h4 = x.new_zeros((x.shape[0], self.encoder.embed_dim, *grid))
        e2 = self.enc2(h1)  # (B, 2f, *spatial / 2)
        e3 = self.enc3(h2)  # (B, 4f, *spatial / 4)
        e4 = self.enc4(h3)  # (B, 8f, *spatial / 8)
        d4 = self.dec4(torch.cat([self.bottom(h4), e4], dim=1))  # (B, 8f, *spatial / 8)
        d3 = self.dec3(d4, e3)  # (B, 4f, *spatial / 4)
        d2 = self.dec2(d3, e2)  # (B, 2f, *spatial / 2)
        d1 = self.dec1(d2, e1)  # (B, f, *spatial)
        y = self.out(d1)  # (B, out, *spatial)
        return torch.cat([y[:, :1], torch.sigmoid(y[:, 1:])], dim=1)


def _check_patch_size(p: Sequence[int]) -> None:
    """Patch sizes the decoder's levels fit: powers of two, Y and X equal and >= 8, Z (3D) <= Y.

    Raises
    ------
    ValueError
        Naming ``patch_size``.
    """
    powers = all(int(s) >= 1 and (int(s) & (int(s) - 1)) == 0 for s in p)
    plane = p[-2:]
    if not powers or plane[0] != plane[1] or plane[0] < 8 or (len(p) == 3 and p[0] > plane[0]):
        raise ValueError(
            f"patch_size {tuple(p)} must be powers of two, equal and >= 8 in Y and X"
            + (", and Z no larger" if len(p) == 3 else "")
        )


def _level_step(steps: Sequence[int], k: int) -> int | tuple[int, ...]:
    """Upsampling factor per axis from level ``k`` (1 / 2^k) to level ``k - 1``, for patches 2^steps.

    An int where all axes agree (the isotropic decoder's modules, whose weights the bundled
    2D model holds, are unchanged), else a tuple (1 on an axis already at full token
    resolution at level ``k``).
    """
    f = tuple(2 if s >= k else 1 for s in steps)
    return f[0] if len(set(f)) == 1 else f


def _up_from_grid(nd: int, in_ch: int, out_ch: int, ups: Sequence[int], kernel_size: int = 3) -> nn.Module:
    """Token grid -> a finer level: transposed convolutions (UNETR's projection)."""
    n = max(ups)
    if n == 0:
        return UnetrBasicBlock(
            nd, in_ch, out_ch, kernel_size=kernel_size, stride=1, norm_name="instance", res_block=True
        )
    if all(u == n for u in ups):
        return UnetrPrUpBlock(
            nd,
            in_ch,
            out_ch,
            num_layer=n - 1,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=2,
            norm_name="instance",
            conv_block=True,
            res_block=True,
        )
    return _AnisotropicPrUp(nd, in_ch, out_ch, ups)


class _AnisotropicPrUp(nn.Module):
    """MONAI's ``UnetrPrUpBlock`` (conv_block, res_block) with a factor per axis and layer.

    ``UnetrPrUpBlock`` applies one ``upsample_kernel_size`` in every layer, so it cannot
    bring a 4 x 8 x 8 token grid to one level (Z up 2x, Y and X up 4x). This is the same
    stack from MONAI's own layers: a transposed convolution, then per further layer a
    transposed convolution and a ``UnetResBlock``; layer ``i`` doubles the axes that
    still need it (``i < ups[axis]``).
    """

    def __init__(self, nd: int, in_ch: int, out_ch: int, ups: Sequence[int]):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer

        kernels = [tuple(2 if i < u else 1 for u in ups) for i in range(max(ups))]
        self.transp_conv_init = get_conv_layer(
            nd, in_ch, out_ch, kernel_size=kernels[0], stride=kernels[0], conv_only=True, is_transposed=True
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                get_conv_layer(
                    nd, out_ch, out_ch, kernel_size=k, stride=k, conv_only=True, is_transposed=True
                ),
                UnetResBlock(nd, out_ch, out_ch, kernel_size=3, stride=1, norm_name="instance"),
            )
            for k in kernels[1:]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for blk in self.blocks:
            x = blk(x)
        return x


def is_segmenter_checkpoint(checkpoint: dict) -> bool:
    """Whether a loaded checkpoint holds a segmentation model (else an MAE)."""
    config = checkpoint.get("config")
    return isinstance(config, dict) and config.get("task") == TASK


def segmenter_from_checkpoint(checkpoint: dict, *, source: str = "checkpoint") -> InstanceDecoder:
    """Build the segmentation model a checkpoint describes and load its weights.

    Parameters
    ----------
    checkpoint : dict
        From :func:`napari_mae.io.checkpoint.load_checkpoint`.
    source : str
        How to name it in error messages.

    Returns
    -------
    InstanceDecoder
        On the CPU, in eval mode, with ``normalization`` from the checkpoint.

    Raises
    ------
    CheckpointError
        If it is an MAE checkpoint (no decoder), its config is invalid or the
        weights do not fit it.
    """
    from napari_mae.io.checkpoint import CheckpointError
    from napari_mae.models.mae import DEFAULT_NORMALIZATION, MaskedAutoencoder

    if not is_segmenter_checkpoint(checkpoint):
        raise CheckpointError(
            f"{source} is an MAE checkpoint without a segmentation decoder; train one with "
            "`napari-mae train IMAGES --labels LABELS --out RUN` (or the Training widget's "
            "segmentation task)"
        )
    try:
        config = SegmenterConfig.from_dict(checkpoint["config"])
        net = InstanceDecoder(MaskedAutoencoder(config.mae), config.decoder)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has an invalid segmentation config: {exc}") from None
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit its config: {exc}") from None
    net.normalization = dict(checkpoint.get("normalization") or DEFAULT_NORMALIZATION)
    net.fitted_radius = fitted_radius(checkpoint)
    return net.eval()


def load_segmenter(spec: Any, device: str = "cpu") -> InstanceDecoder:
    """A segmentation model from a model, a bundled name or a checkpoint path.

    Parameters
    ----------
    spec : InstanceDecoder, str or path
        ``"default-2d"`` (the bundled nuclei model: ``weights/default-2d-nuclei.pt``)
        or a checkpoint written by segmentation training.
    device : str
        As :func:`napari_mae.models.mae.resolve_device`.

    Returns
    -------
    InstanceDecoder
        In eval mode on ``device``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    CheckpointError
        If it is not a segmentation checkpoint (see :func:`segmenter_from_checkpoint`).
    """
    from napari_mae._names import BUNDLED_MODELS, bundled_segmenter_path, bundled_weights_path
    from napari_mae.io.checkpoint import load_checkpoint
    from napari_mae.models.mae import resolve_device

    dev = resolve_device(device)
    if isinstance(spec, InstanceDecoder):
        return spec.to(dev).eval()
    if isinstance(spec, str) and bundled_segmenter_path(spec):
        path = bundled_segmenter_path(spec)
    elif isinstance(spec, str) and spec in BUNDLED_MODELS:
        # a bundled MAE without a decoder (default-3d): its checkpoint gets the message of
        # segmenter_from_checkpoint ("an MAE checkpoint without a segmentation decoder")
        path = bundled_weights_path(spec)
    else:
        path = Path(spec)
    source = spec if isinstance(spec, str) and spec in BUNDLED_MODELS else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"no segmentation model at {path}")
    return segmenter_from_checkpoint(load_checkpoint(path), source=source).to(dev)


#: The ``extra`` key of a fine-tuned checkpoint holding the object radius it was trained at.
FITTED_RADIUS_KEY = "object_radius"


def fitted_radius(checkpoint: dict) -> float | None:
    """The object radius, in physical units, a fine-tuned model was trained at; None if none.

    :func:`napari_mae.segmentation.finetune.finetune` stores it in the checkpoint's
    ``extra`` (:data:`FITTED_RADIUS_KEY`); :func:`segmenter_from_checkpoint` sets it as the
    model's ``fitted_radius`` attribute, and the learned method segments at it instead of
    estimating the radius per image (as a Cellpose model trained with its own diameter
    uses that diameter when none is given).

    Parameters
    ----------
    checkpoint : dict
        From :func:`napari_mae.io.checkpoint.load_checkpoint`.

    Returns
    -------
    float or None
        None for models that are not fine-tuned, or whose stored value is not a positive
        finite number.
    """
    value = (checkpoint.get("extra") or {}).get(FITTED_RADIUS_KEY)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None
