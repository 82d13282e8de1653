"""Input validation and percentile normalisation (napari_mae.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mae.preprocess import (
    as_channels_first,
    denormalize,
    normalize_percentile,
    percentile_range,
    resolve_channel_axis,
    to_channels_first,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        ((37, 53), {}, (1, 37, 53)),
        ((9, 37, 53), {}, (1, 9, 37, 53)),  # a volume, not 53 channels
        ((37, 53, 3), {}, (3, 37, 53)),  # RGB
        ((37, 53, 4), {}, (4, 37, 53)),  # RGBA
        ((2, 37, 53), {"spatial_dims": 2}, (2, 37, 53)),  # channels first for a 2D model
        ((9, 37, 53, 2), {}, (2, 9, 37, 53)),
        ((9, 37, 53), {"channel_axis": 0}, (9, 37, 53)),
        ((37, 53, 7), {"channel_axis": -1}, (7, 37, 53)),
        ((9, 37, 53), {"spatial_dims": 3}, (1, 9, 37, 53)),
    ],
)
def test_to_channels_first_shapes(shape, kwargs, expected):
    out = to_channels_first(RNG.random(shape), **kwargs)
    assert out.shape == expected
    assert out.dtype == np.float32
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros(10), {}, "axes"),
        (np.zeros((2, 3, 4, 5, 6)), {}, "axes"),
        (np.zeros((9, 37, 53)), {"spatial_dims": 2}, "channel axis"),
        (np.zeros((37, 53)), {"spatial_dims": 3}, "3D model"),
        (np.zeros((4, 5), dtype=complex), {}, "np.abs"),
        (np.array([["a", "b"], ["c", "d"]]), {}, "not supported"),
        (np.zeros((0, 5)), {}, "empty"),
        (np.zeros((4, 5)), {"channel_axis": 2}, "out of range"),
        (np.zeros((4, 5)), {"spatial_dims": 4}, "spatial_dims"),
    ],
)
def test_bad_images_raise(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_channels_first(image, **kwargs)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float64])
def test_dtypes_become_float32_with_their_values(dtype):
    image = (RNG.random((6, 7)) * (2 if dtype is bool else 100)).astype(dtype)
    out = to_channels_first(image)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], image.astype(np.float32))


def test_negative_strides_and_transposes_are_copied():
    image = RNG.random((8, 9))
    for view in (image[::-1, ::-2], image.T):
        out = to_channels_first(view)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out[0], view.astype(np.float32))


def test_as_channels_first_does_not_copy():
    image = RNG.random((20, 30, 3))
    view = as_channels_first(image)
    assert view.shape == (3, 20, 30)
    assert np.shares_memory(view, image)


def test_as_channels_first_keeps_dask_lazy():
    da = pytest.importorskip("dask.array")
    image = da.from_array(RNG.random((20, 30, 3)), chunks=(10, 10, 3))
    view = as_channels_first(image)
    assert type(view).__module__.startswith("dask")
    assert view.shape == (3, 20, 30)


def test_resolve_channel_axis_reports_spatial_dims():
    assert resolve_channel_axis((5, 6)) == (None, 2)
    assert resolve_channel_axis((5, 6, 3)) == (2, 2)
    assert resolve_channel_axis((5, 6, 7)) == (None, 3)


def test_normalize_percentile_maps_percentiles_to_0_and_1():
    x = RNG.normal(100, 20, size=(2, 50, 60)).astype(np.float32)
    x[1] *= 10
    x_norm, lo, hi = normalize_percentile(x, 1.0, 99.0)
    for c in range(2):
        np.testing.assert_allclose(np.percentile(x_norm[c], [1.0, 99.0]), [0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(denormalize(x_norm, lo, hi), x, rtol=1e-5, atol=1e-3)


def test_non_finite_pixels_become_the_lower_percentile():
    x = RNG.random((1, 20, 20)).astype(np.float32)
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    x_norm, lo, hi = normalize_percentile(x)
    assert np.isfinite(x_norm).all()
    assert (x_norm[0, 0, :3] == 0).all()
    assert np.isfinite(lo).all() and np.isfinite(hi).all()


def test_constant_channel_round_trips_exactly():
    x = np.full((1, 10, 10), 7.5, dtype=np.float32)
    x_norm, lo, hi = normalize_percentile(x)
    assert (x_norm == 0).all()
    np.testing.assert_array_equal(denormalize(x_norm, lo, hi), x)


def test_sparse_image_falls_back_to_full_range():
    x = np.zeros((1, 100, 100), dtype=np.float32)
    x[0, 0, 0] = 1000.0  # 0.01 % foreground: both percentiles are 0
    lo, hi = percentile_range(x)
    assert (lo[0], hi[0]) == (0.0, 1000.0)


@pytest.mark.parametrize(("lower", "upper"), [(50, 50), (-1, 99), (1, 101), (90, 10)])
def test_bad_percentiles_raise(lower, upper):
    with pytest.raises(ValueError, match="percentiles"):
        percentile_range(np.zeros((1, 4, 4)), lower, upper)


def test_all_nan_channel_raises():
    with pytest.raises(ValueError, match="no finite pixel"):
        normalize_percentile(np.full((1, 4, 4), np.nan))


def test_percentile_range_of_large_input_uses_a_subsample():
    x = RNG.random((1, 300, 300)).astype(np.float32)
    lo, hi = percentile_range(x, 1.0, 99.0, max_samples=10_000)
    np.testing.assert_allclose([lo[0], hi[0]], [0.01, 0.99], atol=0.01)


def test_denormalize_batch_and_torch():
    torch = pytest.importorskip("torch")
    lo, hi = np.array([1.0, 10.0]), np.array([3.0, 30.0])
    x = torch.ones(4, 2, 5, 5)
    out = denormalize(x, lo, hi, channel_axis=1)
    assert isinstance(out, torch.Tensor)
    assert out[:, 0].eq(3.0).all() and out[:, 1].eq(30.0).all()


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((64, 64), None),
        ((64, 64, 3), 2),  # RGB
        ((2, 64, 64), 0),  # channels first, 2D
        ((16, 64, 64), None),  # a volume
        ((10, 64, 64, 2), 3),  # volume, channels last
        ((3, 16, 64, 64), None),  # (T, Z, Y, X): a short first axis of 4 is time
        ((64, 5, 7), None),  # too short to tell
    ],
)
def test_guess_layer_channel_axis_table(shape, expected):
    from napari_mae.preprocess import guess_layer_channel_axis

    assert guess_layer_channel_axis(shape) == expected


def test_channel_guessing_lives_in_preprocess_only():
    """Issue 11: channel guessing was written four times with four rules; the widgets had
    their own. Every guess is now a preprocess function."""
    from pathlib import Path

    import napari_mae

    # read, not imported: the core tests import no Qt
    src = (Path(napari_mae.__file__).parent / "widgets" / "_layers.py").read_text()
    assert "def _detect_channel_axis" not in src
    assert "guess_layer_channel_axis" in src
