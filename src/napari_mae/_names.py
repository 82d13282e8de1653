"""Torch-free names shared by the core, the CLI and the widgets.

Importing this module imports nothing heavy (no torch, no napari), so the
widgets can use it on the GUI thread and the CLI before it parses arguments.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BEST",
    "BUNDLED_MODELS",
    "BUNDLED_SEGMENTERS",
    "LAST",
    "PRESET_NAMES",
    "SEGMENTER_ALIASES",
    "WEIGHTS_DIR",
    "bundled_segmenter_path",
    "bundled_weights_path",
]

#: Folder of the bundled checkpoints (``default-2d.pt``, ``default-3d.pt``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: Bundled model names understood by :func:`napari_mae.models.mae.load_model`.
BUNDLED_MODELS = ("default-2d", "default-3d")

#: Bundled segmentation models (MAE encoder + instance decoder) and their files in
#: :data:`WEIGHTS_DIR`, for :func:`napari_mae.models.decoder.load_segmenter`.
BUNDLED_SEGMENTERS = {"default-2d": "default-2d-nuclei.pt"}

#: Other names of the bundled segmentation models (the README calls the bundled decoder
#: by its file's name), resolved by :func:`bundled_segmenter_path`.
SEGMENTER_ALIASES = {"default-2d-nuclei": "default-2d"}

#: Architecture presets (:data:`napari_mae.models.mae.PRESETS`) per number of spatial dimensions.
PRESET_NAMES: dict[int, tuple[str, ...]] = {2: ("tiny-2d", "small-2d"), 3: ("tiny-3d", "small-3d")}

#: File names a training run writes in its output folder.
LAST = "last.pt"
BEST = "best.pt"


def bundled_weights_path(name: str) -> Path:
    """Path of the bundled checkpoint ``name`` (``"default-2d"`` ...); it may not exist.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`BUNDLED_MODELS`.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled models are {BUNDLED_MODELS}")
    return WEIGHTS_DIR / f"{name}.pt"


def bundled_segmenter_path(name: str) -> Path | None:
    """Path of the bundled segmentation model ``name`` (it may not exist); None if not bundled.

    ``name`` is a key of :data:`BUNDLED_SEGMENTERS` or of :data:`SEGMENTER_ALIASES`.
    """
    file = BUNDLED_SEGMENTERS.get(SEGMENTER_ALIASES.get(name, name))
    return None if file is None else WEIGHTS_DIR / file


#: Where fine-tuning's pseudo-labels come from (``FinetuneConfig.pseudo_source``): the
#: model's confident predictions, the classical pipeline's scribble-mode segmentation, or
#: that segmentation where the model confidently agrees.
PSEUDO_SOURCES = ("model", "classical", "agreement")
