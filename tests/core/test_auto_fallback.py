"""method="auto": the bundled decoder on 2D images, the classical pipeline where it is unsure."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from synthetic import random_nuclei

import napari_mae.segmentation.learned as learned
from napari_mae._names import bundled_segmenter_path
from napari_mae.segmentation import segment_instances
from napari_mae.segmentation.learned import foreground_ambiguity
from napari_mae.segmentation.scribbles import simulate_scribbles

pytestmark = pytest.mark.skipif(
    not bundled_segmenter_path("default-2d").is_file(), reason="bundled segmentation model missing"
)


@pytest.mark.parametrize(
    ("foreground", "expected"),
    [
        (np.zeros((8, 8)), 0.0),  # nothing above the low end
        (np.ones((8, 8)), 0.0),  # sure everywhere
        (np.full((8, 8), 0.5), 1.0),
        (np.r_[np.full(30, 0.9), np.full(10, 0.5), np.full(60, 0.1)], 0.25),
        (np.full((2, 4, 4), 0.3), 1.0),  # volumes too
    ],
)
def test_foreground_ambiguity(foreground, expected):
    assert foreground_ambiguity(foreground) == pytest.approx(expected)


@pytest.fixture
def nuclei():
    img, gt = random_nuclei(3, shape=(128, 128), n=14, radius=(6, 9))
    return img, gt


def test_auto_runs_the_bundled_decoder_on_a_2d_image(nuclei):
    img, _ = nuclei
    labels, info = segment_instances(img)
    assert info["method"] == "learned" and "fallback" not in info
    assert 0.0 <= info["ambiguity"] <= learned.MAX_AMBIGUITY
    ref, _ = segment_instances(img, method="learned")
    np.testing.assert_array_equal(labels, ref)


def test_auto_falls_back_to_classical_where_the_decoder_is_unsure(nuclei, monkeypatch):
    img, _ = nuclei
    monkeypatch.setattr(learned, "MAX_AMBIGUITY", -1.0)  # every image is "unsure"
    labels, info = segment_instances(img)
    assert info["method"] == "classical" and "unsure" in info["fallback"]
    assert info["ambiguity"] >= 0.0
    assert "model" not in info and "decoder" not in info  # the decoder's entries are not kept
    ref, ref_info = segment_instances(img, method="classical")
    np.testing.assert_array_equal(labels, ref)
    assert info["threshold"] == ref_info["threshold"]
    # method="learned" is never second-guessed
    _, info = segment_instances(img, method="learned")
    assert info["method"] == "learned" and "fallback" not in info


def test_a_model_the_caller_names_is_not_second_guessed(nuclei, monkeypatch, tmp_path):
    img, _ = nuclei
    monkeypatch.setattr(learned, "MAX_AMBIGUITY", -1.0)
    own = tmp_path / "mine.pt"
    shutil.copy(bundled_segmenter_path("default-2d"), own)
    _, info = segment_instances(img, model=str(own))
    assert info["method"] == "learned"
    _, info = segment_instances(img, model="default-2d")  # a bundled name: calibrated, checked
    assert info["method"] == "classical"


def test_auto_takes_grey_rgb_but_not_colour_or_volumes(nuclei):
    img, gt = nuclei
    grey = np.repeat(img[..., None], 3, axis=-1)
    _, info = segment_instances(grey)
    assert info["method"] == "learned"
    colour = grey.copy()
    colour[..., 1] = colour[..., 1].max() - colour[..., 1]  # another picture in green, not a tint
    near = grey.copy()
    near[5, 5, 1] += 1  # one pixel off (a stray value, JPEG): still grey
    assert segment_instances(near)[1]["method"] == "learned"
    _, info = segment_instances(colour)
    assert info["method"] == "classical" and "colour" in info["fallback"] and "ambiguity" not in info
    volume = np.stack([img] * 12).astype(np.float32)
    _, info = segment_instances(volume)
    assert info["method"] == "classical" and "fallback" not in info  # auto on volumes: as documented
    _, info = segment_instances(img, threshold=0.2)  # the classical pipeline's threshold: classical
    assert info["method"] == "classical" and info["threshold"] == 0.2 and "threshold" in info["fallback"]
    _, info = segment_instances(img[:12, :40])  # too small for the decoder
    assert info["method"] == "classical" and "under 16" in info["fallback"]
    _, info = segment_instances(img, scribbles=simulate_scribbles(gt, seed=0))
    assert info["method"] == "classical" and info["mode"] == "scribbles"


def test_cli_fallback_does_not_say_the_model_is_no_segmentation_model(nuclei, tmp_path, monkeypatch, capsys):
    import tifffile

    from napari_mae.cli import main

    img, _ = nuclei
    tifffile.imwrite(tmp_path / "im.tif", img)
    monkeypatch.setattr(learned, "MAX_AMBIGUITY", -1.0)
    rc = main(
        [
            "segment",
            str(tmp_path / "im.tif"),
            "--model",
            "default-2d",
            "--out",
            str(tmp_path / "l.tif"),
            "--quiet",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["method"] == "classical" and "unsure" in out["fallback"]
    assert "not a segmentation model" not in captured.err


def test_auto_stays_classical_where_the_decoder_cannot_apply(nuclei, monkeypatch):
    import napari_mae.segmentation.segment as segment
    from napari_mae.segmentation.params import SegmentationParams

    img, _ = nuclei
    # two equal channels (not RGB): no crash reading a third one
    _, info = segment_instances(np.stack([img, img]), channel_axis=0)
    assert info["method"] == "classical"
    # the classical pipeline's own options are not ignored
    for kw in ({"tile_shape": (64, 64)}, {"params": SegmentationParams()}):
        _, info = segment_instances(img, **kw)
        assert info["method"] == "classical", kw
    # a constant image: no decoder ran, none is reported
    _, info = segment_instances(np.zeros((64, 64), np.float32))
    assert info["method"] == "classical" and info["n_objects"] == 0
    # the decoder's grid counts: small objects are upsampled to its radius
    monkeypatch.setattr(segment, "AUTO_LEARNED_MAX_PIXELS", img.size * 4)
    _, info = segment_instances(img, object_radius=2.0)  # 2 px nuclei: 4x per axis, 16x the pixels
    assert info["method"] == "classical"
    _, info = segment_instances(img)
    assert info["method"] == "learned"


def test_the_2d_decoder_reports_progress_and_stops(nuclei):
    from napari_mae._progress import Cancelled

    img, _ = nuclei
    seen = []
    segment_instances(img, progress=lambda d, t, m: seen.append(m))
    assert any(m.startswith("window") for m in seen), seen

    def stop(done, total, message):
        if message.startswith("window"):
            raise Cancelled

    with pytest.raises(Cancelled):
        segment_instances(img, progress=stop)


def test_blockwise_auto_without_a_model_is_classical(nuclei):
    import dask.array as da

    from napari_mae.distributed import estimate_global_parameters

    img, _ = nuclei
    big = da.from_array(np.tile(img, (2, 2)), chunks=(128, 128))
    params, info = estimate_global_parameters(big, method="auto")
    assert params.method == "classical"
    assert all(sample["method"] == "classical" for sample in info["samples"])


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (1, 40), (8, 8)])
def test_the_decoder_takes_tiny_images(shape):
    # a one-token grid left the decoder's instance norms a single value: torch raised
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    labels, info = segment_instances(img, method="learned")
    assert labels.shape == shape and info["method"] == "learned"
