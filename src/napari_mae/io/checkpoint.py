"""Masked-autoencoder checkpoints: written atomically, loaded without running code.

A checkpoint is a ``torch.save`` of a plain dict::

    {
        "format": "napari-mae-checkpoint",
        "version": 1,
        "config": {...},            # MAEConfig.to_dict(): builtins only
        "state_dict": {...},        # tensors
        "normalization": {...},     # e.g. {"method": "percentile", "lower": 1.0, "upper": 99.8}
        "training_state": {...} | None,  # optimiser, step, RNG states ...
        "extra": {...} | None,
    }

This module imports nothing from the rest of the package: it writes and reads
dicts. :func:`napari_mae.models.mae.model_from_checkpoint` turns one into a model.

Only builtins and tensors are stored, so :func:`load_checkpoint` can use
``torch.load(weights_only=True)``, whose restricted unpickler refuses any
pickle that would import or call code; such a file raises
:class:`CheckpointError` instead of running it.
"""

from __future__ import annotations

import os
import pickle
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "napari-mae-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("config", "state_dict")


class CheckpointError(ValueError):
    """A file that is not a usable napari-mae checkpoint (corrupt, foreign, or holding code)."""


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    *,
    normalization: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its context to ``path`` atomically.

    The data go to a temporary file in the same directory, which is flushed,
    fsynced and then renamed over ``path`` (``os.replace``), so a crash or a
    full disk never leaves a truncated checkpoint behind and readers see either
    the old or the new file. The file's mode is ``0o666 & ~umask``, as for any
    other file the user writes.

    Parameters
    ----------
    path : str or path-like
        Destination, conventionally ``*.pt``; parent directories are created.
    model : torch.nn.Module
        Anything with ``config`` (whose ``to_dict()`` gives builtins, e.g. an
        ``MAEConfig``) and ``state_dict()``; a ``DistributedDataParallel``
        wrapper is unwrapped.
    normalization : mapping, optional
        Intensity normalisation of the training data; defaults to
        ``model.normalization``.
    training_state : mapping, optional
        Optimiser/scheduler state, step, RNG states... (builtins and tensors only).
    extra : mapping, optional
        Anything else made of builtins and tensors.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        If a value is not loadable with ``weights_only=True`` (e.g. a custom class);
        nothing is written then.
    """
    import torch

    model = getattr(model, "module", model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if normalization is None:
        normalization = getattr(model, "normalization", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalization": dict(normalization) if normalization is not None else None,
        "training_state": dict(training_state) if training_state is not None else None,
        "extra": dict(extra) if extra is not None else None,
    }
    fd, tmp_name = _create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _check_loadable(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _create_temp_beside(path: Path) -> tuple[int, str]:
    """Create and open a new, uniquely named temporary file next to ``path``.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file is created with mode
    0666 and the kernel applies the process umask (and any default ACL), so the
    renamed checkpoint gets the permissions of any other file the user writes.
    Reading the umask to ``chmod`` afterwards would need ``os.umask``, which sets
    it too and so is not thread-safe. ``O_EXCL`` makes the name ours alone.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _check_loadable(name: str) -> None:
    """Refuse to write what ``load_checkpoint`` would refuse to read."""
    import torch

    try:
        torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TypeError(
            "checkpoint contents must be builtins (dict, list, str, numbers) and tensors so that they "
            f"load with weights_only=True; {exc}"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, on the CPU, without running code.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict
        With keys ``config`` (dict), ``state_dict``, ``normalization``,
        ``training_state``, ``extra``, ``format``, ``version``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is not a torch checkpoint, holds code or objects other
        than builtins and tensors (refused by ``torch.load(weights_only=True)``),
        or lacks the napari-mae keys.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6; anything else
        # (text, truncated downloads, legacy pickles) is not ours.
        raise CheckpointError(f"{path} is not a readable torch checkpoint (not a torch.save zip archive)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects or code that a napari-mae checkpoint "
            "never holds (torch.load with weights_only=True rejected it; nothing in it was run). "
            f"Only open files you trust. {detail}".rstrip()
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, Mapping) or any(key not in data for key in _REQUIRED_KEYS):
        found = sorted(data)[:8] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a napari-mae checkpoint: expected a dict with keys {list(_REQUIRED_KEYS)}, "
            f"found {found}; write checkpoints with napari_mae.io.checkpoint.save_checkpoint"
        )
    out = dict(data)
    if out.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {out['format']!r}, not {CHECKPOINT_FORMAT!r}")
    if int(out.get("version", CHECKPOINT_VERSION)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {out['version']}, newer than this napari-mae reads "
            f"({CHECKPOINT_VERSION}); upgrade napari-mae"
        )
    for key in ("normalization", "training_state", "extra"):
        out.setdefault(key, None)
    return out
