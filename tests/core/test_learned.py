"""Targets, decoder and post-processing of the learned segmentation pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse

from napari_mae.models.decoder import DecoderConfig, InstanceDecoder
from napari_mae.models.mae import build_model
from napari_mae.segmentation.learned import LearnedParams, instances_from_maps, median_radius, segment_learned
from napari_mae.segmentation.metrics import match_instances
from napari_mae.segmentation.targets import distance_targets


def _disks(shape=(64, 64), centres=((16, 16), (40, 44), (16, 48)), radius=7):
    labels = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, start=1):
        labels[disk(c, radius, shape=shape)] = i
    return labels


def test_targets_of_a_disk():
    labels = _disks(centres=((32, 32),), radius=10)
    t = distance_targets(labels)
    assert t.shape == (3, 64, 64) and t.dtype == np.float32
    assert t[0].sum() == (labels > 0).sum()
    assert t[1][32, 32] == 0.0 and t[2][32, 32] == 0.0  # centre: deepest voxel
    inside = labels > 0
    assert t[1][inside].max() == pytest.approx(1.0)
    assert t[2][inside].max() > 0.85  # boundary pixels: 1 - 1/10
    assert np.all(t[1:, ~inside] == 1.0)  # outside objects: ignored value


def test_targets_respect_spacing():
    # an ellipse twice as long along X in pixels is a circle when X pixels are half as large
    labels = np.zeros((41, 81), np.int32)
    labels[ellipse(20, 40, 15, 30, shape=labels.shape)] = 5
    t = distance_targets(labels, spacing=(1.0, 0.5))
    # physically round: the boundary distance falls off at the same rate along both axes
    assert t[2][20, 40 + 20] == pytest.approx(t[2][20 + 10, 40], abs=0.05)
    t_px = distance_targets(labels)
    assert abs(t_px[2][20, 60] - t_px[2][30, 40]) > 0.2


@pytest.mark.parametrize(
    ("labels", "spacing", "match"),
    [
        (np.zeros((8, 8), np.float32), None, "integer"),
        (-np.ones((8, 8), np.int32), None, "negative"),
        (np.zeros((8, 8), np.int32), (1.0,), "spacing"),
        (np.zeros((8, 8), np.int32), (1.0, 0.0), "spacing"),
    ],
)
def test_targets_bad_input(labels, spacing, match):
    with pytest.raises(ValueError, match=match):
        distance_targets(labels, spacing=spacing)


def test_watershed_recovers_labels_from_their_targets():
    labels = _disks(centres=((16, 16), (16, 30), (44, 40)), radius=7)  # two touching
    maps = distance_targets(labels)
    pred = instances_from_maps(maps, LearnedParams(sigma_distance=0.0, sigma_foreground=0.0))
    m = match_instances(labels, pred, iou_threshold=0.5)
    assert m["tp"] == 3 and m["fp"] == 0 and m["fn"] == 0


@pytest.mark.parametrize(
    ("patch", "size", "channels"),
    [((8, 8), (64, 64), 1), ((8, 8), (32, 48), 2), ((16, 16), (64, 32), 1), ((8, 8, 8), (16, 32, 32), 1)],
)
def test_decoder_shapes(patch, size, channels):
    mae = build_model(
        "tiny-2d" if len(patch) == 2 else "tiny-3d",
        patch_size=patch,
        in_channels=channels,
        img_size=tuple(max(s, 2 * p) for s, p in zip(size, patch)),
    )
    net = InstanceDecoder(mae, DecoderConfig(features=4))
    with torch.no_grad():
        y = net(torch.rand(2, channels, *size))
    assert y.shape == (2, 3, *size)
    assert float(y[:, 1:].min()) >= 0 and float(y[:, 1:].max()) <= 1


def test_decoder_shares_the_mae_encoder_and_trains_it():
    mae = build_model("tiny-2d")
    net = InstanceDecoder(mae, DecoderConfig(features=4))
    assert net.encoder.blocks is mae.blocks
    net(torch.rand(1, 1, 32, 32)).mean().backward()
    assert mae.blocks[0].mlp.linear1.weight.grad is not None
    conv_only = InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4), use_encoder=False)
    conv_only(torch.rand(1, 1, 32, 32)).mean().backward()
    assert conv_only.encoder.blocks[0].mlp.linear1.weight.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"patch_size": (4, 4)}, "patch_size"), ({"patch_size": (8, 16), "img_size": (64, 64)}, "patch_size")],
)
def test_decoder_bad_patch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InstanceDecoder(build_model("tiny-2d", **kwargs))


def test_decoder_bad_input_size():
    net = InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4))
    with pytest.raises(ValueError, match="multiple"):
        net(torch.rand(1, 1, 30, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"features": 0}, "features"), ({"out_channels": 1.5}, "out_channels")],
)
def test_decoder_config_bad(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"foreground_threshold": 1.0}, "foreground"),
        ({"min_size": -1}, "min_size"),
        ({"rescale_tolerance": 1.0}, "rescale"),
        ({"sigma_distance": -1}, "sigma"),
    ],
)
def test_learned_params_bad(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedParams(**kwargs)


def test_segment_learned_shapes_2d_and_3d():
    torch.manual_seed(0)
    net = InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4)).eval()
    img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    labels, info = segment_learned(img, net, 8.0, spacing=(1.0, 1.0), radius=6.0)
    assert labels.shape == img.shape and labels.dtype == np.int32
    assert info["passes"] in (1, 2)
    vol = np.random.default_rng(1).random((12, 20, 24)).astype(np.float32)
    labels3, info3 = segment_learned(vol, net, 8.0, spacing=(2.0, 1.0, 1.0), radius=8.0)
    assert labels3.shape == vol.shape
    assert len(info3["scale"]) == 3


def test_median_radius():
    assert median_radius(np.zeros((5, 5), np.int32)) is None
    assert median_radius(_disks(radius=10)) == pytest.approx(10, rel=0.05)


def test_cached_segmenter_names_the_model_asked_for():
    """'default-2d' and its alias 'default-2d-nuclei' are one file, cached once; the model
    kept the first name it was loaded by, so a folder run reported the other one."""
    from napari_mae.segmentation.learned import cached_segmenter

    a = cached_segmenter("default-2d-nuclei")
    assert a.source == "default-2d-nuclei"
    b = cached_segmenter("default-2d")
    assert b is a and b.source == "default-2d"
