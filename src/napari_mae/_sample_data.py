"""npe2 ``sample_data`` contributions: the real images in ``sample_data/``.

Each function returns napari layer-data tuples ``(data, kwargs, layer_type)`` with
``scale`` set to the physical voxel spacing read from the file, plus the ground-truth
Labels layer where the sample has one. See ``sample_data/README.md`` for provenance.

napari selects every layer it adds, so the hidden ground truth (added last) would be
left selected with the Labels paint tools showing; after File > Open Sample the image
is made the selected layer instead (:func:`_select_image_when_opened`).
"""

from __future__ import annotations

from pathlib import Path

from napari_mae.io.readers import read_image

#: The 2D image opened by File > Open Sample (the folder holds five more for training).
NUCLEI_2D_NAME = "10ba6cbee4873b32.tif"


def sample_data_dir() -> Path:
    """Return the folder holding the bundled sample data (inside the installed package)."""
    return Path(__file__).resolve().parent / "sample_data"


def sample_paths() -> dict[str, tuple[Path, Path]]:
    """Return ``{name: (image_path, labels_path)}`` for the three bundled samples."""
    root = sample_data_dir()
    return {
        "nuclei_2d": (root / "nuclei_2d/images" / NUCLEI_2D_NAME, root / "nuclei_2d/labels" / NUCLEI_2D_NAME),
        "nuclei_3d": (root / "nuclei_3d/image.tif", root / "nuclei_3d/labels.tif"),
        "ct_abdomen": (root / "ct_abdomen/image.nii.gz", root / "ct_abdomen/labels.nii.gz"),
    }


def _layers(name: str, display: str, unit: str, contrast_limits=None) -> list[tuple]:
    image_path, labels_path = sample_paths()[name]
    image, spacing, meta = read_image(image_path)
    labels, _, _ = read_image(labels_path)
    image_kwargs = {"name": display, "scale": spacing, "units": meta.get("unit", unit)}
    if contrast_limits is not None:
        image_kwargs["contrast_limits"] = contrast_limits
    if image_kwargs["units"] == "pixel":
        del image_kwargs["units"]
    labels_kwargs = {"name": f"{display} ground truth", "scale": spacing, "opacity": 0.4, "visible": False}
    if "units" in image_kwargs:
        labels_kwargs["units"] = image_kwargs["units"]
    _select_image_when_opened()
    return [(image, image_kwargs, "image"), (labels, labels_kwargs, "labels")]


def _select_image_when_opened() -> None:
    """Make the sample's image the selected layer once napari has added (and selected) its ground truth.

    A sample function only returns layer data; napari adds the layers and selects each
    new one. So the current viewer is asked to look again once control returns to the
    event loop (a zero-time Qt timer, after the layers were added): if the active layer
    is the hidden ground truth of a napari-mae sample, the image of the same sample is
    selected instead. (Selecting from inside napari's own selection callbacks left its
    Qt layer list with both rows highlighted.) Without a viewer (a script calling the
    sample function) nothing happens.
    """
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None:
        return
    from qtpy.QtCore import QTimer

    def select_image() -> None:
        layers = viewer.layers
        active = layers.selection.active
        sample = getattr(getattr(active, "source", None), "sample", None)
        if active is None or active._type_string != "labels" or active.visible or not sample:
            return
        if sample[0] != "napari-mae":
            return
        images = [ly for ly in layers if ly._type_string == "image" and ly.source.sample == sample]
        if images:
            layers.selection.active = images[-1]

    QTimer.singleShot(0, select_image)


def nuclei_2d() -> list[tuple]:
    """2D fluorescence nuclei (DSB 2018), 520 x 696 uint8, with its instance labels."""
    return _layers("nuclei_2d", "nuclei 2D", "pixel")


def nuclei_3d() -> list[tuple]:
    """3D nuclei (Arabidopsis ovule), 100^3 uint8 at 0.28 x 0.13 x 0.13 um, with labels."""
    return _layers("nuclei_3d", "nuclei 3D", "um")


def ct_abdomen() -> list[tuple]:
    """Abdominal CT, (30, 101, 122) int16 HU at 3 mm, with TotalSegmentator labels.

    Shown with a soft-tissue window (-160 to 240 HU).
    """
    return _layers("ct_abdomen", "CT abdomen", "mm", contrast_limits=(-160, 240))
