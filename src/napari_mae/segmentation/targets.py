"""Per-object distance targets for the learned instance decoder.

The targets of micro-sam's automatic instance segmentation (Archit et al.,
*Segment Anything for Microscopy*, Nature Methods 2025, Methods: "Automatic
instance segmentation"), as torch-em's ``PerObjectDistanceTransform``
describes them, computed here from instance labels with voxel ``spacing``:

* ``foreground``: 1 inside any object, 0 outside;
* ``center``: the distance to the object's centre divided by the largest such
  distance inside the object (0 at the centre, 1 at its farthest voxel);
* ``boundary``: 1 minus the distance to the object's boundary divided by the
  largest such distance inside the object (0 at the deepest voxel, 1 on the
  boundary).

The centre is the object's deepest voxel (largest distance to the boundary),
which lies inside the object even where it is not convex. Outside objects both
distances are 1; the loss ignores them there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["TARGET_NAMES", "distance_targets"]

#: Channel order of :func:`distance_targets` and of the decoder's output.
TARGET_NAMES = ("foreground", "center", "boundary")


def distance_targets(labels: np.ndarray, *, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Foreground, centre-distance and boundary-distance maps of instance labels.

    Parameters
    ----------
    labels : ndarray of int, shape ([Z,] Y, X)
        Instance labels, 0 = background. Ids need not be consecutive.
    spacing : sequence of float, optional
        Physical voxel size per axis (same units on every axis); distances are
        measured in these units, so anisotropic voxels are handled. Default 1.

    Returns
    -------
    ndarray of float32, shape ``(3,) + labels.shape``
        The maps in :data:`TARGET_NAMES` order, each in [0, 1].

    Raises
    ------
    ValueError
        If ``labels`` is not integer, has negative ids, or ``spacing`` does not
        have one positive finite value per axis.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be integer instance ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    from napari_mae.preprocess import check_spacing

    sp = check_spacing(spacing, labels.ndim)
    out = np.ones((3,) + labels.shape, dtype=np.float32)
    out[0] = 0.0
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        # one voxel of margin so the distance to the boundary is 0 outside the crop's object
        box = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, labels.shape, strict=True)
        )
        obj = labels[box] == i
        inner = ndi.distance_transform_edt(np.pad(obj, 1), sampling=sp)[(slice(1, -1),) * obj.ndim]
        deepest = float(inner.max())
        centre = np.unravel_index(int(np.argmax(inner)), obj.shape)
        grid = np.ogrid[tuple(slice(0, n) for n in obj.shape)]
        to_centre = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, sp, strict=True)))
        far = float(to_centre[obj].max())
        view = out[(slice(None),) + box]
        view[0][obj] = 1.0
        view[1][obj] = to_centre[obj] / far if far > 0 else 0.0
        view[2][obj] = 1.0 - inner[obj] / deepest if deepest > 0 else 0.0
    return out
