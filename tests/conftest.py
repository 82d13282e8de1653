"""Shared pytest fixtures.

``shared_data`` points at the read-only ``../shared/data`` folder beside the
repository (or ``$NAPARI_MAE_SHARED_DATA``); tests that need it skip cleanly
where it is absent, as in a user's checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"


def _shared_data_dir() -> Path:
    env = os.environ.get("NAPARI_MAE_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; skips the test where it is absent."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """Path of the plugin's bundled ``sample_data/`` folder."""
    return SAMPLE_DATA


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small segmentation checkpoint: tiny-2d encoder (4 blocks), 4 decoder features,
    object radius 6 px, seeded (the same weights in every module that asks)."""
    import torch

    from napari_mae.io.checkpoint import save_checkpoint
    from napari_mae.models import mae
    from napari_mae.models.decoder import DecoderConfig, InstanceDecoder

    torch.manual_seed(0)
    net = InstanceDecoder(mae.build_model("tiny-2d"), DecoderConfig(features=4, object_radius=6.0))
    path = tmp_path_factory.mktemp("model") / "tiny-seg.pt"
    save_checkpoint(path, net, normalization={"lower": 1.0, "upper": 99.8}, extra={"task": "segmentation"})
    return path
