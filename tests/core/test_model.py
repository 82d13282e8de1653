"""The masked autoencoder (napari_mae.models.mae)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_mae.masking import make_mask
from napari_mae.models import mae
from napari_mae.models.mae import (
    PRESETS,
    MAEConfig,
    build_discriminator,
    build_model,
    load_model,
    resolve_device,
)

# Small enough to build and run in milliseconds.
MICRO_2D = MAEConfig(img_size=(32, 32), patch_size=(8, 8), embed_dim=32, depth=2, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
MICRO_3D = MAEConfig(img_size=(8, 32, 32), patch_size=(2, 8, 8), embed_dim=36, depth=2, num_heads=2,
                     decoder_embed_dim=18, decoder_depth=1, decoder_num_heads=2)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro2d():
    torch.manual_seed(0)
    return build_model(MICRO_2D).eval()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"embed_dim": 30, "num_heads": 3}, "embed_dim=30 must be divisible by 4"),
        (
            {"img_size": (8, 32, 32), "patch_size": (2, 8, 8), "embed_dim": 32},
            "embed_dim=32 must be divisible by 6",
        ),
        ({"decoder_embed_dim": 18, "decoder_num_heads": 2}, "decoder_embed_dim=18 must be divisible by 4"),
        ({"embed_dim": 32, "num_heads": 3}, "num_heads=3"),
        ({"decoder_num_heads": 3}, "decoder_num_heads=3"),
        ({"patch_size": (7, 7)}, "patch_size=.* must divide img_size"),
        ({"patch_size": (8, 8, 8)}, "patch_size"),
        ({"img_size": (32,), "patch_size": 8}, "img_size"),
        ({"img_size": 32}, "img_size"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.5}, "mask_ratio"),
        ({"depth": 0}, "depth=0"),
        ({"in_channels": 0}, "in_channels=0"),
        ({"mlp_ratio": 0}, "mlp_ratio=0"),
        ({"pos_embed_type": "fourier"}, "pos_embed_type"),
        ({"proj_type": "linear"}, "proj_type"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"adversarial_weight": -1.0}, "adversarial_weight"),
    ],
)
def test_config_validation_names_the_bad_value(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MICRO_2D, **changes)


def test_learnable_embedding_lifts_the_sincos_divisibility_rule():
    config = dataclasses.replace(MICRO_2D, embed_dim=30, num_heads=3, pos_embed_type="learnable")
    assert build_model(config).config.embed_dim == 30


def test_config_dict_round_trip():
    data = PRESETS["tiny-3d"].to_dict()
    assert MAEConfig.from_dict(data) == PRESETS["tiny-3d"]
    data["patch_size"] = list(data["patch_size"])
    assert MAEConfig.from_dict(data) == PRESETS["tiny-3d"]
    with pytest.raises(ValueError, match="unknown MAEConfig keys"):
        MAEConfig.from_dict({**data, "bogus": 1})


def test_presets_are_small_and_valid():
    assert {"tiny-2d", "small-2d", "tiny-3d"} <= set(PRESETS)
    for name in ("tiny-2d", "tiny-3d"):
        model = build_model(name)
        n_bytes = sum(p.numel() for p in model.state_dict().values()) * 4
        assert n_bytes < 15e6, f"{name} is {n_bytes / 1e6:.1f} MB; two defaults must fit in 30 MB"


@pytest.mark.parametrize("config", [MICRO_2D, MICRO_3D, dataclasses.replace(MICRO_2D, in_channels=3)])
def test_forward_shapes(config):
    model = build_model(config).eval()
    x = torch.rand(2, config.in_channels, *config.img_size)
    pred, mask = model(x)
    assert pred.shape == (2, config.n_patches, config.patch_dim)
    assert mask.shape == (2, config.n_patches) and mask.dtype == torch.bool


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (MICRO_2D, (2, 1, 32, 32)),
        (MICRO_2D, (1, 1, 64, 40)),  # any multiple of the patch
        (MICRO_3D, (2, 1, 8, 32, 32)),
        (dataclasses.replace(MICRO_2D, in_channels=3), (2, 3, 32, 32)),
        (dataclasses.replace(MICRO_3D, in_channels=2), (1, 2, 8, 32, 32)),
    ],
)
def test_patchify_unpatchify_round_trip(config, shape):
    model = build_model(config)
    x = torch.rand(shape)
    tokens = model.patchify(x)
    grid = [s // p for s, p in zip(shape[2:], config.patch_size)]
    assert tokens.shape == (shape[0], int(np.prod(grid)), config.patch_dim)
    torch.testing.assert_close(model.unpatchify(tokens, grid), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config", [dataclasses.replace(MICRO_2D, in_channels=2), dataclasses.replace(MICRO_3D, in_channels=2)]
)
def test_patchify_matches_monai_token_order(config):
    """Token i of patchify is what MONAI's conv patch embedding turns into token i."""
    model = build_model(config)
    conv = model.patch_embedding.patch_embeddings
    x = torch.rand(1, config.in_channels, *config.img_size)
    monai_tokens = conv(x).flatten(2).transpose(1, 2)  # (1, N, D), MONAI's order
    # Same weights as a linear map on our (p..., C) token layout.
    d = config.spatial_dims
    weight = conv.weight.permute(0, *range(2, 2 + d), 1).reshape(conv.weight.shape[0], -1)
    ours = model.patchify(x) @ weight.T + conv.bias
    torch.testing.assert_close(ours, monai_tokens, rtol=1e-4, atol=1e-5)


