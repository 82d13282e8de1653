"""The main job end to end, headless, on the bundled samples.

For each sample (2D fluorescence nuclei, 3D nuclei, abdominal CT) :func:`run_demo`

1. masks it with the default model's patch grid at ``mask_ratio`` 0.75 (MAE paper),
2. reconstructs the removed patches with the bundled default model (``default-2d`` /
   ``default-3d``) and scores them against the original (normalised RMSE over removed
   pixels, with the mean-fill baseline beside it),
3. segments it: microscopy automatically and with scribbles simulated from the sample's
   labels (:func:`napari_mae.segmentation.scribbles.simulate_scribbles`, the benchmark's simulation);
   the CT with scribbles on bone (vertebrae and ribs) and soft tissue,
4. scores each segmentation against the sample's ground truth (precision, recall, F1 and
   accuracy = TP / (TP + FP + FN) at IoU 0.5),
5. fine-tunes ``default-2d`` for a short run on the 2D sample folder and records the loss.

It writes label images, ``metrics.json``, one PNG per sample (original | masked |
reconstruction | segmentation outline) and the fine-tuning loss curve. No Qt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_mae._json import to_jsonable
from napari_mae._sample_data import sample_data_dir, sample_paths
from napari_mae.io.readers import read_image

SAMPLES = {
    "nuclei_2d": {"model": "default-2d", "kind": "microscopy"},
    "nuclei_3d": {"model": "default-3d", "kind": "microscopy"},
    "ct_abdomen": {"model": "default-3d", "kind": "ct"},
}


MODES = ("auto", "classical", "learned", "scribbles")
FINETUNE_DIR = "finetune"


def demo_outputs(out_dir: str | Path) -> list[Path]:
    """Return the paths :func:`run_demo` may write in ``out_dir``, for every sample.

    Files: ``<sample>_labels_<mode>.tif``, ``<sample>_reconstruction.tif``, ``<sample>.png``,
    ``finetune_loss.png``, ``metrics.json``; and the fine-tuning run's folder ``finetune/``.
    """
    out = Path(out_dir)
    paths = []
    for name in SAMPLES:
        paths += [out / f"{name}_labels_{mode}.tif" for mode in MODES]
        paths += [out / f"{name}_reconstruction.tif", out / f"{name}.png"]
    return [*paths, out / "finetune_loss.png", out / "metrics.json", out / FINETUNE_DIR]


def check_output(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a demo output folder that is a file, or not empty without ``overwrite``; change nothing.

    Raises
    ------
    NotADirectoryError
        If ``out_dir`` is an existing file.
    FileExistsError
        If ``out_dir`` is not empty and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--out {out} is not empty; choose a new folder, or pass --overwrite to replace the demo's outputs in it"
        )
    return out


def prepare_output(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Check the demo's output folder before any work and make it ready; return it.

    A missing or empty folder is used as it is (created). An existing non-empty folder is
    refused (:func:`check_output`) unless ``overwrite``, which removes the demo's own outputs in it
    (:func:`demo_outputs`, including the fine-tuning run) and leaves any other file alone,
    so a rerun never mixes old and new results.

    Raises
    ------
    NotADirectoryError, FileExistsError
        As :func:`check_output`.
    """
    import shutil

    out = check_output(out_dir, overwrite=overwrite)
    if out.is_dir() and any(out.iterdir()):
        for path in demo_outputs(out):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def masked_nrmse(original: np.ndarray, estimate: np.ndarray, pixel_mask: np.ndarray) -> float:
    """Root-mean-square error over removed pixels, divided by the image's 1-99.8 % range.

    Parameters
    ----------
    original, estimate : ndarray, same shape ``([Z,] Y, X)``
        In the same intensity units.
    pixel_mask : ndarray of bool, same shape
        True where a patch was removed.
    """
    lo, hi = np.percentile(original, (1.0, 99.8))
    scale = float(hi - lo) or 1.0
    diff = (estimate.astype(np.float64) - original.astype(np.float64))[pixel_mask]
    return float(np.sqrt(np.mean(diff**2)) / scale) if diff.size else 0.0


