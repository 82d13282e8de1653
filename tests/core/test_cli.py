"""The console script's skeleton: --help, --version, and every subcommand's --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_mae import __version__
from napari_mae.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: napari-mae" in capsys.readouterr().out


def test_each_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0, name
        assert name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "napari_mae.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert __version__ in out.stdout
