"""The .pth bootstrap: present after install (regular and editable), inert for unrelated processes, never
breaking a process even when OpenCLIP or torch are missing or broken; and the patches/ round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, base_train_args, run_training

from slipform_plugin import patching


def run_python(
    code: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = (), cwd: Path | None = None
) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, env=environment, cwd=cwd
    )


def test_unrelated_process_pays_almost_nothing():
    code = (
        "import sys, json; finders = [getattr(f, '__name__', type(f).__name__) for f in sys.meta_path]; "
        "print(json.dumps({'finder': 'SlipformFinder' in finders, "
        "'heavy': sorted(m for m in ('torch', 'open_clip', 'spacy', 'numpy') if m in sys.modules)}))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"finder": True, "heavy": []}
    assert result.stderr == ""


def test_disable_switch():
    result = run_python(
        "import sys; print(any(getattr(f, '__name__', '') == 'SlipformFinder' for f in sys.meta_path))",
        env={"SLIPFORM_DISABLE": "1"},
    )
    assert result.stdout.strip() == "False"


def test_bootstrap_never_breaks_a_process_with_broken_or_missing_openclip(tmp_path):
    """A fake open_clip without torch and an open_clip_train whose params has no parse_args: still runs."""
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "__init__.py").write_text("VALUE = 1\n")  # no torch, no create_loss, no factory
    (tmp_path / "open_clip_train").mkdir()
    (tmp_path / "open_clip_train" / "__init__.py").write_text("")
    (tmp_path / "open_clip_train" / "params.py").write_text("X = 2\n")
    code = "import open_clip, open_clip_train.params as p; print(open_clip.VALUE + p.X)"
    result = run_python(code, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    for line in result.stderr.splitlines():
        assert line.startswith("slipform: ")  # at most one-line notices, no traceback


def test_editable_or_regular_install_has_the_pth():
    """The environment running the tests has the project installed: the .pth sits in its site-packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / "slipform_plugin.pth").read_text().strip() == "import slipform_plugin._bootstrap"


def test_regular_install_ships_pth_and_kernels_under_the_package(tmp_path):
    target = tmp_path / "site"
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "runs", "logs"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (target / "slipform_plugin.pth").exists()
    assert (target / "slipform_plugin" / "kernels" / "__init__.py").exists()
    assert (target / "slipform_plugin" / "patches" / "manifest.json").exists()
    assert (target / "slipform_plugin" / "model_configs" / "slipform-tiny.json").exists()
    assert not (target / "kernels").exists()  # no top-level module shadowing the PyPI package `kernels`
    # A bare interpreter (-S: no site-packages) that adds the target as a site dir runs its .pth.
    code = (
        f"import site, sys; site.addsitedir({str(target)!r}); import slipform_plugin; "
        "print(slipform_plugin.__file__); "
        "print(any(getattr(f, '__name__', '') == 'SlipformFinder' for f in sys.meta_path))"
    )
    result = run_python(code, flags=("-S",), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path, finder = result.stdout.split()
    assert path.startswith(str(target)) and finder == "True"


@pytest.fixture
def installed_kernels(tmp_path) -> Path:
    """A site directory holding a stand-in for the unrelated PyPI package ``kernels`` (Hugging Face's): a
    top-level ``kernels`` module and, like the real one, an ``egg_info.writers`` entry point into
    ``kernels._internals``, which setuptools imports while it builds any package."""
    site = tmp_path / "other-site"
    internals = site / "kernels" / "_internals"
    internals.mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("INSTALLED = True\n")
    (internals / "__init__.py").write_text("")
    (internals / "locking.py").write_text("def write_egg_lockfile(cmd, basename, filename):\n    pass\n")
    info = site / "kernels-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(
        "[egg_info.writers]\nkernels.lock = kernels._internals.locking:write_egg_lockfile\n"
    )
    return site


