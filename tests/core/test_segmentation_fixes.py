"""Bugs found in a read of the classical segmentation (issue 11), each failing before its fix."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_mae.segmentation import estimate_object_radius
from napari_mae.segmentation import segment_instances as _segment_instances

segment_instances = functools.partial(_segment_instances, method="classical")


def _blobs(shape, radius, spacing_px, seed=0):
    """Bright disks of ``radius`` px on a dark, slightly noisy background, and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    img = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    k = 0
    for cy in range(spacing_px // 2, shape[0] - radius, spacing_px):
        for cx in range(spacing_px // 2, shape[1] - radius, spacing_px):
            k += 1
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            img[disk] = 1.0
            labels[disk] = k
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 0.02, shape).astype(np.float32)
    return img, labels


def test_radius_estimate_takes_a_foreground_for_inputs_over_2m_pixels():
    # It indexed its 2 M pixel crop with the full-size mask and raised.
    img, labels = _blobs((1500, 1500), 6, 30)
    est = estimate_object_radius(img, foreground=labels > 0)
    assert 0.6 * 6 < est["radius_foreground"] < 1.6 * 6


def test_tiled_scribble_run_reports_its_own_threshold():
    # The tiled path reported the last tile's threshold: here a tile without strokes, cut
    # at its own automatic Otsu level (a top-hat intensity), not a probability.
    img, labels = _blobs((160, 320), 6, 32)
    scrib = np.zeros(img.shape, np.uint8)
    scrib[labels == 1] = 2
    scrib[labels == 2] = 2
    scrib[5:8, 5:150] = 1  # background, in the left half only
    _, untiled = segment_instances(img, scribbles=scrib)
    lab, tiled = segment_instances(img, scribbles=scrib, tile_shape=(160, 160))
    assert tiled["tiles"] == 2
    assert tiled["threshold"] == pytest.approx(untiled["threshold"])
    assert len(tiled["tile_thresholds"]) == 2
    assert lab.max() >= 0.8 * labels.max()


def test_h_maxima_falls_back_to_scikit_image_when_its_private_helper_changes(monkeypatch):
    from skimage.morphology import _grayreconstruct, h_maxima

    from napari_mae.segmentation import watershed

    rng = np.random.default_rng(1)
    image = ndi.gaussian_filter(rng.random((40, 50)), 2)
    expected = h_maxima(image, 0.01)
    assert np.array_equal(watershed.h_maxima(image, 0.01), expected)  # the private path

    def changed(*args):
        raise TypeError("reconstruction_loop() takes 7 positional arguments")

    monkeypatch.setattr(_grayreconstruct, "reconstruction_loop", changed)
    assert np.array_equal(watershed.h_maxima(image, 0.01), expected)


@pytest.mark.parametrize("kind", ["random", "repeated_pair", "all_equal", "diagonal", "zero"])
def test_closed_form_eigenvalues_match_scikit_image(kind):
    from skimage.feature import hessian_matrix_eigvals

    from napari_mae.segmentation.features import _eigvals_sym3

    rng = np.random.default_rng(2)
    n = 200
    if kind == "random":
        a = rng.normal(size=(n, 3, 3))
    elif kind == "repeated_pair":  # eigenvalues (2, 2, -1) in a random basis
        q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
        a = q @ np.diag([2.0, 2.0, -1.0]) @ np.transpose(q, (0, 2, 1))
    elif kind == "all_equal":
        a = np.broadcast_to(np.eye(3) * 1.5, (n, 3, 3)).copy()
    elif kind == "diagonal":
        a = np.zeros((n, 3, 3))
        a[:, [0, 1, 2], [0, 1, 2]] = rng.normal(size=(n, 3))
    else:
        a = np.zeros((n, 3, 3))
    a = (a + np.transpose(a, (0, 2, 1))) / 2
    h = [a[:, 0, 0], a[:, 0, 1], a[:, 0, 2], a[:, 1, 1], a[:, 1, 2], a[:, 2, 2]]
    ours = _eigvals_sym3(h)
    ref = hessian_matrix_eigvals([x.reshape(n, 1, 1) for x in h]).reshape(3, n)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, float(np.abs(a).max())))