def _middle(a: np.ndarray) -> np.ndarray:
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def save_figure(
    path: Path,
    title: str,
    panels: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    segmentation_title: str = "segmentation",
) -> None:
    """Write original | masked | reconstruction | segmentation outline as one PNG.

    3D arrays are shown at their middle Z plane (the title says which). ``panels`` maps titles to ``([Z,] Y, X)``
    arrays; ``labels`` is drawn as outlines over the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    first = _middle(next(iter(panels.values()))).astype(np.float32)
    lo, hi = np.percentile(first, (1, 99.8))
    n = len(panels) + 1
    aspect = first.shape[0] / first.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2 * aspect + 0.6), constrained_layout=True)
    for ax, (name, arr) in zip(axes, panels.items()):
        ax.imshow(_middle(arr), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=10)
    ax = axes[-1]
    ax.imshow(first, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    edge = find_boundaries(_middle(labels), mode="inner")
    overlay = np.zeros((*edge.shape, 4), np.float32)
    overlay[edge] = (1.0, 0.85, 0.0, 1.0)
    ax.imshow(overlay, interpolation="nearest")
    ax.set_title(f"{segmentation_title} ({int(len(np.unique(labels)) - 1)} objects)", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    if labels.ndim == 3:
        title = f"{title} (Z plane {labels.shape[0] // 2} of {labels.shape[0]})"
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _segment_and_score(image, gt, spacing, scribbles, method="auto") -> tuple[np.ndarray, dict, dict]:
    from napari_mae.segmentation import segment_instances
    from napari_mae.segmentation.metrics import match_instances

    t0 = time.perf_counter()
    labels, info = segment_instances(image, scribbles=scribbles, method=method, spacing=spacing)
    seconds = time.perf_counter() - t0
    scores = match_instances(gt, labels, iou_threshold=0.5)
    scores["seconds"] = round(seconds, 2)
    return labels, info, scores


def run_demo(
    out_dir: str | Path,
    *,
    mask_ratio: float = 0.75,
    seed: int = 0,
    finetune_epochs: int = 10,
    samples: tuple[str, ...] = tuple(SAMPLES),
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Run the whole pipeline on the bundled samples and write its results.

    Parameters
    ----------
    out_dir : path
        Created if needed; must be empty unless ``overwrite``. Receives
        ``<sample>_labels_<auto|classical|learned|scribbles>.tif``, ``<sample>_reconstruction.tif``,
        ``<sample>.png``, ``finetune/`` (the fine-tuning run), ``finetune_loss.png``,
        ``metrics.json``.
    mask_ratio : float
        Fraction of patches removed, in [0, 1).
    seed : int
        Seed of the mask, the simulated scribbles and the fine-tuning run.
    finetune_epochs : int
        Epochs of the fine-tuning run (0 skips it).
    samples : tuple of str
        Which of ``nuclei_2d``, ``nuclei_3d``, ``ct_abdomen`` to run.
    log : callable
        Receives one line per step.
    overwrite : bool
        Replace the demo's outputs in a non-empty ``out_dir`` (see :func:`prepare_output`).

    Returns
    -------
    dict
        What ``metrics.json`` holds: per sample the reconstruction error, the
        segmentation scores of each mode and what the segmentation estimated;
        the fine-tuning losses; the total time.

    Raises
    ------
    ValueError
        For an unknown sample name, a bad ``mask_ratio`` or a negative ``finetune_epochs``.
    FileExistsError
        If ``out_dir`` is not empty and ``overwrite`` is False (checked before any work).
    NotADirectoryError
        If ``out_dir`` is a file.
    FileNotFoundError
        If a bundled model or sample file is missing.
    """
    from napari_mae.io.writers import write_tiff
    from napari_mae.masking import check_mask_ratio, make_mask
    from napari_mae.models.mae import load_model
    from napari_mae.reconstruction import reconstruct
    from napari_mae.segmentation.scribbles import ct_bone_labels, simulate_scribbles

    unknown = set(samples) - set(SAMPLES)
    if unknown:
        raise ValueError(f"unknown sample(s) {sorted(unknown)}; choose from {list(SAMPLES)}")
    check_mask_ratio(mask_ratio)
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be >= 0 (0 skips fine-tuning), got {finetune_epochs}")
    out = prepare_output(out_dir, overwrite=overwrite)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"mask_ratio": mask_ratio, "seed": seed, "samples": {}}
    models: dict[str, Any] = {}
    paths = sample_paths()
    for name in samples:
        spec = SAMPLES[name]
        image_path, labels_path = paths[name]
        image, spacing, meta = read_image(image_path)
        gt, _, _ = read_image(labels_path)
        model = models.setdefault(spec["model"], load_model(spec["model"]))
        patch_size = tuple(model.config.patch_size)
        log(
            f"[{name}] {image.shape} {image.dtype}, spacing {tuple(round(s, 4) for s in spacing)} {meta['unit']}"
        )

        mask = make_mask(image.shape, patch_size, mask_ratio=mask_ratio, seed=seed)
        t0 = time.perf_counter()
        rec = reconstruct(image, model, mask=mask, fill="zero")
        rec_seconds = time.perf_counter() - t0
        pixel_mask, masked = rec.mask, rec.masked
        mean_fill = np.full(image.shape, float(np.mean(image[~pixel_mask])) if (~pixel_mask).any() else 0.0)
        entry: dict[str, Any] = {
            "shape": list(image.shape),
            "spacing": list(spacing),
            "unit": meta["unit"],
            "model": spec["model"],
            "patch_size": list(patch_size),
            "reconstruction": {
                "nrmse_masked": masked_nrmse(image, rec.reconstruction, pixel_mask),
                "nrmse_masked_mean_fill": masked_nrmse(image, mean_fill, pixel_mask),
                "seconds": round(rec_seconds, 2),
            },
            "segmentation": {},
        }
        write_tiff(
            out / f"{name}_reconstruction.tif",
            np.asarray(rec.reconstruction, np.float32),
            spacing=spacing,
            unit=meta["unit"],
        )
        log(
            f"[{name}] reconstruction NRMSE over removed patches {entry['reconstruction']['nrmse_masked']:.3f} "
            f"(mean fill {entry['reconstruction']['nrmse_masked_mean_fill']:.3f}), {rec_seconds:.1f} s"
        )

        if spec["kind"] == "ct":
            # A few strokes on 8 bones and 8 in the body's soft tissue (HU > -500), as in
            # benchmarks/bench_segmentation.py, scored against the vertebrae and ribs.
            gt_eval = ct_bone_labels(gt, image_path.parent / "class_map.json")
            scribble_kw = {"n_objects": 8, "n_background": 8, "background_where": image > -500}
            modes = ["scribbles"]
        else:
            # "auto" is what segment_instances does by default (the bundled decoder on a 2D image,
            # falling back to classical where it is unsure; classical on a volume), beside the
            # classical pipeline and the bundled decoder on the MAE encoder
            gt_eval, scribble_kw, modes = gt, {}, list(MODES)
        shown = None
        ran: dict[str, tuple] = {}  # method -> (labels, info, scores) of the auto mode
        for mode in modes:
            scribbles = simulate_scribbles(gt_eval, seed=seed, **scribble_kw) if mode == "scribbles" else None
            method = mode if mode in ("classical", "learned") else "auto"
            if mode in ran:  # auto ran this method already
                labels, info, scores = ran[mode]
            else:
                labels, info, scores = _segment_and_score(image, gt_eval, spacing, scribbles, method)
            if mode == "auto":
                ran[info["method"]] = (labels, info, scores)
            write_tiff(out / f"{name}_labels_{mode}.tif", labels, spacing=spacing, unit=meta["unit"])
            entry["segmentation"][mode] = {"scores": scores, "info": info}
            if scribbles is not None:
                entry["segmentation"][mode]["scribbled_fraction"] = float(np.mean(scribbles > 0))
            log(
                f"[{name}] segmentation ({mode}): {scores['n_pred']} objects for {scores['n_gt']}, "
                f"F1@0.5 {scores['f1']:.3f}, accuracy@0.5 {scores['accuracy']:.3f}, {scores['seconds']:.1f} s"
            )
            if shown is None:
                shown = (mode, labels)
        save_figure(
            out / f"{name}.png",
            f"{name}: {spec['model']}, mask_ratio {mask_ratio}",
            {"original": image, "masked": masked, "reconstruction": rec.reconstruction},
            shown[1],
            segmentation_title=(
                f"bones (vertebrae, ribs), {shown[0]}" if spec["kind"] == "ct" else f"nuclei, {shown[0]}"
            ),
        )
        results["samples"][name] = entry

    if finetune_epochs > 0:
        results["finetune"] = finetune(out / FINETUNE_DIR, epochs=finetune_epochs, seed=seed, log=log)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False))
    log(format_table(results))
    return results


