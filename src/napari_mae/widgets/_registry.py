"""What the widgets share: trained models and the last patch mask.

The Training widget adds each model it finishes here; the Reconstruction and
Segmentation widgets list them next to the bundled ``default-2d`` and
``default-3d``. Models saved as checkpoint files stay listed across napari
restarts: they are kept in ``models.json`` in the user's config folder
(``platformdirs.user_config_dir("napari-mae")``, or ``$NAPARI_MAE_CONFIG_DIR``),
until "remove from list". The Masking widget stores its patch mask both in the mask
layer's ``metadata[MASK_KEY]`` and here as :attr:`Registry.last_mask`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from napari_mae._names import BUNDLED_MODELS, BUNDLED_SEGMENTERS

#: Key of the patch-mask record in a mask layer's ``metadata``.
MASK_KEY = "napari_mae_mask"

#: Key, in a masked image's ``metadata``, of the name of the image it was made from.
MASKED_KEY = "napari_mae_masked_from"

#: Environment variable that overrides the folder of ``models.json`` (tests, shared setups).
CONFIG_DIR_ENV = "NAPARI_MAE_CONFIG_DIR"

#: Patch size of the bundled models (checked against their checkpoints by the tests).
BUNDLED_PATCH_SIZES: dict[str, tuple[int, ...]] = {"default-2d": (8, 8), "default-3d": (4, 8, 8)}


def config_dir() -> Path:
    """Folder of the registry file: ``$NAPARI_MAE_CONFIG_DIR`` or the user's config folder."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-mae", appauthor=False))


@dataclass
class MaskRecord:
    """A patch mask made by the Masking widget.

    Attributes
    ----------
    mask : numpy.ndarray of bool
        Patch-grid mask, shape ``patch_grid_shape(spatial_shape, patch_size)``,
        ``True`` = removed (the MAE convention).
    patch_size : tuple of int
        Patch size in pixels per spatial axis.
    spatial_shape : tuple of int
        Spatial shape of the image it was made for.
    source : str
        Name of the image layer it was made for.
    """

    mask: np.ndarray
    patch_size: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    source: str = ""

    def as_metadata(self) -> dict:
        """The record as a plain dict for ``layer.metadata``."""
        return {
            "mask": self.mask,
            "patch_size": tuple(self.patch_size),
            "spatial_shape": tuple(self.spatial_shape),
            "source": self.source,
        }

    @classmethod
    def from_layer(cls, layer) -> MaskRecord | None:
        """The record stored in ``layer.metadata``, or None."""
        meta = getattr(layer, "metadata", {}).get(MASK_KEY)
        if not meta:
            return None
        return cls(
            mask=np.asarray(meta["mask"], dtype=bool),
            patch_size=tuple(meta["patch_size"]),
            spatial_shape=tuple(meta["spatial_shape"]),
            source=meta.get("source", ""),
        )


