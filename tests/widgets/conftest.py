"""Fixtures for the dock-widget tests (real napari viewer under pytest-xvfb)."""

from __future__ import annotations

import pytest

PLUGIN = "napari-mae"


@pytest.fixture
def viewer(make_napari_viewer):
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