def finetune(run_dir: Path, *, epochs: int, seed: int, log: Callable[[str], None] = print) -> dict:
    """Fine-tune ``default-2d`` on the bundled 2D sample folder; return the loss record.

    Returns
    -------
    dict
        ``epoch_loss`` (mean training loss per epoch), ``val_loss`` per epoch,
        ``first_step_loss``, ``last_step_loss``, ``checkpoint`` and ``seconds``; also
        writes ``finetune_loss.png`` beside ``run_dir``.
    """
    from napari_mae.training import TrainConfig, train

    t0 = time.perf_counter()
    config = TrainConfig(
        data_dir=sample_data_dir() / "nuclei_2d" / "images",
        output_dir=run_dir,
        model="default-2d",
        epochs=epochs,
        batch_size=8,
        lr=2e-4,
        samples_per_image=8,
        val_fraction=0.2,
        seed=seed,
        device="cpu",
        checkpoint_every=0,
    )
    steps, epoch_loss, val_loss, checkpoint = [], [], [], None
    for update in train(config):
        if update.kind == "step":
            steps.append(update.loss)
        elif update.kind == "epoch":
            epoch_loss.append(update.loss)
            val_loss.append(update.val_loss)
            val = "n/a" if update.val_loss is None else f"{update.val_loss:.4f}"
            log(
                f"[finetune] epoch {update.epoch}/{update.n_epochs}: loss {update.loss:.4f}, validation {val}"
            )
        elif update.kind == "failed":
            raise RuntimeError(update.message)
        if update.checkpoint is not None:
            checkpoint = update.checkpoint
    _plot_loss(run_dir.parent / "finetune_loss.png", steps, epoch_loss, val_loss)
    return {
        "epochs": epochs,
        "step_loss": steps,
        "epoch_loss": epoch_loss,
        "val_loss": val_loss,
        "first_step_loss": steps[0] if steps else None,
        "last_step_loss": steps[-1] if steps else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _plot_loss(path: Path, steps: list, epoch_loss: list, val_loss: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    ax.plot(np.arange(1, len(steps) + 1), steps, lw=1, alpha=0.6, label="train (step)")
    if epoch_loss:
        per_epoch = max(1, len(steps) // len(epoch_loss))
        xs = per_epoch * np.arange(1, len(epoch_loss) + 1)
        ax.plot(xs, epoch_loss, "o-", label="train (epoch mean)")
        if any(v is not None for v in val_loss):
            ax.plot(xs, [np.nan if v is None else v for v in val_loss], "s--", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("MAE loss (norm_pix, removed patches)")
    ax.set_title("fine-tuning default-2d on the 2D samples")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict) -> str:
    """Return the demo's results as a short plain-text table."""
    rows = [
        f"{'sample':<11} {'mode':<10} {'objects':>8} {'gt':>5} {'prec':>6} {'recall':>6} "
        f"{'F1@0.5':>7} {'acc@0.5':>8} {'rec.NRMSE':>10}"
    ]
    for name, entry in results["samples"].items():
        nrmse = entry["reconstruction"]["nrmse_masked"]
        for mode, seg in entry["segmentation"].items():
            s = seg["scores"]
            rows.append(
                f"{name:<11} {mode:<10} {s['n_pred']:>8} {s['n_gt']:>5} {s['precision']:>6.3f} "
                f"{s['recall']:>6.3f} {s['f1']:>7.3f} {s['accuracy']:>8.3f} {nrmse:>10.3f}"
            )
    ft = results.get("finetune")
    if ft and ft["val_loss"] and ft["val_loss"][0] is not None:
        rows.append(
            f"fine-tuning default-2d: validation loss {ft['val_loss'][0]:.4f} -> {ft['val_loss'][-1]:.4f} "
            f"over {ft['epochs']} epochs in {ft['seconds']:.0f} s"
        )
    rows.append(f"total {results['seconds']:.0f} s")
    return "\n".join(rows)
