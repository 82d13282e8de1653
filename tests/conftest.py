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