class Registry:
    """Trained models (kept across restarts when saved to a file) and the last mask.

    One instance: :data:`registry`. The file is read on first use.
    """

    #: Names of the models that ship with the plugin (listed first, never written to the file).
    bundled: tuple[str, ...] = BUNDLED_MODELS
    #: Name of the registry file in :func:`config_dir`.
    file_name = "models.json"

    #: Emitted with no argument when a model is added or removed.
    models_changed = Signal()
    #: Emitted with no argument when the model chosen for reconstruction changes.
    model_chosen = Signal()

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self.patch_sizes: dict[str, tuple[int, ...]] = dict(BUNDLED_PATCH_SIZES)
        self.last_mask: MaskRecord | None = None
        self.chosen_model: str | None = None
        self._loaded = False

    @property
    def path(self) -> Path:
        """The registry file, ``config_dir() / file_name`` (``models.json`` for the MAEs)."""
        return config_dir() / self.file_name

    @property
    def models(self) -> dict[str, Any]:
        """Listed trained models: name -> checkpoint path (str) or model object."""
        self._load()
        return self._models

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8")).get("models", [])
        except (OSError, ValueError, AttributeError):
            return  # no file yet, or unreadable: start with an empty list
        for entry in entries:
            try:
                name, path = str(entry["name"]), str(entry["path"])
            except (KeyError, TypeError):
                continue
            if not Path(path).is_file() or name in self.bundled:
                continue  # deleted since; not listed (the file keeps it until the next save)
            self._models.setdefault(name, path)
            if entry.get("patch_size"):
                self.patch_sizes[name] = tuple(int(p) for p in entry["patch_size"])

    def _save(self) -> None:
        entries = [
            {"name": n, "path": str(s), "patch_size": list(self.patch_sizes.get(n, ())) or None}
            for n, s in self._models.items()
            if isinstance(s, (str, Path))
        ]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"models": entries}, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only config folder: the list still works for this session

    def add_model(self, name: str, spec: Any, patch_size=None) -> str:
        """Offer a trained model (checkpoint path or model object) under ``name``.

        A checkpoint path is written to the registry file, so it is listed after
        a restart; a model object is listed for this session only.

        Returns
        -------
        str
            The name used (made unique with a suffix if needed).
        """
        self._load()
        existing = {n for n, s in self._models.items() if isinstance(s, (str, Path)) and str(s) == str(spec)}
        if isinstance(spec, (str, Path)) and existing:
            name = existing.pop()  # the same file again (e.g. a resumed run): one entry
        else:
            base, i = name, 1
            while name in self._models or name in self.bundled:
                i += 1
                name = f"{base} ({i})"
        self._models.pop(name, None)
        self._models[name] = spec
        if patch_size is not None:
            self.patch_sizes[name] = tuple(int(p) for p in patch_size)
        self._save()
        self.models_changed.emit()
        return name

    def remove_model(self, name: str) -> None:
        """Take a trained model off the lists (and the registry file); the checkpoint stays.

        Raises
        ------
        ValueError
            For a bundled model or a name not listed.
        """
        self._load()
        if name not in self._models:
            raise ValueError(f"'{name}' is not a trained model in the list")
        del self._models[name]
        self.patch_sizes.pop(name, None)
        self._save()
        self.models_changed.emit()

    def model_names(self) -> list[str]:
        """Bundled names, then trained models, newest first."""
        return list(self.bundled) + list(self.models)[::-1]

    def resolve(self, name: str) -> Any:
        """The spec to pass to ``load_model`` for a listed name."""
        spec = self.models.get(name, name)
        return str(spec) if isinstance(spec, Path) else spec

    def choose(self, name: str | None) -> None:
        """Note the model chosen for reconstruction (the Masking widget follows its patch size)."""
        if name != self.chosen_model:
            self.chosen_model = name
            self.model_chosen.emit()

    def clear(self) -> None:
        """Forget trained models and the last mask; the file is read again on next use (tests)."""
        self._models.clear()
        self.patch_sizes = dict(BUNDLED_PATCH_SIZES)
        self.last_mask = None
        self.chosen_model = None
        self._loaded = False
        self.models_changed.emit()


registry = Registry()


class SegmenterRegistry(Registry):
    """Segmentation models (MAE encoder + instance decoder) a user trained or fine-tuned.

    The same list as :class:`Registry`, kept apart from the MAEs (a segmentation
    checkpoint is no MAE for the Reconstruction widget): the bundled
    :data:`napari_mae._names.BUNDLED_SEGMENTERS` first, then trained ones, newest
    first, in ``segmenters.json`` beside ``models.json``. The Training widget adds
    each segmentation run it finishes (:meth:`add_model`); the Segmentation widget
    lists :meth:`model_names` and passes :meth:`resolve` to the core.
    """

    bundled = tuple(BUNDLED_SEGMENTERS)
    file_name = "segmenters.json"


#: The one list of segmentation models.
segmenters = SegmenterRegistry()


def model_patch_size(spatial_dims: int) -> tuple[int, ...]:
    """Patch size of the model chosen for reconstruction, else of the bundled model for ``spatial_dims``."""
    chosen = registry.patch_sizes.get(registry.chosen_model or "")
    if chosen is not None and len(chosen) == spatial_dims:
        return chosen
    return BUNDLED_PATCH_SIZES["default-3d" if spatial_dims == 3 else "default-2d"]
