"""Patch masks (napari_mae.masking)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mae.masking import (
    STRATEGIES,
    apply_mask,
    make_mask,
    mask_to_pixels,
    n_removed,
    patch_grid_shape,
)

SHAPES = [
    ((64, 64), 8),
    ((37, 53), 8),  # partial edge patches
    ((5, 5), 8),  # smaller than one patch
    ((9, 37, 53), (2, 8, 8)),  # anisotropic 3D
    ((16, 64, 64), (4, 8, 8)),
]


@pytest.mark.parametrize(
    ("shape", "patch", "grid"),
    [((64, 64), 8, (8, 8)), ((37, 53), 8, (5, 7)), ((5, 5), 8, (1, 1)), ((9, 37, 53), (2, 8, 8), (5, 5, 7))],
)
def test_patch_grid_shape_is_ceil(shape, patch, grid):
    assert patch_grid_shape(shape, patch) == grid


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("shape", "patch"), SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.9])
def test_removed_count_is_exact(strategy, shape, patch, ratio):
    mask = make_mask(shape, patch, mask_ratio=ratio, strategy=strategy, seed=3)
    grid = patch_grid_shape(shape, patch)
    assert mask.shape == grid
    assert mask.dtype == bool
    assert int(mask.sum()) == math.floor(ratio * math.prod(grid) + 0.5) == n_removed(math.prod(grid), ratio)


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_same_seed_same_mask_different_seed_different_mask(strategy):
    a = make_mask((64, 96), 8, strategy=strategy, seed=7)
    b = make_mask((64, 96), 8, strategy=strategy, seed=7)
    c = make_mask((64, 96), 8, strategy=strategy, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_batch_masks_are_independent_per_sample():
    masks = make_mask((64, 64), 8, seed=0, batch_size=6)
    assert masks.shape == (6, 8, 8)
    assert (masks.reshape(6, -1).sum(1) == 48).all()
    assert len({m.tobytes() for m in masks}) == 6


def test_grid_keeps_one_patch_of_every_2x2_at_075():
    mask = make_mask((64, 64), 8, mask_ratio=0.75, strategy="grid")
    expected = np.ones((8, 8), dtype=bool)
    expected[::2, ::2] = False
    np.testing.assert_array_equal(mask, expected)


def test_block_mask_is_contiguous_not_scattered():
    mask = make_mask((128, 128), 8, mask_ratio=0.4, strategy="block", seed=1)
    # Blocks touch their neighbours: many more removed-removed neighbour pairs than random.
    pairs = (mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum()
    random = make_mask((128, 128), 8, mask_ratio=0.4, strategy="random", seed=1)
    random_pairs = (random[1:] & random[:-1]).sum() + (random[:, 1:] & random[:, :-1]).sum()
    assert pairs > 1.3 * random_pairs


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "a"])
def test_bad_mask_ratio_raises(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be .*\[0, 1\)"):
        make_mask((64, 64), 8, mask_ratio=ratio)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((64, 64), 8), {"strategy": "checkerboard"}, "strategy"),
        (((64, 64), (8, 8, 8)), {}, "patch_size"),
        (((64, 64), 0), {}, "positive"),
        (((0, 64), 8), {}, "positive"),
        (((64, 64), 8), {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mask(*args, **kwargs)


@pytest.mark.parametrize(("shape", "patch"), SHAPES)
def test_mask_to_pixels_expands_and_crops(shape, patch):
    mask = make_mask(shape, patch, seed=0)
    pixels = mask_to_pixels(mask, shape, patch)
    assert pixels.shape == shape
    p = (patch,) * len(shape) if isinstance(patch, int) else patch
    for index in [(0,) * len(shape), tuple(s - 1 for s in shape)]:
        assert pixels[index] == mask[tuple(i // q for i, q in zip(index, p))]


def test_mask_to_pixels_batch_and_bad_shape():
    masks = make_mask((37, 53), 8, seed=0, batch_size=2)
    assert mask_to_pixels(masks, (37, 53), 8).shape == (2, 37, 53)
    with pytest.raises(ValueError, match="not the patch grid"):
        mask_to_pixels(np.zeros((4, 4), bool), (37, 53), 8)


@pytest.mark.parametrize("fill", ["zero", "mean", "noise", 3.0])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int64, np.float16])
def test_apply_mask_fills_removed_and_keeps_visible(fill, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random((37, 53)) * 200 + 10).astype(dtype)
    mask = make_mask(image.shape, 8, seed=1)
    out = apply_mask(image, mask, 8, fill=fill, seed=2)
    pixels = mask_to_pixels(mask, image.shape, 8)
    assert out.dtype == image.dtype and out.shape == image.shape
    np.testing.assert_array_equal(out[~pixels], image[~pixels])
    removed = out[pixels].astype(np.float64)
    if fill == "zero":
        assert (removed == 0).all()
    elif fill == "mean":
        np.testing.assert_allclose(removed, image.astype(np.float64).mean(), rtol=1e-2, atol=0.5)
    elif fill == "noise":
        assert removed.min() >= float(image.min()) - 0.5 and removed.max() <= float(image.max()) + 0.5
        assert removed.std() > 10  # uniform noise, not a constant
    else:
        assert (removed == 3.0).all()


def test_apply_mask_channels_and_nan():
    image = np.random.default_rng(0).random((37, 53, 3)).astype(np.float32)
    image[0, 0, 0] = np.nan
    mask = np.ones((5, 7), dtype=bool)
    out = apply_mask(image, mask, 8, fill="mean", channel_axis=-1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[5, 5], np.nanmean(image.reshape(-1, 3), axis=0), rtol=1e-5)


def test_apply_mask_bool_image_and_bad_fill():
    image = np.zeros((16, 16), dtype=bool)
    mask = make_mask((16, 16), 8, mask_ratio=0.5, seed=0)
    assert apply_mask(image, mask, 8, fill="mean").dtype == bool
    with pytest.raises(ValueError, match="fill"):
        apply_mask(image, mask, 8, fill="blur")
