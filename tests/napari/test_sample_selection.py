"""Issue 12.16: Open Sample leaves the image selected, not the hidden ground truth with paint tools."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("key", ["nuclei_2d", "nuclei_3d", "ct_abdomen"])
def test_open_sample_selects_the_image(make_napari_viewer, qtbot, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mae", key)
    image = next(ly for ly in viewer.layers if ly._type_string == "image")
    labels = next(ly for ly in viewer.layers if ly._type_string == "labels")
    assert not labels.visible
    qtbot.waitUntil(lambda: viewer.layers.selection.active is image, timeout=5000)
    assert set(viewer.layers.selection) == {image}
    # The layer list highlights the image row only (top row = last layer), and the layer
    # controls show the image's (contrast), not the Labels paint tools.
    qt_list = viewer.window._qt_viewer.layers
    qtbot.waitUntil(
        lambda: [i.row() for i in qt_list.selectionModel().selectedIndexes()] == [1], timeout=5000
    )
    controls = viewer.window._qt_viewer.controls
    assert controls.currentWidget() is controls.widgets[image]
    # A second opening (names get a suffix) ends on its own image too.
    viewer.open_sample("napari-mae", key)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is viewer.layers[-2], timeout=5000)
    assert viewer.layers[-2]._type_string == "image" and viewer.layers[-2] is not image


def test_sample_function_without_a_viewer_only_returns_data():
    from napari_mae._sample_data import nuclei_2d

    (image, image_kwargs, kind), (_labels, labels_kwargs, labels_kind) = nuclei_2d()
    assert (kind, labels_kind) == ("image", "labels") and labels_kwargs["visible"] is False
