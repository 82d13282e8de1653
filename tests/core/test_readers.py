"""Readers: TIFF/NIfTI/NRRD axes, spacing, orientation, and bad files."""

from __future__ import annotations

import os
import stat
import sys

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile

from napari_mae._reader import napari_get_reader
from napari_mae.io.readers import ImageReadError, monai_readers, read_image


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=(5, 7, 9), dtype=np.uint16)  # (Z, Y, X); ImageJ has no int16


def test_imagej_tiff_stack_spacing(tmp_path, volume):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        volume,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    data, spacing, meta = read_image(path)
    np.testing.assert_array_equal(data, volume)
    assert meta["axes"] == "ZYX"
    assert spacing == pytest.approx((2.0, 0.25, 0.25))
    assert meta["unit"] == "um"


def test_two_page_tiff_reads_both_pages(tmp_path):
    pages = np.stack([np.zeros((4, 6), np.uint8), np.full((4, 6), 7, np.uint8)])
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, pages)
    data, spacing, meta = read_image(path)
    assert data.shape == (2, 4, 6)
    assert data[1].max() == 7
    assert spacing == (1.0, 1.0, 1.0)
    assert meta["unit"] == "pixel"


def test_monai_tifffile_reader_reads_every_page(tmp_path):
    """MONAI's PIL fallback reads page 0 only; our reader must read the whole stack."""
    from monai.transforms import LoadImage

    pages = np.stack([np.full((4, 6), i, np.uint8) for i in range(3)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, imagej=True, metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"})
    img = LoadImage(reader=monai_readers(), image_only=True, ensure_channel_first=True)(str(path))
    assert tuple(img.shape) == (1, 3, 4, 6)
    np.testing.assert_array_equal(np.asarray(img)[0, :, 0, 0], [0, 1, 2])
    assert float(img.affine[0, 0]) == pytest.approx(3.0)


def test_rgb_tiff_channels_last(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    data, spacing, meta = read_image(path)
    assert data.shape == (8, 10, 3)
    assert meta["axes"] == "YXC" and meta["rgb"]
    assert spacing == (1.0, 1.0)
    layers = napari_get_reader(str(path))(str(path))
    assert layers[0][1]["rgb"] is True


def _nifti(tmp_path, data, zooms, name="vol.nii.gz", affine=None):
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_nifti_round_trip_anisotropic(tmp_path):
    # Stored (X, Y, Z) in RAS with spacing 0.5 x 0.8 x 3 mm.
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _nifti(tmp_path, data, (0.5, 0.8, 3.0))
    out, spacing, meta = read_image(path)
    assert out.shape == (6, 5, 4)  # (Z, Y, X)
    assert spacing == pytest.approx((3.0, 0.8, 0.5))
    assert meta["axes"] == "ZYX" and meta["unit"] == "mm"
    assert out.dtype == np.int16
    # RAS -> (S, P, L): Z keeps direction, Y (A->P) and X (R->L) are flipped.
    np.testing.assert_array_equal(out, np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def test_nifti_4d_time_axis(tmp_path):
    data = np.zeros((4, 5, 6, 3), np.float32)
    data[..., 2] = 1
    path = _nifti(tmp_path, data, (1.0, 1.0, 2.0), name="t.nii")
    out, spacing, meta = read_image(path)
    assert meta["axes"] == "TZYX"
    assert out.shape == (3, 6, 5, 4)
    assert spacing == pytest.approx((2.0, 1.0, 1.0))
    assert out[2].min() == 1 and out[0].max() == 0


def test_nrrd_round_trip_anisotropic(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (i, j, k)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.78, 0.78, 6.5]),
        "space origin": np.zeros(3),
    }
    path = tmp_path / "vol.nrrd"
    nrrd.write(str(path), data, header)
    out, spacing, meta = read_image(path)
    assert out.dtype == np.int16
    assert out.shape == (6, 5, 4)
    assert spacing == pytest.approx((6.5, 0.78, 0.78))
    # LPS voxel axes are already (L, P, S): only the transpose to (Z, Y, X).
    np.testing.assert_array_equal(out, np.transpose(data, (2, 1, 0)))


def test_same_volume_same_orientation_nifti_and_nrrd(tmp_path):
    """A volume written as RAS NIfTI and as LPS NRRD reads back identically."""
    lps = np.random.default_rng(2).integers(0, 100, (4, 5, 6)).astype(np.int16)
    ras = lps[::-1, ::-1, :]
    nifti = _nifti(tmp_path, ras, (1.0, 1.0, 1.0))
    nrrd_path = tmp_path / "v.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(nrrd_path), lps, header)
    np.testing.assert_array_equal(read_image(nifti)[0], read_image(nrrd_path)[0])


@pytest.mark.parametrize("name", ["broken.tif", "broken.nii.gz", "broken.nrrd"])
def test_corrupt_file_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match=name):
        read_image(path)


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.touch()
    with pytest.raises(ImageReadError, match="empty"):
        read_image(empty)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.tif")


def test_napari_reader_rejects_unsupported(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert napari_get_reader(str(other)) is None
    assert napari_get_reader(str(tmp_path / "nothere.nii")) is None


def test_napari_reader_labels_by_name(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    path = _nifti(tmp_path, labels, (1.0, 1.0, 2.0), name="case_seg.nii.gz")
    ((data, kwargs, layer_type),) = napari_get_reader(str(path))(str(path))
    assert layer_type == "labels"
    assert kwargs["scale"] == pytest.approx([2.0, 1.0, 1.0])


def test_shared_ct_reads_with_spacing(shared_data):
    path = shared_data / "totalsegmentator_ct_mr_3d/images/example_ct_sm.nii.gz"
    data, spacing, meta = read_image(path)
    assert data.shape == (30, 101, 122)
    assert data.dtype == np.int16
    assert spacing == pytest.approx((3.0, 3.0, 3.0))


@pytest.mark.parametrize(
    ("shape", "dtype", "spacing", "unit"),
    [
        ((3, 5, 6), np.uint32, (3.0, 0.5, 0.5), "mm"),
        ((5, 6), np.float32, (0.2, 0.2), "um"),
        ((5, 6), np.uint16, None, "pixel"),
    ],
)
def test_write_tiff_round_trip_keeps_spacing(tmp_path, shape, dtype, spacing, unit):
    from napari_mae.io.writers import write_tiff

    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    path = write_tiff(tmp_path / "sub" / "out.tif", data, spacing=spacing, unit=unit)
    out, read_spacing, meta = read_image(path)
    np.testing.assert_array_equal(out, data)
    assert out.dtype == dtype
    assert meta["unit"] == unit
    assert read_spacing == pytest.approx(spacing or (1.0,) * len(shape))
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize("name", ["out.tif", "out.nii.gz"])
def test_written_file_mode_follows_umask(tmp_path, name):
    from napari_mae.io.writers import write_image

    old = os.umask(0o027)
    try:
        path = write_image(tmp_path / name, np.zeros((2, 4, 4), np.uint8))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o027


def test_write_tiff_refuses_other_suffix(tmp_path):
    from napari_mae.io.writers import write_tiff

    with pytest.raises(ValueError, match="TIFF"):
        write_tiff(tmp_path / "out.png", np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_nifti_output_overlays_the_input_scan(tmp_path, suffix):
    """A result written with write_image(..., metadata=...) reads back identically and sits
    in the input's scanner space (same voxel-to-world mapping)."""
    from napari_mae.io.writers import write_image

    data = np.random.default_rng(3).integers(0, 5, (4, 5, 6)).astype(np.int16)  # (i, j, k)
    if suffix == ".nrrd":
        src = tmp_path / "in.nrrd"
        header = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.8, 2.0])}
        header["space origin"] = np.array([10.0, -5.0, 3.0])
        nrrd.write(str(src), data, header)
    else:
        src = _nifti(tmp_path, data, (0.7, 0.8, 2.0), affine=np.diag([-0.7, 0.8, 2.0, 1.0]))
    volume, spacing, meta = read_image(src)
    out = write_image(tmp_path / "labels.nii.gz", volume.astype(np.uint32), spacing=spacing, metadata=meta)
    back, back_spacing, _ = read_image(out)
    np.testing.assert_array_equal(back, volume)
    assert back_spacing == pytest.approx(spacing)
    np.testing.assert_allclose(nib.load(out).affine, meta["voxel_affine"])
    if suffix == ".nii.gz":  # the same voxels at the same world positions as the input file
        a, b = nib.as_closest_canonical(nib.load(src)), nib.as_closest_canonical(nib.load(out))
        np.testing.assert_allclose(a.affine, b.affine)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_tiff_4d_without_axis_metadata_keeps_the_array_order(tmp_path):
    """Issue 12.3: (2, 8, 64, 64) written by tifffile without axes ("QQYX") reads as (T, Z, Y, X)
    = (2, 8, 64, 64), in the reader and the napari reader."""
    import tifffile

    data = np.arange(2 * 8 * 64 * 64, dtype=np.uint16).reshape(2, 8, 64, 64)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, data)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "QQYX"  # what the issue saw
    image, spacing, meta = read_image(path)
    assert meta["axes"] == "TZYX" and image.shape == (2, 8, 64, 64)
    np.testing.assert_array_equal(image, data)
    assert spacing == (1.0, 1.0, 1.0)
    layer_data, kwargs, _ = napari_get_reader(str(path))(str(path))[0]
    assert layer_data.shape == (2, 8, 64, 64) and len(kwargs["scale"]) == 4