def test_checkout_kernels_dir_does_not_shadow_an_installed_kernels(installed_kernels):
    """Python run in the checkout (sys.path[0] = its root) imports the installed top-level ``kernels``, not the
    checkout's ``kernels/`` (which is slipform_plugin.kernels); without the bootstrap the checkout's would win."""
    code = "import kernels, slipform_plugin.kernels as ours; print(kernels.__file__); print(ours.__file__)"
    env = {"PYTHONPATH": str(installed_kernels)}
    result = run_python(code, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    installed, ours = result.stdout.split()
    assert installed == str(installed_kernels / "kernels" / "__init__.py")
    assert ours == str(ROOT / "kernels" / "__init__.py")
    disabled = run_python("import kernels; print(kernels.__file__)", env={**env, "SLIPFORM_DISABLE": "1"}, cwd=ROOT)
    assert disabled.stdout.strip() == str(ROOT / "kernels" / "__init__.py")  # what the bootstrap prevents
    # Without the stand-in: the environment's own top-level kernels if it has one (transformers >= 5.25 pulls it
    # in), else the checkout's directory, as without the bootstrap.
    from importlib.machinery import PathFinder

    elsewhere = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != ROOT.resolve()])
    expected = elsewhere.origin if elsewhere is not None else str(ROOT / "kernels" / "__init__.py")
    alone = run_python("import kernels; print(kernels.__file__)", cwd=ROOT)
    assert alone.stdout.strip() == expected, alone.stderr


def test_install_builds_beside_an_installed_kernels(tmp_path, installed_kernels):
    """setuptools imports every ``egg_info.writers`` entry point while it builds; the checkout's ``kernels/``
    must not stand in for the installed package's (setup.py takes its own directory off sys.path)."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "runs", "logs"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(tmp_path / "site"), str(source)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(installed_kernels)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "slipform_plugin" / "kernels" / "triton_cement.py").exists()


def test_patch_round_trip_on_a_copy(tmp_path):
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for package in ("open_clip", "open_clip_train"):
        shutil.copytree(site_packages / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.py")}
    assert set(patching.file_states(tmp_path).values()) == {"original"}
    changed = patching.apply(tmp_path)
    assert len(changed) == 6 and set(patching.file_states(tmp_path).values()) == {"patched"}
    assert (tmp_path / patching.BACKUP_DIR / "open_clip_train" / "params.py").exists()
    assert "_SLIPFORM_PATCHED" in (tmp_path / "open_clip_train" / "main.py").read_text()
    assert patching.apply(tmp_path) == []  # idempotent
    assert len(patching.revert(tmp_path)) == 6
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.py")} == before
    assert not (tmp_path / patching.BACKUP_DIR).exists()


def test_patch_refuses_modified_files_and_reverts_without_backup(tmp_path):
    site_packages = Path(sysconfig.get_paths()["purelib"])
    for package in ("open_clip", "open_clip_train"):
        shutil.copytree(site_packages / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    train = tmp_path / "open_clip_train" / "train.py"
    original = train.read_text()
    train.write_text(original + "\n# a local edit\n")
    with pytest.raises(patching.PatchError, match="refusing to patch"):
        patching.apply(tmp_path)
    assert set(patching.file_states(tmp_path).values()) == {"original", "modified"}  # nothing was touched
    train.write_text(original)
    patching.apply(tmp_path)
    shutil.rmtree(tmp_path / patching.BACKUP_DIR)  # reverse-applying the diffs also restores the originals
    patching.revert(tmp_path)
    assert set(patching.file_states(tmp_path).values()) == {"original"}


def test_cli_patch_check_reports_state(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "slipform_plugin.cli", "patch", "check", "--site-packages", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "expected a directory containing open_clip/" in result.stderr


def test_patched_openclip_trains_with_the_bootstrap_disabled(tmp_path, synthetic_shards, toy_extension):
    """The explicit diffs alone carry Slipform: --loss/--hn work with SLIPFORM_DISABLE=1 on a patched copy."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    patched = tmp_path / "patched"
    for package in ("open_clip", "open_clip_train"):
        shutil.copytree(site_packages / package, patched / package, ignore=shutil.ignore_patterns("__pycache__"))
    patching.apply(patched)
    data, num = synthetic_shards
    args = base_train_args(data, num, tmp_path, "patched", **{"--train-num-samples": "64"})
    env = {"SLIPFORM_DISABLE": "1", "PYTHONPATH": f"{patched}{os.pathsep}{toy_extension}"}
    run = run_training([*args, "--loss", "cement", "--hn", "word_swap", "--hn-num", "2"], nproc=2, env=env)
    assert run.returncode == 0, run.output[-3000:]
    assert "Slipform: loss=cement (CementLoss(" in run.out_log
    assert "hn_text_features [16, 2, 128]" in run.out_log
    assert (run.log_dir / "checkpoints" / "epoch_1.pt").exists()
