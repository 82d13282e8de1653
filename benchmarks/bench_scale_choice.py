"""Does choosing the learned decoder's scale per image help? Three ways, against the fixed scale.

Usage (from the repository root; the data in ``../shared/data``)::

    python benchmarks/bench_scale_choice.py                 # the 68 DSB dev images
    python benchmarks/bench_scale_choice.py --heldout       # the 19 held-out training-split images

Per image, the bundled nuclei decoder predicts its maps at 0.71x, 1x and 1.41x the scale the
radius estimate gives (:func:`napari_mae.segmentation.learned.segment_plane`'s resampling).
Printed, as dataset-level acc@0.5: each fixed scale; the scale whose centre-distance map best
matches the distance targets of its own instances (mean absolute difference over the
foreground: a self-consistency criterion, no labels); the scale whose foreground is the least
ambiguous (:func:`napari_mae.segmentation.learned.foreground_ambiguity`, the confidence
check behind ``method="auto"``'s fall-back); the three scales' maps averaged on the 1x
grid before the watershed (test-time multi-scale averaging); and the best scale per image chosen
with the labels (an oracle, an upper bound, not a method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FACTORS = (0.71, 1.0, 1.41)


def files(heldout: bool) -> list[Path]:
    if heldout:
        sys.path.insert(0, str(ROOT / "scripts"))
        from train_bundled_2d import split_files

        return [Path(p) for p in split_files()[1]]
    return sorted((SHARED / "dsb2018_fluo_nuclei_2d" / "images").glob("*.tif"))


def main(argv=None) -> int:
    import torch
    from skimage.transform import resize

    from napari_mae.io.readers import read_image
    from napari_mae.metrics import match_instances
    from napari_mae.segmentation.learned import (
        _clip_scale,
        cached_segmenter,
        decoder_input,
        default_bf16,
        foreground_ambiguity,
        instances_from_maps,
        predict_maps,
        rescaled,
    )
    from napari_mae.segmentation.prepare import prepare_image
    from napari_mae.segmentation.scale import estimate_object_radius
    from napari_mae.segmentation.targets import distance_targets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", action="store_true", help="the held-out training-split images instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    net = cached_segmenter("default-2d-nuclei")
    r_ref = float(net.decoder_config.object_radius)
    bf16 = default_bf16(torch.device("cpu"))
    ways = [f"fixed {f}x" for f in FACTORS] + [
        "self-consistency",
        "least ambiguous",
        "average of 3",
        "oracle",
    ]
    counts = {w: np.zeros(3, int) for w in ways}  # tp, fp, fn

    def score(gt, lab, shape):
        lab = resize(lab, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
        m = match_instances(gt, lab, iou_threshold=0.5)
        return np.array([m["tp"], m["fp"], m["fn"]])

    for f in files(args.heldout):
        img, _, meta = read_image(f)
        gt = np.asarray(read_image(f.parent.parent / "labels" / f.name)[0]).astype(np.int32)
        x, info = prepare_image(np.asarray(img), channel_axis=-1 if meta.get("rgb") else None)
        r = estimate_object_radius(x)["radius"]
        x = decoder_input(
            x, invalid=info["invalid"], inverted=not info["bright_objects"]
        )  # as segment_instances scales the decoder's input, after the estimate
        base = rescaled(x, (_clip_scale(r_ref / r),) * 2).shape
        maps, per, cons, amb = [], [], [], []
        for fac in FACTORS:
            s = _clip_scale(r_ref / r * fac)
            m = predict_maps(net, rescaled(x, (s, s)), bf16=bf16)
            lab = instances_from_maps(m)
            fg = m[0] > 0.5
            amb.append(foreground_ambiguity(m[0]))
            cons.append(float(np.abs(m[1] - distance_targets(lab)[1])[fg].mean()) if lab.max() else 1.0)
            per.append(score(gt, lab, x.shape))
            if m.shape[1:] != base:
                m = np.stack([resize(c, base, order=1, preserve_range=True) for c in m]).astype(np.float32)
            maps.append(m)
        for w, c in zip(ways[:3], per, strict=True):
            counts[w] += c
        counts["self-consistency"] += per[int(np.argmin(cons))]
        counts["least ambiguous"] += per[int(np.argmin(amb))]
        counts["average of 3"] += score(gt, instances_from_maps(np.mean(maps, axis=0)), x.shape)
        counts["oracle"] += max(per, key=lambda c: c[0] / max(c.sum(), 1))
    for w, (tp, fp, fn) in counts.items():
        print(
            json.dumps(
                {
                    "way": w,
                    "acc@0.5": round(tp / max(tp + fp + fn, 1), 3),
                    "tp": int(tp),
                    "fp": int(fp),
                    "fn": int(fn),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
