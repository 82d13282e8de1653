"""The napari manifest and sample data resolve in all three installs.

``pip install -e .`` (the test environment itself), ``pip install .`` and a wheel
built from the sdist. The two non-editable installs go into ``--target`` folders
that are put first on ``PYTHONPATH`` of a child interpreter, which then asks npe2
to find and validate the plugin through its ``napari.manifest`` entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys
from pathlib import Path
from importlib.metadata import distribution
import npe2
import napari_mae
from napari_mae._sample_data import sample_paths

target = Path(sys.argv[1]).resolve()
pkg = Path(napari_mae.__file__).resolve().parent
assert target in pkg.parents, f"imported {pkg}, not from {target}"
ep = [e for e in distribution("napari-mae").entry_points if e.group == "napari.manifest"][0]
manifest = npe2.PluginManifest.from_distribution("napari-mae")
assert manifest.name == "napari-mae", manifest.name
assert (pkg / "napari.yaml").is_file()
for image, labels in sample_paths().values():
    assert image.is_file() and labels.is_file(), image
    assert target in image.resolve().parents, image
from napari_mae._names import BUNDLED_MODELS, bundled_weights_path
for name in BUNDLED_MODELS:
    assert bundled_weights_path(name).is_file(), name
print("OK", ep.value, len(manifest.contributions.widgets))
"""


def _check(target: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(target)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _pip_target(spec: str, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target"]
    out = subprocess.run([*cmd, str(target), spec], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_editable_install_manifest_and_samples():
    import npe2

    from napari_mae._sample_data import sample_paths

    manifest = npe2.PluginManifest.from_distribution("napari-mae")
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Masking",
        "Reconstruction",
        "Segmentation",
        "Training",
        "Batch",
    }
    assert len(manifest.contributions.sample_data) == 3
    for image, labels in sample_paths().values():
        assert image.is_file() and labels.is_file()


@pytest.mark.slow
def test_pip_install_and_wheel_from_sdist(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sdist = next(dist.glob("napari_mae-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        assert any(n.endswith("/napari.yaml") for n in names)
        assert any("sample_data/nuclei_3d/image.tif" in n for n in names)
        tar.extractall(tmp_path / "src", filter="data")
    unpacked = next((tmp_path / "src").iterdir())
    out = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(unpacked)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(dist.glob("napari_mae-*.whl"))
    _pip_target(str(wheel), tmp_path / "from_wheel")
    assert "OK" in _check(tmp_path / "from_wheel")

    _pip_target(str(REPO), tmp_path / "from_source")
    assert "OK" in _check(tmp_path / "from_source")
