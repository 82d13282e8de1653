"""Instance matching: hand-made tables of (gt, pred) -> TP/FP/FN, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mae.segmentation.metrics import iou_matrix, match_dataset, match_instances, summarize_matches


def _squares(shape, boxes):
    lab = np.zeros(shape, np.uint16)
    for i, sl in enumerate(boxes, start=1):
        lab[sl] = i
    return lab


GT = _squares((20, 20), [np.s_[0:4, 0:4], np.s_[10:14, 10:14], np.s_[15:20, 0:5]])


@pytest.mark.parametrize(
    ("pred", "tp", "fp", "fn"),
    [
        (GT, 3, 0, 0),
        (np.zeros_like(GT), 0, 0, 3),
        (_squares((20, 20), [np.s_[0:4, 0:4]]), 1, 0, 2),
        # shifted by one pixel: IoU 12/20 = 0.6 >= 0.5 -> still a match
        (_squares((20, 20), [np.s_[0:4, 1:5]]), 1, 0, 2),
        # shifted by two: IoU 8/24 < 0.5 -> one FP, all FN
        (_squares((20, 20), [np.s_[0:4, 2:6]]), 0, 1, 3),
        # one prediction covering two objects: merge -> no match
        (_squares((20, 20), [np.s_[0:14, 0:14]]), 0, 1, 3),
    ],
)
def test_match_table(pred, tp, fp, fn):
    m = match_instances(GT, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert m["accuracy"] == pytest.approx(tp / (tp + fp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_label_ids_do_not_matter_and_3d():
    gt = np.zeros((4, 10, 10), np.int32)
    gt[0:2, 0:4, 0:4] = 7
    gt[2:4, 5:9, 5:9] = 3
    pred = np.where(gt == 7, 100, np.where(gt == 3, 5, 0))
    m = match_instances(gt, pred, iou_threshold=0.9)
    assert m["tp"] == 2 and m["accuracy"] == 1.0
    assert iou_matrix(gt, pred).shape == (2, 2)


def test_empty_vs_empty_is_perfect():
    z = np.zeros((5, 5), int)
    assert match_instances(z, z)["accuracy"] == 1.0


def test_dataset_sums_counts():
    s = match_dataset([GT, GT], [GT, np.zeros_like(GT)])
    assert (s["tp"], s["fn"]) == (3, 3)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["mean_accuracy"] == pytest.approx(0.5)
    assert summarize_matches(s["per_image"])["accuracy"] == s["accuracy"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"iou_threshold": 0.0}, "iou_threshold"), ({"iou_threshold": 1.5}, "iou_threshold")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        match_instances(GT, GT, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        match_instances(GT, GT[:10])


@pytest.mark.parametrize("iou_threshold", [0.1, 0.3, 0.5, 0.7])
def test_sparse_matching_equals_the_dense_optimal_assignment(iou_threshold):
    """Matching on overlapping pairs only gives the optimal assignment of the full table."""
    from scipy import ndimage as ndi
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for _ in range(30):
        shape = tuple(int(n) for n in rng.integers(8, 50, 2))
        a = ndi.label(ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > 0.5)[0]
        b = ndi.label(ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > 0.5)[0]
        iou = iou_matrix(a, b)
        tp = 0
        if iou.size:
            valid = iou >= iou_threshold
            rows, cols = linear_sum_assignment(np.where(valid, -iou, 0.0))
            tp = int(valid[rows, cols].sum())
        assert match_instances(a, b, iou_threshold=iou_threshold)["tp"] == tp


def test_evaluate_computes_the_pair_ious_once_per_image(tmp_path, monkeypatch, capsys):
    # cli/evaluate.py recomputed the pair IoUs for every threshold.
    import tifffile

    from napari_mae.cli import main
    from napari_mae.segmentation import metrics

    gt = np.zeros((40, 40), np.uint16)
    gt[5:15, 5:15], gt[20:35, 20:30] = 1, 2
    pred = np.roll(gt, 2, axis=1)
    for folder, arr in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "a.tif", arr)
    calls = []
    real = metrics._pair_ious
    monkeypatch.setattr(metrics, "_pair_ious", lambda g, p: calls.append(1) or real(g, p))
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert main([*args, "--iou", "0.3", "0.5", "0.7"]) == 0
    assert len(calls) == 1
    at = metrics.match_instances_at(gt, pred, (0.3, 0.5, 0.7))
    assert at == [metrics.match_instances(gt, pred, iou_threshold=t) for t in (0.3, 0.5, 0.7)]
