"""``napari-mae evaluate``: score predicted instance labels against ground truth.

Example::

    napari-mae evaluate --pred predictions/ --gt ground_truth/ --iou 0.5 0.75

Files are paired by name: ground truth ``<name>.<ext>`` with the prediction ``<name>.<ext>``
or ``<name>_labels.<ext>`` (what ``napari-mae segment DIR --out OUT`` writes). A
ground-truth image without a prediction is scored as an empty prediction (all its objects
are false negatives), so a missing file never raises the score. Prints one line per image
and the dataset totals (accuracy = TP / (TP + FP + FN), the DSB / StarDist definition).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_mae.io.readers import SUPPORTED_SUFFIXES

#: What read_image reads (the formats of every command), and NumPy arrays.
SUFFIXES = (*SUPPORTED_SUFFIXES, ".npy")


def register(subparsers) -> None:
    """Add the ``evaluate`` sub-parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="instance matching (precision, recall, F1, accuracy at IoU thresholds) of label folders",
        description=(
            "Score the label images of --pred against those of the same name in --gt. A ground-truth "
            "file <name>.<ext> is paired with the prediction <name>.<ext> or <name>_labels.<ext> (the "
            "names napari-mae segment DIR --out OUT writes). A ground-truth image without a prediction "
            "is scored as an empty prediction: all its objects count as false negatives."
        ),
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label images")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth label images")
    p.add_argument(
        "--iou", type=float, nargs="+", default=[0.5], metavar="T", help="IoU thresholds (default 0.5)"
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write all results as JSON")
    p.set_defaults(func=run)


def _name(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def _files(folder: Path) -> dict[str, Path]:
    from napari_mae.cli import CLIError

    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder")
    return {_name(f): f for f in sorted(folder.iterdir()) if f.name.lower().endswith(SUFFIXES)}


def _prediction_for(name: str, pred: dict[str, Path]) -> Path | None:
    """The prediction of ground truth ``name``: ``name`` itself, else ``name_labels``; None if neither."""
    return pred.get(name, pred.get(f"{name}_labels"))


def _load(path: Path):
    """Read a label image; refuse anything that is not integer ids (probabilities, an intensity image).

    The intensity-image rule is the scribbles' and corrected objects'
    (:func:`napari_mae.segmentation.scribbles.intensity_like`): each id one region, where an
    image repeats each grey level in many places.
    """
    import numpy as np

    from napari_mae.cli import CLIError
    from napari_mae.segmentation.scribbles import intensity_like

    if path.suffix == ".npy":
        labels = np.load(path, allow_pickle=False)
    else:
        from napari_mae.io.readers import read_image

        labels = read_image(path)[0]
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        finite = labels[np.isfinite(labels)] if np.issubdtype(labels.dtype, np.floating) else labels
        if (
            not np.issubdtype(labels.dtype, np.floating)
            or np.any(finite != np.round(finite))
            or finite.size != labels.size
        ):
            raise CLIError(
                f"{path}: expected integer instance labels, got {labels.dtype} values that are not ids"
            )
        labels = labels.astype(np.int64)
    why = intensity_like(labels)
    if why is not None:
        raise CLIError(f"{path}: looks like an intensity image, not instance labels: {why}")
    return labels


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate``; return the exit code."""
    import numpy as np

    from napari_mae.cli import CLIError, check_output_path
    from napari_mae.segmentation.metrics import match_instances_at, summarize_matches

    json_out = check_output_path(args.json, "--json", (".json",), what="JSON")  # before any work
    for t in args.iou:
        if not 0 < t <= 1:
            raise CLIError(f"--iou {t}: thresholds must be in (0, 1]")
    pred = _files(Path(args.pred))
    gt = _files(Path(args.gt))
    pairs = {name: _prediction_for(name, pred) for name in sorted(gt)}
    if not any(p is not None for p in pairs.values()):
        raise CLIError(
            f"no file names in common between {args.pred} and {args.gt} (also tried <name>_labels)"
        )
    missing = [name for name, p in pairs.items() if p is None]
    per_image = {t: [] for t in args.iou}
    rows = []
    for name, pred_path in pairs.items():  # every file checked and scored before any output
        g = _load(gt[name])
        p = np.zeros_like(g) if pred_path is None else _load(pred_path)
        if g.shape != p.shape:
            raise CLIError(f"{name}: prediction shape {p.shape} differs from ground truth {g.shape}")
        row = []
        for t, m in zip(args.iou, match_instances_at(g, p, args.iou)):  # pair IoUs computed once
            per_image[t].append({"image": name, "missing": pred_path is None, **m})
            row.append(f"{m['accuracy']:<9.3f}")
        rows.append(f"{name:<32} " + " ".join(row) + (" (no prediction)" if pred_path is None else ""))
    print(f"{'image':<32} " + " ".join(f"acc@{t:<5g}" for t in args.iou))
    for row in rows:
        print(row)
    summary = {}
    for t in args.iou:
        s = summarize_matches(per_image[t])
        summary[str(t)] = s
        print(
            f"IoU {t:g}: accuracy {s['accuracy']:.3f}  F1 {s['f1']:.3f}  precision {s['precision']:.3f}  "
            f"recall {s['recall']:.3f}  (TP {s['tp']}, FP {s['fp']}, FN {s['fn']}, {s['n_images']} images)"
        )
    if missing:
        print(
            f"{len(missing)} ground-truth images without a prediction (scored as empty: their objects are "
            f"false negatives): {', '.join(missing[:5])}"
        )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"summary": summary, "per_image": per_image}, indent=1))
    return 0
