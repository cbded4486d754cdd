"""The `slipform` console script: every subcommand is wired to a module with a main(argv)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from slipform_plugin.cli import SUBCOMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["train"]) == 2
    assert "unknown command 'train'; expected one of make-shards, patch" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_command_has_a_main_and_help(name):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    assert callable(module.main)
    result = subprocess.run(
        [sys.executable, "-m", "slipform_plugin.cli", name, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("slipform")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "make-shards" in result.stdout
