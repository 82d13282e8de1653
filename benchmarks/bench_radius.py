"""The object-radius estimate against the labels, on the dev sets and harder versions of the volumes.

Usage (from the repository root; the dev sets in ``../shared/data``)::

    python benchmarks/bench_radius.py            # the 3D volumes and their variants
    python benchmarks/bench_radius.py --dsb      # also the 68 DSB dev images

For each volume (and its noisy, low-contrast and streaked variants of
``bench_learned.variants``) it prints :func:`napari_mae.segmentation.estimate_object_radius`
of the prepared volume (``radius``, and its two parts ``radius_log`` / ``radius_foreground``,
None where that part found nothing) against the labels' median equivalent-sphere radius
(physical units), and their ratio. ``--dsb`` adds the ratio's percentiles over the DSB
dev images (equivalent-disk radius, pixels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def labels_radius(gt: np.ndarray, spacing) -> float:
    """Median equivalent-sphere (disk) radius of the labelled objects, physical units."""
    counts = np.bincount(gt.ravel())[1:]
    v = float(np.median(counts[counts > 0])) * float(np.prod(spacing))
    return (3 * v / (4 * np.pi)) ** (1 / 3) if gt.ndim == 3 else (v / np.pi) ** 0.5


def main(argv=None) -> int:
    from bench_finetune import load_set
    from bench_learned import SHARED, variants

    from napari_mae.segmentation.prepare import prepare_image
    from napari_mae.segmentation.scale import estimate_object_radius

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsb", action="store_true", help="also the DSB dev images")
    args = ap.parse_args(argv)
    for name in ("arabidopsis", "stardist", "ovule", "ct"):
        ((_, img, gt, sp, _, _),) = load_set(name, n_dsb=0, max_side=0)
        true = labels_radius(gt, sp)
        vols = variants(img) if name in ("arabidopsis", "stardist") else [("as is", img)]
        for variant, vol in vols:
            x, _ = prepare_image(np.asarray(vol, np.float32))
            est = estimate_object_radius(x, sp)
            row = {"set": name, "variant": variant, "labels_radius": round(true, 3)}
            row |= {
                k: None if est[k] is None else round(est[k], 3)
                for k in ("radius", "radius_log", "radius_foreground")
            }
            row["ratio"] = round(est["radius"] / true, 2)
            print(json.dumps(row), flush=True)
    if args.dsb:
        from napari_mae.io.readers import read_image

        folder = SHARED / "dsb2018_fluo_nuclei_2d"
        ratios = []
        for f in sorted((folder / "images").glob("*.tif")):
            img, _, meta = read_image(f)
            gt, _, _ = read_image(folder / "labels" / f.name)
            x, _ = prepare_image(np.asarray(img), channel_axis=-1 if meta.get("rgb") else None)
            ratios.append(
                estimate_object_radius(x)["radius"] / labels_radius(np.asarray(gt).astype(np.int64), (1, 1))
            )
        q = np.percentile(ratios, [10, 25, 50, 75, 90])
        print(
            json.dumps(
                {
                    "set": "dsb dev",
                    "images": len(ratios),
                    "ratio p10/p25/p50/p75/p90": [round(v, 2) for v in q],
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
