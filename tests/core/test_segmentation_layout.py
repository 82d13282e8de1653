"""The segmentation package's rooms: frozen parameters, the typed info record, the one
checks in preprocess, the shared relabel and tiler, and the former module paths."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from skimage.draw import disk

from napari_mae._json import to_jsonable
from napari_mae.preprocess import check_channel_axis, check_spacing, guess_rgb_axis
from napari_mae.segmentation import SegmentationInfo, SegmentationParams
from napari_mae.segmentation import segment_instances as _segment_instances

segment_instances = functools.partial(_segment_instances, method="classical")


def _disks(shape=(96, 96), n=6, radius=6, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(0.1, 0.02, shape).astype(np.float32)
    for _ in range(n):
        rr, cc = disk(tuple(rng.integers(radius + 2, s - radius - 2) for s in shape), radius, shape=shape)
        img[rr, cc] = 1.0
    return img


def test_params_are_frozen_and_keep_the_defaults():
    p = SegmentationParams()
    with pytest.raises(AttributeError):
        p.h = 0.2  # type: ignore[misc]
    assert (p.smooth, p.background, p.gamma, p.threshold_scale, p.threshold_scale_3d) == (
        0.12,
        1.5,
        1.0,
        0.7,
        0.85,
    )
    assert (p.h, p.dist_smooth, p.min_size, p.intensity, p.low_probability) == (0.1, 0.1, 0.25, 0.5, 0.4)
    assert p.working_radius_px == 8.0
    assert p.replace(h=0.2).h == 0.2 and p.h == 0.1


@pytest.mark.parametrize(
    "bad",
    [
        {"h": -0.1},
        {"gamma": 0.0},
        {"low_probability": 1.0},
        {"thin_foreground": 0.0},
        {"thin_foreground": 1.5},
        {"smooth": float("nan")},
        {"threshold_scale": "x"},
    ],
)
def test_bad_params_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SegmentationParams(**bad)


def test_params_change_the_result_and_are_not_shared_between_runs():
    img = _disks()
    base, _ = segment_instances(img)
    _, info = segment_instances(img, params=SegmentationParams(threshold_scale=3.0))
    again, _ = segment_instances(img)
    assert np.array_equal(base, again)  # the other run's parameters did not leak
    assert info["threshold"] > 2 * segment_instances(img)[1]["threshold"]
    with pytest.raises(ValueError, match="SegmentationParams"):
        segment_instances(img, params={"h": 0.1})


def test_info_is_a_typed_read_only_mapping():
    img = _disks()
    _, info = segment_instances(img)
    assert isinstance(info, SegmentationInfo)
    assert info.radius == info["radius"] and info.mode == "automatic" and info.method == "classical"
    assert "tile_thresholds" not in info and info.get("tile_thresholds") is None  # absent, not None
    assert "model" not in dict(info) and "working_shape" in info
    with pytest.raises(KeyError):
        info["not_a_field"]
    with pytest.raises(TypeError):
        info["radius"] = 1.0  # type: ignore[index]
    text = json.dumps(to_jsonable(info))
    assert json.loads(text)["n_objects"] == info["n_objects"] and len(info.to_dict()) == len(info)


@pytest.mark.parametrize("axis", [3, -4])
def test_channel_axis_out_of_range_raises_the_same_everywhere(axis):
    from napari_mae.preprocess import resolve_channel_axis
    from napari_mae.segmentation.features import multiscale_features

    img = np.zeros((20, 20, 3), np.float32)
    for call in (
        lambda: check_channel_axis(axis, 3),
        lambda: resolve_channel_axis(img.shape, channel_axis=axis),
        lambda: multiscale_features(img, channel_axis=axis),
        lambda: segment_instances(img, channel_axis=axis),
    ):
        with pytest.raises(ValueError, match=f"channel_axis={axis} is out of range for an array of 3 dims"):
            call()


def test_features_reject_non_finite_spacing():
    # features checked the sign of spacing but not its finiteness (inf passed through).
    from napari_mae.segmentation.features import multiscale_features

    with pytest.raises(ValueError, match="spacing"):
        multiscale_features(np.zeros((16, 16), np.float32), spacing=(1.0, float("inf")))
    with pytest.raises(ValueError, match="spacing"):
        check_spacing((1.0, float("nan")), 2)
    assert check_spacing(None, 3).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("shape", "spacing", "expected"),
    [
        ((64, 64, 3), None, 2),
        ((64, 64, 4), (1.0, 1.0), 2),
        ((64, 64, 3), (1, 1, 1), None),
        ((8, 64, 3), None, None),
    ],
)
def test_rgb_guess(shape, spacing, expected):
    assert guess_rgb_axis(shape, spacing=spacing) == expected


def test_learned_relabel_is_the_shared_one():
    from napari_mae.segmentation.learned import LearnedParams, instances_from_maps

    maps = np.zeros((3, 40, 40), np.float32)
    maps[1:] = 1.0
    for cy, cx in ((10, 10), (30, 28)):
        rr, cc = disk((cy, cx), 6, shape=(40, 40))
        maps[0][rr, cc] = 1.0
        maps[1][rr, cc] = maps[2][rr, cc] = 0.2
    lab = instances_from_maps(maps, LearnedParams(sigma_distance=0, sigma_foreground=0))
    assert lab.dtype == np.int32 and lab.max() == 2
    assert np.array_equal(np.unique(lab), [0, 1, 2])


def test_one_tiler_covers_the_array_once():
    from napari_mae.segmentation.tiling import tile_slices

    cover = np.zeros((23, 17), int)
    for outer, inner, dst in tile_slices(cover.shape, (10, 6), (3, 2)):
        view = np.arange(cover.size).reshape(cover.shape)
        assert np.array_equal(view[outer][inner], view[dst])
        cover[dst] += 1
    assert (cover == 1).all()


def test_former_module_paths_still_import_and_nothing_cycles():
    code = (
        "import sys\n"
        "from napari_mae.features import multiscale_features\n"
        "from napari_mae.metrics import match_instances\n"
        "from napari_mae.scribbles import simulate_scribbles\n"
        "import napari_mae.segmentation.classical as c, napari_mae.segmentation.prepare as p\n"
        "assert 'torch' not in sys.modules, 'segmentation imports torch'\n"
        "assert 'napari_mae.segmentation.learned' not in sys.modules\n"
        "from napari_mae.segmentation.learned import prepare_image\n"
        "assert prepare_image is p.prepare_image\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
