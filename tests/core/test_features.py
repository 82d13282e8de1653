"""Filter-bank features: shapes, spacing, dtype invariance, tiling, model features."""

from __future__ import annotations

import numpy as np
import pytest

import napari_mae.segmentation.features as F
from napari_mae.segmentation.features import multiscale_features


def _blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for _ in range(6):
        c = [rng.uniform(0, n) for n in shape]
        img += np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c)) / 20.0)
    return img


@pytest.mark.parametrize(
    ("shape", "kwargs", "n_features"),
    [
        ((40, 50), {}, 5 * 5),
        ((40, 50), {"sigmas": [1.0, 2.0]}, 2 * 5),
        ((8, 20, 24), {"spacing": (2.0, 0.5, 0.5), "sigmas": [1.0, 2.0]}, 2 * 6),
    ],
)
def test_shapes(shape, kwargs, n_features):
    f = multiscale_features(_blobs(shape), **kwargs)
    assert f.shape == shape + (n_features,)
    assert f.dtype == np.float32
    assert np.isfinite(f).all()


def test_rgb_channel_axis():
    img = np.stack([_blobs((30, 30), s) for s in range(3)], axis=-1)
    f = multiscale_features(img, channel_axis=-1, sigmas=[1.0])
    assert f.shape == (30, 30, 3 * 5)


def test_dtypes_same_up_to_scaling():
    img = _blobs((32, 32))
    u8 = np.round(img / img.max() * 255).astype(np.uint8)
    ref = multiscale_features(u8.astype(np.float64), sigmas=[1.0, 2.0])
    for dt, scale in [(np.uint16, 257), (np.int32, 1000), (np.float32, 1 / 255.0)]:
        f = multiscale_features((u8.astype(np.float64) * scale).astype(dt), sigmas=[1.0, 2.0])
        np.testing.assert_allclose(f, ref, atol=1e-4)


def test_nan_not_propagated():
    img = _blobs((32, 32))
    img[5, 5] = np.nan
    assert np.isfinite(multiscale_features(img, sigmas=[1.0])).all()


def test_tiled_equals_untiled(monkeypatch):
    """Tiles overlap by the filters' full reach: identical to the untiled features (also
    on random noise, where any border effect would show)."""
    rng = np.random.default_rng(0)
    cases = [
        (_blobs((64, 70)), [1.0, 2.0], None, 500),  # tiles of ~22 x 22
        (rng.random((70, 90)).astype(np.float32), [1.5, 3.0], None, 500),
        (rng.random((20, 40, 44)).astype(np.float32), [1.0, 2.0], (2.0, 1.0, 1.0), 3000),
    ]
    for img, sigmas, spacing, tile in cases:
        ref = multiscale_features(img, sigmas=sigmas, spacing=spacing)
        monkeypatch.setattr(F, "_TILE_VOXELS", tile)
        tiled = multiscale_features(img, sigmas=sigmas, spacing=spacing)
        monkeypatch.undo()
        np.testing.assert_array_equal(tiled, ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing": (1.0,)}, "spacing"),
        ({"spacing": (1.0, -1.0)}, "spacing"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiscale_features(np.zeros((10, 10)), **kwargs)


def test_not_2d_or_3d():
    with pytest.raises(ValueError, match="2D image or 3D volume"):
        multiscale_features(np.zeros(10))


def test_model_features_appended():
    pytest.importorskip("monai")
    from napari_mae.models.mae import load_model

    model = load_model("tiny-2d")
    img = _blobs((70, 90))
    f = multiscale_features(img, model=model, sigmas=[1.0])
    assert f.shape[:2] == (70, 90)
    assert f.shape[2] > 5
    assert np.isfinite(f).all()


@pytest.mark.parametrize("shape", [(40, 50), (12, 20, 24)])
def test_filter_bank_reports_within_each_scale(shape, monkeypatch):
    """Several progress reports per scale (the widget's Stop is heard only there), the
    same features with and without a callback, and tiles reported on one scale."""
    x = np.random.default_rng(0).random((1, *shape)).astype(np.float32)
    sigmas = [1.0, 2.0]
    calls = []
    f = F.filter_bank(x, sigmas, progress=lambda d, t, m: calls.append((d, t)))
    np.testing.assert_array_equal(f, F.filter_bank(x, sigmas))
    assert len(calls) >= 3 * len(sigmas) and calls[-1][0] == calls[-1][1]
    monkeypatch.setattr(F, "_TILE_VOXELS", x[0].size // 3)
    calls.clear()
    F.filter_bank(x, sigmas, progress=lambda d, t, m: calls.append((d, t)))
    assert len(calls) >= 3 * 3 * len(sigmas)
    assert len({t for _, t in calls}) == 1 and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
