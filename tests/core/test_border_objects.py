"""Issue 12.6: scribble mode splits a nucleus cut by the image border (open; strict xfail).

Seen on the bundled 2D sample with three of six simulated stroke sets: nucleus 26
(659 px, in the bottom-left corner, no stroke on it) comes out as two labels with a
straight edge between them. Diagnosis (working grid 311 x 417, r = 14.4): the
distance transform is smooth there (maximum in the corner), but the forest's
P(boundary), taught from the automatic objects' edge rings, is 0.3-0.5 inside this
object, so the landscape ``dist * (1 - P(boundary))`` has a dip of 2.9 between two
maxima on the bottom row (h = 1.44): two seeds. Counting the image border as
background in the distance transform removes every split here, but it was measured to
cost the benchmark (DSB auto 0.641 -> 0.636, 3D scribbles 0.690 -> 0.638: 43 of the 54
3D nuclei touch the border, and three pairs merge), so it is not applied. A fix belongs
in how P(boundary) enters the landscape (e.g. only where the distance is small against
the radius); these tests then pass and the xfail marks must go.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from napari_mae.segmentation import segment_instances as _segment_instances

# The classical pipeline's tiling: pin its method (the default "auto" runs the learned decoder).
segment_instances = functools.partial(_segment_instances, method="classical")


def _nuclei_2d_with_strokes(seed: int):
    """The bundled 2D sample with short strokes in a few nuclei (2) and in background (1)."""
    from napari_mae._sample_data import nuclei_2d

    (img, _, _), (gt, _, _) = nuclei_2d()
    img, gt = np.asarray(img, np.float32), np.asarray(gt)
    rng = np.random.default_rng(seed)
    scrib = np.zeros(img.shape, np.uint8)
    for i in rng.choice(np.unique(gt)[1:], 3 + seed % 4, replace=False):
        yy, xx = np.nonzero(gt == i)
        cy, cx = int(yy.mean()), int(xx.mean())
        scrib[cy, max(cx - 4, 0) : cx + 5] = 2
    background = np.argwhere(gt == 0)
    for j in rng.choice(len(background), 4 + seed, replace=False):
        y, x = background[j]
        row = slice(max(x - 10, 0), x + 11)
        scrib[y, row][gt[y, row] == 0] = 1
    return img, gt, scrib


def _split(labels, gt):
    """Ground-truth objects that two or more labels share (each over 15 % of it)."""
    out = []
    for i in np.unique(gt)[1:]:
        inside = labels[gt == i]
        ids, counts = np.unique(inside[inside > 0], return_counts=True)
        if (counts > 0.15 * inside.size).sum() >= 2:
            out.append(int(i))
    return out


@pytest.mark.xfail(
    strict=True, reason="issue 12.6: P(boundary) dips inside a border nucleus (see module doc)"
)
@pytest.mark.parametrize("seed", [2, 4, 5])
def test_scribbles_keep_border_nuclei_whole_on_the_sample(seed):
    img, gt, scrib = _nuclei_2d_with_strokes(seed)
    labels, info = segment_instances(img, scribbles=scrib)
    assert info["mode"] == "scribbles"
    assert _split(labels, gt) == []