@pytest.mark.parametrize(
    ("axes", "shape", "expected_axes", "expected_shape"),
    [
        ("ZTYX", (8, 2, 32, 32), "TZYX", (2, 8, 32, 32)),  # metadata says Z first: followed
        ("TZYX", (2, 8, 32, 32), "TZYX", (2, 8, 32, 32)),
        ("TQYX", (2, 8, 32, 32), "TZYX", (2, 8, 32, 32)),  # a named T, a generic axis: Z
        ("ZQYX", (8, 2, 32, 32), "TZYX", (2, 8, 32, 32)),  # a named Z, a generic axis: T
    ],
)
def test_tiff_4d_with_axis_metadata_follows_it(tmp_path, axes, shape, expected_axes, expected_shape):
    import tifffile

    data = np.random.default_rng(0).integers(0, 1000, shape, dtype=np.uint16)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, data, ome="Q" not in axes, metadata={"axes": axes})
    image, _, meta = read_image(path)
    assert meta["axes"] == expected_axes and image.shape == expected_shape
    order = [axes.replace("Q", "Z" if "Z" not in axes else "T").index(a) for a in expected_axes]
    np.testing.assert_array_equal(image, np.transpose(data, order))


def test_tiff_with_too_many_unnamed_axes_is_a_clear_error(tmp_path):
    import tifffile

    path = tmp_path / "five.tif"
    tifffile.imwrite(path, np.zeros((2, 2, 2, 8, 8), np.uint8))
    with pytest.raises(ImageReadError, match="cannot interpret TIFF axes"):
        read_image(path)


