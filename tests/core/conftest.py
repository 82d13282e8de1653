"""Fixtures for the core (no Qt) tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one torch thread, then restore the setting.

    These models are tiny: extra threads only add contention on shared CI runners
    (a 4-window forward pass took 128 ms on two threads vs 14 ms on one here).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
