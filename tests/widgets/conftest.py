"""Fixtures for the dock-widget tests (real napari viewer under pytest-xvfb)."""

from __future__ import annotations

import pytest

PLUGIN = "napari-mae"


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    """The registry of trained models lives in a temporary folder, never in the real home."""
    from napari_mae.widgets._registry import CONFIG_DIR_ENV, registry, segmenters

    folder = tmp_path / "config"
    monkeypatch.setenv(CONFIG_DIR_ENV, str(folder))
    registry.clear()
    segmenters.clear()
    yield folder
    registry.clear()
    segmenters.clear()


@pytest.fixture
def viewer(make_napari_viewer, config_dir):
    """A napari viewer with the registry of trained models and masks cleared."""
    from napari_mae.widgets._registry import registry

    registry.clear()
    v = make_napari_viewer()
    yield v
    registry.clear()


@pytest.fixture
def add_widget(viewer):
    """``add_widget(display_name)`` docks a widget through the plugin manifest."""

    def _add(name: str):
        _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        return widget

    return _add


@pytest.fixture
def notifications(monkeypatch):
    """Messages shown by the widgets, as ``[(level, text)]``."""
    from napari_mae.widgets import _common

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(_common, "show_error", lambda msg: shown.append(("error", str(msg))))
    monkeypatch.setattr(_common, "show_warning", lambda msg: shown.append(("warning", str(msg))))
    monkeypatch.setattr(_common, "show_info", lambda msg: shown.append(("info", str(msg))))
    return shown
