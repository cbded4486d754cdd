"""Shared fixtures: synthetic shards, the toy third-party extension, and running OpenCLIP's real trainer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when its kernels are first decorated: on a machine without an NVIDIA GPU the
# kernels can only run in the interpreter, so set it before any test module imports them.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slurm: starts a real Slurm cluster on this machine (needs root and Debian)")
    config.addinivalue_line("markers", "slow: takes more than a minute")


def make_shards(out: Path, num: int, shard_size: int = 64, seed: int = 0, extra: tuple[str, ...] = ()) -> str:
    """Write synthetic shards with ``slipform make-shards`` and return the brace pattern of their paths."""
    result = subprocess.run(
        [PYTHON, "-m", "slipform_plugin.cli", "make-shards", str(out), "--num", str(num),
         "--shard-size", str(shard_size), "--seed", str(seed), *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"--train-data '([^']+)'", result.stdout)
    assert match, result.stdout
    return match.group(1)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> tuple[str, int]:
    """256 synthetic samples in 4 shards: (``--train-data`` pattern, number of samples)."""
    out = tmp_path_factory.mktemp("shards")
    return make_shards(out, 256), 256


@pytest.fixture(scope="session")
def csv_dataset(synthetic_shards, tmp_path_factory) -> tuple[str, int]:
    """The synthetic samples as OpenCLIP's CSV dataset (tab-separated ``filepath``/``title``): its loader is
    seeded by ``--seed``, unlike the WebDataset sample shuffle, so runs can be compared loss for loss."""
    import tarfile

    from braceexpand import braceexpand

    directory = tmp_path_factory.mktemp("csv")
    rows = ["filepath\ttitle"]
    for shard in braceexpand(synthetic_shards[0]):
        with tarfile.open(shard) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name, member in sorted(members.items()):
                stem, _, extension = name.partition(".")
                if extension not in ("png", "jpg"):
                    continue
                image = directory / name
                image.write_bytes(archive.extractfile(member).read())
                caption = archive.extractfile(members[f"{stem}.txt"]).read().decode().strip()
                rows.append(f"{image}\t{caption}")
    table = directory / "train.csv"
    table.write_text("\n".join(rows) + "\n")
    return str(table), len(rows) - 1


@pytest.fixture(scope="session")
def toy_extension(tmp_path_factory) -> Path:
    """The package in tests/toy_extension installed into a fresh directory (put it on PYTHONPATH)."""
    source = tmp_path_factory.mktemp("toy_src") / "toy_extension"
    shutil.copytree(ROOT / "tests" / "toy_extension", source)
    target = tmp_path_factory.mktemp("toy_site")
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """slipform-tiny as a ``local-dir:`` model, usable by OpenCLIP with the plugin disabled."""
    import json

    directory = tmp_path_factory.mktemp("tiny_model")
    config = json.loads((ROOT / "slipform_plugin" / "model_configs" / "slipform-tiny.json").read_text())
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return directory


@dataclass
class TrainingRun:
    returncode: int
    output: str
    log_dir: Path

    @property
    def out_log(self) -> str:
        path = self.log_dir / "out.log"
        return path.read_text() if path.exists() else ""

    @property
    def params(self) -> dict[str, str]:
        path = self.log_dir / "params.txt"
        pairs = (line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)
        return {key: value for key, value in pairs}

    def losses(self) -> list[float]:
        return [float(v) for v in re.findall(r"Contrastive_loss: ([-\d.einfa]+) \(", self.out_log)]


def base_train_args(train_data: str, num_samples: int, logs: Path, name: str, **overrides: str) -> list[str]:
    options = {
        "--model": "slipform-tiny",
        "--train-data": train_data,
        "--train-num-samples": str(num_samples),
        "--dataset-type": "webdataset",
        "--batch-size": "16",
        "--epochs": "1",
        "--workers": "1",
        "--device": "cpu",
        "--precision": "fp32",
        "--lr": "1e-3",
        "--warmup": "2",
        "--seed": "0",
        "--log-every-n-steps": "1",
        "--logs": str(logs),
        "--name": name,
        **overrides,
    }
    return [item for pair in options.items() for item in pair]


def run_training(
    args: list[str], *, nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 600
) -> TrainingRun:
    """Run ``open_clip_train.main`` (under ``torchrun`` when ``nproc > 1``) exactly as a user would."""
    if nproc > 1:
        command = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "open_clip_train.main", "--", *args]
    else:
        command = [PYTHON, "-m", "open_clip_train.main", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)
    logs = Path(args[args.index("--logs") + 1]) / args[args.index("--name") + 1]
    return TrainingRun(result.returncode, result.stdout + result.stderr, logs)
