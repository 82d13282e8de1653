"""Helpers for the dock-widget tests (imported by the test modules)."""

from __future__ import annotations

import numpy as np


def wait_done(qtbot, widget, timeout: int = 60_000) -> None:
    """Wait until the widget's job has finished (no sleeps)."""
    qtbot.waitUntil(lambda: widget.job is not None and not widget.busy, timeout=timeout)


def errors(notifications) -> list[str]:
    """The error messages among ``notifications``."""
    return [text for level, text in notifications if level == "error"]


def small_nuclei_2d(size: int = 160) -> tuple[np.ndarray, dict]:
    """A crop of the bundled 2D nuclei sample, with its layer kwargs."""
    from napari_mae._sample_data import nuclei_2d

    data, kwargs, _ = nuclei_2d()[0]
    return np.asarray(data)[:size, :size], {k: v for k, v in kwargs.items() if k != "contrast_limits"}


def crop_folder(sample_data_dir, folder, n: int = 4, size: int = 128):
    """Write ``size``-pixel crops of ``n`` bundled 2D nuclei images to ``folder``."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((sample_data_dir / "nuclei_2d" / "images").glob("*.tif"))[:n]:
        tifffile.imwrite(folder / path.name, tifffile.imread(path)[:size, :size])
    return folder


def setup_training(widget, folder, out, epochs: int = 2, crops_per_image: int = 1) -> None:
    """Fill the Training widget for a tiny CPU run."""
    widget.folder.setText(str(folder))
    widget.output.setText(str(out))
    widget.pattern.setText("*.tif")
    widget.dims.setCurrentText("2D")
    widget.start_from.setCurrentText("tiny-2d (from scratch)")
    widget.epochs.value = epochs
    widget.crops_per_image.value = crops_per_image
    widget.batch_size.value = 4
    widget.device.setCurrentText("cpu")
