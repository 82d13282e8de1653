"""segment_instances with parameters estimated elsewhere (a volume's, for its blocks):
``intensity_range`` and ``radius_from_planes``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_mae.preprocess import percentile_range
from napari_mae.segmentation import segment_instances


def _blobs(shape=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    img[tuple(rng.integers(8, n - 8, 12) for n in shape)] = 1.0
    img = ndi.gaussian_filter(img, 3.0)
    return (1000.0 * img / img.max() + 20.0 * rng.standard_normal(shape)).astype(np.float32)


def test_the_images_own_range_changes_nothing():
    img = _blobs()
    lo, hi = percentile_range(img[None], 1.0, 99.8)
    # the classical pipeline's normalisation (auto would run the bundled decoder on the first)
    ref, info = segment_instances(img, method="classical")
    lab, info2 = segment_instances(img, method="classical", intensity_range=(lo[0], hi[0]))
    assert info["n_objects"] > 0
    np.testing.assert_array_equal(lab, ref)
    assert dict(info2) == dict(info)


def test_a_wider_range_is_a_fainter_image():
    img = _blobs()
    lo, hi = percentile_range(img[None], 1.0, 99.8)
    kw = dict(threshold=0.3, object_radius=3.0, bright_objects=True)
    n_own = segment_instances(img, **kw)[1]["n_objects"]
    n_wide = segment_instances(img, intensity_range=(lo[0], lo[0] + 4 * (hi[0] - lo[0])), **kw)[1][
        "n_objects"
    ]
    assert n_own > n_wide  # the same cut on values 4x smaller: fewer objects above it


@pytest.mark.parametrize(
    ("image", "intensity_range", "match"),
    [
        (np.ones((16, 16)), (1.0, 1.0), "hi > lo"),
        (np.ones((16, 16)), (0.0, float("nan")), "finite"),
        (np.ones((16, 16, 2)), (0.0, 1.0), "single-channel"),
    ],
)
def test_bad_intensity_range(image, intensity_range, match):
    kw = {"channel_axis": -1} if image.ndim == 3 else {}
    with pytest.raises(ValueError, match=match):
        segment_instances(image, intensity_range=intensity_range, **kw)


def test_radius_from_planes_false_keeps_the_radius(monkeypatch):
    import torch

    import napari_mae.segmentation.learned as learned
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder
    from napari_mae.models.mae import build_model

    radii = []

    def maps(net, volume, spacing, radius, r_ref, **kw):  # records the radius the volume is resampled for
        radii.append(radius)
        v = np.clip(volume, 0.0, 1.0)
        return np.stack([v, 1.0 - v, 1.0 - v]).astype(np.float32), (1.0, 1.0, 1.0)

    monkeypatch.setattr(learned, "predict_volume_maps", maps)
    monkeypatch.setattr(learned, "_radius_from_planes", lambda *a, **k: 7.5)
    torch.manual_seed(0)
    net = InstanceDecoder(build_model("tiny-2d"), DecoderConfig(features=4)).eval()
    vol = np.stack([_blobs((32, 32), seed=s) for s in range(12)])
    _, info = segment_instances(vol, method="learned", model=net)
    _, kept = segment_instances(vol, method="learned", model=net, radius_from_planes=False)
    assert radii == [7.5, kept["radius"]] and kept["radius"] != 7.5
    assert info["radius_planes"] == 7.5 and kept["radius_planes"] is None
    # a given radius is never re-estimated from planes
    radii.clear()
    _, given = segment_instances(vol, method="learned", model=net, object_radius=3.0)
    assert radii == [3.0] and given["radius_planes"] is None
