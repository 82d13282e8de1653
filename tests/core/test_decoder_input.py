"""The decoder's input scaling (learned.decoder_input) and where it is applied.

Percentiles of a noisy image sit in the noise's tails, which leaves its background grey
and its objects dim for the decoder; decoder_input scales by the percentiles of a
smoothed copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import five_nuclei

from napari_mae.segmentation import learned
from napari_mae.segmentation.prepare import prepare_image


def _noisy(sd: float, seed: int = 0):
    img, gt = five_nuclei((96, 96), radius=8)
    rng = np.random.default_rng(seed)
    return img.astype(np.float32) + rng.normal(0, sd, img.shape).astype(np.float32), gt


def test_noisy_image_background_nearer_zero_objects_nearer_one():
    x, gt = _noisy(60.0)
    prepared, _ = prepare_image(x)
    out = learned.decoder_input(prepared)
    bg_in, fg_in = np.median(prepared[gt == 0]), np.median(prepared[gt > 0])
    bg_out, fg_out = np.median(out[gt == 0]), np.median(out[gt > 0])
    # the image's own percentiles leave the background grey and the objects under 1
    assert bg_in > 0.25 and fg_in < 0.75
    assert abs(bg_out) < bg_in / 1.5
    assert abs(fg_out - 1.0) < (1.0 - fg_in) / 1.5
    # the contrast between objects and background grows
    assert fg_out - bg_out > 1.3 * (fg_in - bg_in)
    assert out.dtype == np.float32 and out.shape == x.shape


@pytest.mark.parametrize("shape", [(96, 96), (12, 96, 96)])
def test_clean_image_nearly_unchanged(shape):
    img, _ = five_nuclei((96, 96), radius=8)
    x = np.broadcast_to(img, shape).astype(np.float32)
    prepared, _ = prepare_image(x)
    out = learned.decoder_input(prepared)
    assert np.abs(out - prepared).max() < 0.1
    # applying it twice changes little
    assert np.abs(learned.decoder_input(out) - out).max() < 0.02


def test_constant_image_returned_unchanged():
    x = np.full((32, 32), 0.5, np.float32)
    np.testing.assert_array_equal(learned.decoder_input(x), x)


def _recorder(monkeypatch):
    calls = []
    real = learned.decoder_input

    def record(image, **kw):
        calls.append(image.shape)
        return real(image, **kw)

    monkeypatch.setattr(learned, "decoder_input", record)
    return calls


def test_segment_instances_learned_scales_the_decoder_input(monkeypatch, tiny_model):
    from napari_mae.segmentation import segment_instances

    calls = _recorder(monkeypatch)
    x, _ = _noisy(5.0)
    segment_instances(x, method="learned", model=tiny_model, object_radius=8.0)
    assert calls == [x.shape]
    # a given intensity_range (a block of a larger volume, scaled as the whole) is kept
    calls.clear()
    segment_instances(x, method="learned", model=tiny_model, object_radius=8.0, intensity_range=(0, 255))
    assert calls == []
    # the classical method is not affected
    segment_instances(x, method="classical", object_radius=8.0)
    assert calls == []


def test_training_pairs_are_scaled_as_inference(monkeypatch, tmp_path):
    import tifffile

    from napari_mae.training.segmentation import _read_pair

    calls = _recorder(monkeypatch)
    x, gt = _noisy(40.0)
    tifffile.imwrite(tmp_path / "a.tif", x)
    tifffile.imwrite(tmp_path / "a_labels.tif", gt)
    image, _, _ = _read_pair(tmp_path / "a.tif", tmp_path / "a_labels.tif")
    assert calls == [x.shape]
    prepared, _ = prepare_image(x)
    assert np.median(image[gt == 0]) < np.median(prepared[gt == 0]) / 1.5


def test_finetuning_is_scaled_as_inference(monkeypatch, tiny_model, tmp_path):
    from napari_mae.segmentation.finetune import FinetuneConfig, finetune

    calls = _recorder(monkeypatch)
    x, gt = _noisy(5.0)
    s = np.zeros(gt.shape, np.uint8)
    s[20, 16:25] = 2
    s[5, 5:40] = 1
    cfg = FinetuneConfig(
        seconds=None, steps=1, eval_every=1, batch_size=1, crop_size=64, device="cpu", pseudo_labels=False
    )
    for _ in finetune([x], [s], out=tmp_path / "ft.pt", model=tiny_model, config=cfg, object_radius=8.0):
        pass
    assert x.shape in calls


def test_smoothed_range_of_a_dask_volume_is_the_whole_arrays():
    """Block-wise segmentation takes the learned range of a lazy volume: smoothing it
    block by block (map_overlap) gives the range of the whole array smoothed at once."""
    import dask.array as da

    from napari_mae.preprocess import percentile_range

    rng = np.random.default_rng(0)
    x = (rng.random((20, 40, 36)) ** 3 * 1000).astype(np.float32)
    lo, hi = percentile_range(x[None], smooth=1.0)
    lo_d, hi_d = percentile_range(da.from_array(x, chunks=(7, 16, 16))[None], smooth=1.0)
    np.testing.assert_allclose([lo_d[0], hi_d[0]], [lo[0], hi[0]], rtol=1e-5)
    # and it is not the plain range (the noise's tails)
    plain = percentile_range(x[None])
    assert plain[0][0] < lo[0] and plain[1][0] > hi[0]


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_percentile_range_refuses_a_bad_smoothing(sigma):
    from napari_mae.preprocess import percentile_range

    with pytest.raises(ValueError, match="smooth="):
        percentile_range(np.ones((1, 8, 8), np.float32), smooth=sigma)


def test_invalid_pixels_are_left_out_of_the_range():
    """A slab of filled-in non-finite pixels (prepare_image sets them to its low end) does
    not pull the range: the background still lands near 0."""
    x, gt = _noisy(30.0)
    x[:, :30] = np.nan
    prepared, info = prepare_image(x)
    assert info["invalid"][:, :30].all()
    out = learned.decoder_input(prepared, invalid=info["invalid"])
    naive = learned.decoder_input(prepared)
    bg = (gt == 0) & ~info["invalid"]
    assert abs(float(np.median(out[bg]))) < 0.5 * float(np.median(naive[bg]))
