"""Tiled reconstruction (napari_mae.reconstruction)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_mae import reconstruction as rec
from napari_mae._progress import Cancelled
from napari_mae.masking import make_mask, mask_to_pixels, patch_grid_shape
from napari_mae.models.mae import MAEConfig, MaskedAutoencoder, build_model
from napari_mae.reconstruction import reconstruct, window_layout

MICRO_2D = MAEConfig(img_size=(32, 32), patch_size=(8, 8), embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, name="micro-2d")  # fmt: skip
MICRO_3D = MAEConfig(img_size=(8, 32, 32), patch_size=(2, 8, 8), embed_dim=36, depth=1, num_heads=2,
                     decoder_embed_dim=18, decoder_depth=1, decoder_num_heads=2, name="micro-3d")  # fmt: skip
SENTINEL = -5.0  # what the oracle predicts for removed patches, in normalised units


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Oracle(MaskedAutoencoder):
    """Predicts visible patches perfectly and removed ones as SENTINEL.

    If a window's tokens were not aligned with the global patch grid, or a
    window were given the wrong part of the mask, removed pixels would receive
    true image values from some window and would no longer equal the sentinel.
    """

    def forward(self, x, mask=None, generator=None, *, mask_ratio=None):
        self._check_input(x)
        mask = self._as_token_mask(mask, x.shape[0], x.device)
        self.calls.append(mask.clone())
        pred = torch.where(mask.unsqueeze(-1), torch.full_like(self.patchify(x), SENTINEL), self.patchify(x))
        return pred, mask


def oracle(config):
    model = Oracle(dataclasses.replace(config, norm_pix_loss=False))
    model.calls = []
    return model


@pytest.fixture(scope="module")
def micro2d():
    torch.manual_seed(0)
    return build_model(MICRO_2D)


@pytest.fixture(scope="module")
def micro3d():
    torch.manual_seed(0)
    return build_model(MICRO_3D)


def _image(shape, dtype=np.float32, seed=0):
    return (np.random.default_rng(seed).random(shape) * 1000).astype(dtype)


@pytest.mark.parametrize(
    ("config", "shape", "overlap", "slab_bytes"),
    [
        (MICRO_2D, (37, 53), 0.25, None),  # odd size, partial edge patches
        (MICRO_2D, (5, 5), 0.25, None),  # smaller than one patch
        (MICRO_2D, (100, 75), 0.5, None),  # several overlapping windows
        (MICRO_2D, (130, 41), 0.25, 41 * 4 * 40),  # several slabs along Y
        (MICRO_3D, (9, 37, 53), 0.25, None),
        (MICRO_3D, (45, 40, 33), 0.5, 48 * 40 * 4 * 6),  # slabs along Z
    ],
)
def test_every_window_reads_its_part_of_the_global_mask(monkeypatch, config, shape, overlap, slab_bytes):
    slabs = []
    real_slabs = rec._slabs
    monkeypatch.setattr(rec, "_slabs", lambda *a: slabs.extend(real_slabs(*a)) or slabs)
    if slab_bytes is not None:
        monkeypatch.setattr(rec, "SLAB_BYTES", slab_bytes)
    model = oracle(config)
    image = _image(shape)
    result = reconstruct(image, model, mask_ratio=0.6, seed=1, device="cpu", overlap=overlap, batch_size=3)
    removed = result.mask
    sentinel = result.lo[0] + SENTINEL * (result.hi[0] - result.lo[0])
    np.testing.assert_allclose(result.reconstruction[removed], sentinel, rtol=1e-5)
    np.testing.assert_array_equal(result.reconstruction[~removed], image[~removed])
    # Removed counts seen by the model are those of the global grid's cells it covers.
    assert sum(int(m.sum()) for m in model.calls) > 0
    assert (len(slabs) > 1) == (slab_bytes is not None)


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (MICRO_2D, (37, 53)),
        (MICRO_2D, (64, 64)),
        (MICRO_2D, (3, 70)),
        (MICRO_3D, (9, 37, 53)),
        (MICRO_3D, (1, 8, 8)),
    ],
)
def test_odd_sizes_keep_shape_and_visible_pixels(config, shape, micro2d, micro3d):
    model = micro2d if config is MICRO_2D else micro3d
    image = _image(shape)
    result = reconstruct(image, model, device="cpu", seed=0)
    assert result.reconstruction.shape == shape and result.reconstruction.dtype == np.float32
    assert result.masked.shape == shape and result.masked.dtype == image.dtype
    assert result.error.shape == shape and result.mask.shape == shape
    visible = ~result.mask
    np.testing.assert_array_equal(result.reconstruction[visible], image[visible])
    np.testing.assert_array_equal(result.masked[visible], image[visible])
    assert (result.masked[result.mask] == 0).all()
    assert (result.error[visible] == 0).all()
    assert np.isfinite(result.reconstruction).all()
    assert result.patch_mask.shape == patch_grid_shape(shape, config.patch_size)


def test_same_seed_same_result_different_seed_different_mask(micro2d):
    image = _image((40, 50))
    a = reconstruct(image, micro2d, seed=3, device="cpu")
    b = reconstruct(image, micro2d, seed=3, device="cpu")
    c = reconstruct(image, micro2d, seed=4, device="cpu")
    np.testing.assert_array_equal(a.patch_mask, b.patch_mask)
    np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    assert (a.patch_mask != c.patch_mask).any()
    np.testing.assert_array_equal(a.patch_mask, make_mask((40, 50), 8, mask_ratio=0.75, seed=3))


def test_given_mask_is_used(micro2d):
    image = _image((37, 53))
    mask = make_mask((37, 53), 8, mask_ratio=0.3, strategy="block", seed=2)
    result = reconstruct(image, micro2d, mask=mask, device="cpu")
    np.testing.assert_array_equal(result.patch_mask, mask)
    np.testing.assert_array_equal(result.mask, mask_to_pixels(mask, (37, 53), 8))


@pytest.mark.parametrize(
    ("mask", "match"),
    [(np.zeros((4, 4), bool), "not the patch grid"), (np.zeros((37, 53), bool), "pixel mask")],
)
def test_wrong_mask_shape_says_what_to_pass(micro2d, mask, match):
    with pytest.raises(ValueError, match=match):
        reconstruct(_image((37, 53)), micro2d, mask=mask, device="cpu")


def _bad_strides():
    return _image((60, 50))[::-1, ::-2]


# Bad input: either it works (and the check says what "works" means) or it raises ValueError.
WORKS = [
    ("nan-and-inf", lambda: np.where(np.eye(40, 48, dtype=bool), np.nan, _image((40, 48))), {}),
    ("inf", lambda: np.where(np.eye(40, 48, dtype=bool), np.inf, _image((40, 48))), {}),
    ("constant", lambda: np.full((40, 48), 7.0), {}),
    ("smaller-than-a-patch", lambda: _image((3, 4)), {}),
    ("bool", lambda: _image((40, 48)) > 500, {}),
    ("int64", lambda: _image((40, 48), np.int64), {}),
    ("float16", lambda: _image((40, 48), np.float16), {}),
    ("uint16", lambda: _image((40, 48), np.uint16), {}),
    ("rgb", lambda: _image((40, 48, 3), np.uint8), {}),
    ("negative-strides", _bad_strides, {}),
    ("transposed", lambda: _image((48, 40)).T, {}),
    ("channels-first", lambda: _image((2, 40, 48)), {"channel_axis": 0}),
]


@pytest.mark.parametrize(("name", "make", "kwargs"), WORKS, ids=[w[0] for w in WORKS])
def test_bad_input_that_works(micro2d, name, make, kwargs):
    image = make()
    result = reconstruct(image, micro2d, device="cpu", seed=0, **kwargs)
    assert result.reconstruction.shape == image.shape
    assert np.isfinite(result.reconstruction).all(), "non-finite pixels are predicted, not propagated"
    finite = np.isfinite(image.astype(np.float64))
    visible = np.broadcast_to(
        ~result.mask[..., None] if image.ndim == 3 and name == "rgb" else ~result.mask, image.shape
    )
    if name == "channels-first":
        visible = np.broadcast_to(~result.mask, image.shape)
    keep = visible & finite
    np.testing.assert_array_equal(result.reconstruction[keep], image[keep].astype(np.float32))
    assert np.isnan(result.error[~finite]).all()
    if name == "constant":
        assert (result.reconstruction == 7.0).all()
    if name == "negative-strides":
        again = reconstruct(np.ascontiguousarray(image), micro2d, device="cpu", seed=0)
        np.testing.assert_allclose(result.reconstruction, again.reconstruction, rtol=1e-5)


RAISES = [
    ("mask-ratio-1", lambda: _image((40, 48)), {"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
    ("mask-ratio-negative", lambda: _image((40, 48)), {"mask_ratio": -0.1}, "mask_ratio"),
    ("mask-ratio-nan", lambda: _image((40, 48)), {"mask_ratio": float("nan")}, "mask_ratio"),
    ("complex", lambda: _image((40, 48)).astype(complex), {}, "np.abs"),
    ("all-nan", lambda: np.full((40, 48), np.nan), {}, "no finite pixel"),
    ("1d", lambda: _image((40,)), {}, "axes"),
    ("volume-for-2d-model", lambda: _image((9, 37, 53)), {}, "is a 2D model .* image is 3D"),
    ("bad-strategy", lambda: _image((40, 48)), {"strategy": "spiral"}, "strategy"),
    ("bad-fill", lambda: _image((40, 48)), {"fill": "blur"}, "fill"),
    ("bad-overlap", lambda: _image((40, 48)), {"overlap": 1.0}, "overlap"),
    ("bad-batch", lambda: _image((40, 48)), {"batch_size": 0}, "batch_size"),
]


@pytest.mark.parametrize(("name", "make", "kwargs", "match"), RAISES, ids=[r[0] for r in RAISES])
def test_bad_input_that_raises(micro2d, name, make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reconstruct(make(), micro2d, device="cpu", **kwargs)


def test_wrong_kind_of_model(micro3d):
    with pytest.raises(ValueError, match="is a 3D model .* image is 2D"):
        reconstruct(_image((40, 48)), micro3d, device="cpu")
    three = build_model(dataclasses.replace(MICRO_2D, in_channels=3))
    with pytest.raises(ValueError, match="takes 3 channel.* has 2"):
        reconstruct(_image((2, 40, 48)), three, channel_axis=0, device="cpu")


def test_multichannel_model_and_per_channel_single_channel_model(micro2d):
    image = _image((40, 48, 3), np.uint8)
    three = build_model(dataclasses.replace(MICRO_2D, in_channels=3))
    assert reconstruct(image, three, device="cpu").reconstruction.shape == image.shape
    # A one-channel model reconstructs each channel as if it were alone, with one mask.
    both = reconstruct(image, micro2d, device="cpu", seed=5)
    alone = reconstruct(image[..., 1], micro2d, device="cpu", seed=5)
    np.testing.assert_allclose(both.reconstruction[..., 1], alone.reconstruction, rtol=1e-4, atol=1e-3)


def test_memmap_and_dask_inputs_match_numpy(micro2d, tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "SLAB_BYTES", 80 * 4 * 40)
    image = _image((150, 80))
    mm = np.memmap(tmp_path / "x.raw", dtype=np.float32, mode="w+", shape=image.shape)
    mm[:] = image
    mm.flush()
    ro = np.memmap(tmp_path / "x.raw", dtype=np.float32, mode="r", shape=image.shape)
    expected = reconstruct(image, micro2d, device="cpu").reconstruction
    np.testing.assert_array_equal(reconstruct(ro, micro2d, device="cpu").reconstruction, expected)
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(image, chunks=(50, 80))
    result = reconstruct(lazy, micro2d, device="cpu")
    np.testing.assert_array_equal(result.reconstruction, expected)
    assert isinstance(result.masked, np.ndarray)


def test_slabs_tile_the_first_axis():
    for padded, size, roi, patch, interval, rows in [
        (4096, 4096, 64, 8, 48, 500),
        (104, 100, 16, 4, 12, 20),
        (64, 37, 64, 8, 48, 10),
    ]:
        slabs = list(rec._slabs(padded, size, roi, patch, interval, rows))
        assert slabs[0].keep_start == 0 and slabs[-1].keep_stop >= size
        for a, b in zip(slabs, slabs[1:]):
            assert a.keep_stop == b.keep_start
        for s in slabs:
            assert s.start % patch == 0 and s.stop - s.start >= min(roi, padded)
            assert s.start <= s.keep_start < s.keep_stop <= s.stop <= padded


@pytest.mark.parametrize("roi", [(64, 64), (16, 64, 64), (40, 24), (8, 32, 32)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6, 0.9])
def test_window_layout_reproduces_monai_interval(roi, overlap):
    from monai.inferers.utils import _get_scan_interval

    patch = (8,) * len(roi) if len(roi) == 2 else (4, 8, 8)
    patch = tuple(min(p, r) for p, r in zip(patch, roi))
    interval, monai_overlap = window_layout(roi, patch, overlap)
    image = tuple(3 * r for r in roi)
    assert _get_scan_interval(image, roi, len(roi), monai_overlap) == interval
    assert all(i % p == 0 and 0 < i <= r for i, p, r in zip(interval, patch, roi))


def test_progress_and_cancel(micro2d):
    calls = []
    reconstruct(_image((100, 100)), micro2d, device="cpu", progress=lambda d, t, m: calls.append((d, t)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    def cancel(done, total, message):
        if done > 0:
            raise Cancelled

    with pytest.raises(Cancelled):
        reconstruct(_image((100, 100)), micro2d, device="cpu", progress=cancel)


def test_model_spec_string_and_training_mode_restored(micro2d):
    micro2d.train()
    reconstruct(_image((20, 20)), micro2d, device="cpu")
    assert micro2d.training
    micro2d.eval()
    result = reconstruct(_image((20, 20)), "tiny-2d", device="auto")
    assert result.device in ("cpu", "cuda", "mps")


def test_norm_pix_stats_come_from_visible_neighbours(micro2d):
    """A removed token takes the mean/std of the visible tokens around it."""
    windows = torch.zeros(1, 1, 32, 32)
    windows[..., :16, :] = 2.0  # top half bright, bottom half dark
    removed = torch.zeros(1, 16, dtype=torch.bool)
    removed[0, 0] = True  # top-left: its neighbours are bright
    removed[0, 15] = True  # bottom-right: its neighbours are dark
    mean, std = rec._neighbour_patch_stats(micro2d, windows, removed)
    assert mean[0, 0, 0].item() == pytest.approx(2.0)
    assert mean[0, 15, 0].item() == pytest.approx(0.0)
    all_removed = torch.ones(1, 16, dtype=torch.bool)
    mean, std = rec._neighbour_patch_stats(micro2d, windows, all_removed)
    assert (mean == 0).all() and (std == 0).all()
