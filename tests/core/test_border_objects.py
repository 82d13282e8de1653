"""Issue 12.6: objects cut by the image border are not split along straight lines.

The distance transform of an object that the image border cuts grew up to the border
(the array's edge is not background for ``distance_transform_edt``), so its top was a
ridge along the border: h-maxima put two seeds on it and the watershed between them ran
straight across the flat top (an L-shaped cut for an object in a corner). Scribble mode,
whose landscape has no intensity term to break the tie, split such objects; the border
now counts as background.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_mae.segmentation import segment_instances


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


@pytest.mark.parametrize("seed", [2, 4, 5])
def test_scribbles_keep_border_nuclei_whole_on_the_sample(seed):
    img, gt, scrib = _nuclei_2d_with_strokes(seed)
    labels, info = segment_instances(img, scribbles=scrib)
    assert info["mode"] == "scribbles"
    assert _split(labels, gt) == []