@pytest.mark.parametrize("name", ["text.nii.gz", "text.nii", "text.nrrd"])
def test_text_named_like_a_medical_volume(tmp_path, name, capfd):
    """Issue 12.9: a text file named .nii.gz says 'not a NIfTI file', without MONAI's reader list."""
    path = tmp_path / name
    path.write_text("patient,volume\n1,2\n" * 20)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith("not a NIfTI file" if ".nii" in name else "not an NRRD file")
    assert name in message and "install" not in message and "<monai" not in message
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("a.nii.gz", "a"),
        ("b.OME.TIF", "b"),
        ("c.ome.tiff", "c"),
        ("d.tif", "d"),
        ("e.zarr", "e"),
        ("f.ome.zarr", "f"),
        ("g.nrrd", "g"),
        ("h.jpeg", "h"),
        ("i.v2.tif", "i.v2"),
        ("noext", "noext"),
    ],
)
def test_image_stem_is_the_one_suffix_rule(name, stem, tmp_path):
    # One rule for the batch output names, training's image/label matching and the reader.
    from napari_mae.batch import output_name
    from napari_mae.io.readers import image_stem
    from napari_mae.training.segmentation import _stem

    assert image_stem(tmp_path / name) == stem
    assert output_name(tmp_path / name) == f"{stem}_labels"
    assert _stem(tmp_path / name) == stem
