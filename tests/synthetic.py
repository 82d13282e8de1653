"""Synthetic nuclei images shared by the tests (core and widgets).

Importable as ``synthetic`` from any test: ``pythonpath = ["tests"]`` in pyproject.toml's
``[tool.pytest.ini_options]``.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

#: The centres ``(y, x)`` of :func:`five_nuclei`, pixels.
FIVE_CENTRES = ((20, 20), (22, 70), (70, 28), (62, 74), (46, 48))


def five_nuclei(shape=(96, 96), radius=6) -> tuple[np.ndarray, np.ndarray]:
    """Five bright discs at :data:`FIVE_CENTRES` on a dark, noisy background.

    Parameters
    ----------
    shape : (int, int)
        ``(Y, X)`` in pixels.
    radius : float
        Disc radius in pixels.

    Returns
    -------
    image : ndarray of uint8, shape ``shape``
        20 + 150 inside the discs, Gaussian noise of sd 5 (seed 0).
    labels : ndarray of int32, shape ``shape``
        Disc ``k`` (1..5) labelled ``k``.
    """
    gt = np.zeros(shape, np.int32)
    for k, c in enumerate(FIVE_CENTRES, start=1):
        gt[disk(c, radius, shape=shape)] = k
    rng = np.random.default_rng(0)
    img = (20 + 150 * (gt > 0) + rng.normal(0, 5, shape)).clip(0, 255).astype(np.uint8)
    return img, gt


def random_nuclei(seed: int, shape=(96, 96), n=12, radius=(5, 9)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` bright discs of random radii at random places (later ones do not cover earlier ones).

    Parameters
    ----------
    seed : int
        Seed of places, radii and noise.
    shape : (int, int)
        ``(Y, X)`` in pixels.
    n : int
        Number of discs drawn (fewer labels remain where one is wholly covered).
    radius : (int, int)
        Radii drawn from ``[radius[0], radius[1])``, pixels.

    Returns
    -------
    image : ndarray of uint8, shape ``shape``
        40 + 150 inside the discs, Gaussian noise of sd 10.
    labels : ndarray of uint16, shape ``shape``
        Disc ``i`` labelled ``i`` (1..n).
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        r = int(rng.integers(*radius))
        c = rng.integers(r, np.array(shape) - r)
        rr, cc = disk(tuple(c), r, shape=shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = i
    image = (40 + 150 * (labels > 0) + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
    return image, labels