def test_patchify_rejects_non_multiples(micro2d):
    with pytest.raises(ValueError, match="multiple"):
        micro2d.patchify(torch.rand(1, 1, 30, 32))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9])
def test_generator_masks_remove_exactly_round_ratio_n(micro2d, ratio):
    g = torch.Generator().manual_seed(0)
    _, mask = micro2d(torch.rand(4, 1, 32, 32), generator=g, mask_ratio=ratio)
    assert (mask.sum(1) == int(np.floor(ratio * 16 + 0.5))).all()


def test_same_generator_seed_same_mask(micro2d):
    x = torch.rand(3, 1, 32, 32)
    _, a = micro2d(x, generator=torch.Generator().manual_seed(5))
    _, b = micro2d(x, generator=torch.Generator().manual_seed(5))
    _, c = micro2d(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # per-sample masks


@pytest.mark.parametrize("layout", ["grid", "flat", "batch-grid", "batch-flat", "torch"])
def test_given_mask_is_the_mask_used(micro2d, layout):
    grid_mask = make_mask((32, 32), 8, seed=0)
    given = {
        "grid": grid_mask,
        "flat": grid_mask.reshape(-1),
        "batch-grid": np.stack([grid_mask, grid_mask]),
        "batch-flat": np.stack([grid_mask, grid_mask]).reshape(2, -1),
        "torch": torch.from_numpy(grid_mask),
    }[layout]
    _, mask = micro2d(torch.rand(2, 1, 32, 32), mask=given)
    assert (mask.numpy() == grid_mask.reshape(1, -1)).all()


def test_bad_mask_shape_raises(micro2d):
    with pytest.raises(ValueError, match="patch grid"):
        micro2d(torch.rand(2, 1, 32, 32), mask=np.zeros((3, 3), bool))


def test_bad_input_shape_raises(micro2d):
    with pytest.raises(ValueError, match="does not fit this model"):
        micro2d(torch.rand(2, 1, 48, 32))
    with pytest.raises(ValueError, match="does not fit this model"):
        micro2d(torch.rand(2, 3, 32, 32))


def test_batch_with_different_visible_counts_matches_one_by_one(micro2d):
    """Padding visible tokens to a common length must not change any sample's output."""
    x = torch.rand(3, 1, 32, 32)
    masks = np.stack([make_mask((32, 32), 8, mask_ratio=r, seed=i) for i, r in enumerate((0.25, 0.5, 0.9))])
    with torch.no_grad():
        batched, _ = micro2d(x, mask=masks)
        for i in range(3):
            single, _ = micro2d(x[i : i + 1], mask=masks[i])
            torch.testing.assert_close(batched[i], single[0], rtol=1e-4, atol=1e-5)


def test_visible_patch_content_drives_the_prediction_removed_patch_content_does_not(micro2d):
    mask = make_mask((32, 32), 8, seed=0)
    x = torch.rand(1, 1, 32, 32)
    pixels = torch.from_numpy(np.kron(mask, np.ones((8, 8))).astype(bool))
    with torch.no_grad():
        base, _ = micro2d(x, mask=mask)
        changed_removed, _ = micro2d(torch.where(pixels, torch.rand_like(x), x), mask=mask)
        changed_visible, _ = micro2d(torch.where(~pixels, torch.rand_like(x), x), mask=mask)
    torch.testing.assert_close(base, changed_removed)
    assert not torch.allclose(base, changed_visible)


def test_loss_ignores_visible_predictions(micro2d):
    x = torch.rand(2, 1, 32, 32)
    pred, mask = micro2d(x, generator=torch.Generator().manual_seed(0))
    loss = micro2d.loss(x, pred, mask)
    visible = ~mask.unsqueeze(-1)
    for junk in (torch.randn_like(pred) * 100, torch.full_like(pred, float("inf"))):
        torch.testing.assert_close(micro2d.loss(x, torch.where(visible, junk, pred), mask), loss)
    assert not torch.allclose(micro2d.loss(x, torch.where(visible, pred, pred + 1.0), mask), loss)


def test_loss_is_mean_over_removed_patches_of_norm_pix_target(micro2d):
    x = torch.rand(2, 1, 32, 32)
    target = micro2d.target(x)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = True
    pred = target.clone()
    pred[0, 3] += 2.0  # squared error 4 on the one removed patch
    torch.testing.assert_close(micro2d.loss(x, pred, mask), torch.tensor(4.0))


def test_loss_without_norm_pix_and_with_nothing_removed():
    model = build_model(dataclasses.replace(MICRO_2D, norm_pix_loss=False))
    x = torch.rand(1, 1, 32, 32)
    mask = torch.ones(1, 16, dtype=torch.bool)
    torch.testing.assert_close(model.loss(x, model.patchify(x), mask), torch.tensor(0.0))
    pred, mask = model(x, mask_ratio=0.0)
    assert not mask.any()
    assert model.loss(x, pred, mask).item() == 0.0


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(MICRO_2D, norm_pix_loss=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 32), torch.linspace(0, 3, 32), indexing="ij")
    x = torch.stack([torch.sin(yy * (i + 1)) * torch.cos(xx) for i in range(4)])[:, None]  # smooth images
    mask = torch.from_numpy(make_mask((32, 32), 8, seed=0, batch_size=4))
    losses = []
    for _ in range(25):
        pred, m = model(x, mask=mask)
        loss = model.loss(x, pred, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_adversarial_term_is_off_by_default_and_works_when_on():
    assert MAEConfig().adversarial_weight == 0.0
    model = build_model(dataclasses.replace(MICRO_2D, adversarial_weight=0.1))
    x = torch.rand(2, 1, 32, 32)
    pred, mask = model(x)
    with pytest.raises(ValueError, match="discriminator"):
        model.loss(x, pred, mask)
    disc = build_discriminator(model.config)
    loss = model.loss(x, pred, mask, discriminator=disc)
    loss.backward()
    assert torch.isfinite(loss)
    d_loss = model.discriminator_loss(disc, x, pred, mask)
    assert torch.isfinite(d_loss) and d_loss.requires_grad


def test_composite_keeps_visible_pixels(micro2d):
    x = torch.rand(1, 1, 32, 32)
    mask = torch.from_numpy(make_mask((32, 32), 8, seed=0).reshape(1, -1))
    out = micro2d.composite(x, torch.zeros(1, 16, 64), mask)
    pixels = torch.from_numpy(np.kron(mask.reshape(4, 4).numpy(), np.ones((8, 8))).astype(bool))
    torch.testing.assert_close(out[0, 0][~pixels], x[0, 0][~pixels])


@pytest.mark.parametrize(("config", "depths"), [(MICRO_2D, [0, -1]), (MICRO_3D, [1])])
def test_encoder_features_shapes(config, depths):
    model = build_model(config).eval()
    x = torch.rand(2, 1, *config.img_size)
    feats = model.encoder_features(x, depths)
    assert [f.shape for f in feats] == [(2, config.embed_dim, *config.grid_size)] * len(depths)


def test_encoder_features_see_every_patch(micro2d):
    x = torch.rand(1, 1, 32, 32)
    changed = x.clone()
    changed[..., :8, :8] = 0.0  # one patch
    a = micro2d.encoder_features(x, [-1])[0]
    b = micro2d.encoder_features(changed, [-1])[0]
    assert not torch.allclose(a[..., 3, 3], b[..., 3, 3])  # attention spreads the change


def test_encoder_features_bad_depth(micro2d):
    with pytest.raises(ValueError, match="out of range"):
        micro2d.encoder_features(torch.rand(1, 1, 32, 32), [2])


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else None
    mps = getattr(torch.backends, "mps", None)
    if expected is None and mps is not None and mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == (expected or "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_model_specs(tmp_path, monkeypatch):
    model = load_model("tiny-2d")
    assert not model.training and model.config.name == "tiny-2d"
    assert load_model(model) is model
    monkeypatch.setattr(mae, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"default-2d.*train_default_models\.py"):
        load_model("default-2d")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        load_model(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge-2d")


def test_build_model_overrides():
    model = build_model("tiny-2d", in_channels=3)
    assert model.config.in_channels == 3 and model.config.embed_dim == PRESETS["tiny-2d"].embed_dim


def test_autocast_is_float32_on_cpu_unless_asked():
    import contextlib

    import torch

    from napari_mae.models.mae import autocast

    assert isinstance(autocast(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), enabled=False, cpu_bf16=True), contextlib.nullcontext)
    with autocast(torch.device("cpu"), cpu_bf16=True):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype in (torch.float32, torch.bfloat16)  # bfloat16 only on CPUs with native support
