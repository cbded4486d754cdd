"""OpenCLIP's real trainer with the plugin: `torchrun -m open_clip_train.main -- --loss cement --hn concreteplant`."""

from __future__ import annotations

import math
import os
import re

import pytest
from conftest import base_train_args, run_training

from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS


def _assert_ok(run) -> None:
    assert run.returncode == 0, run.output[-4000:]


def test_cement_concreteplant_two_processes_on_cpu(synthetic_shards, tmp_path):
    """The README's command on CPU: two torchrun workers, Cement + ConcretePlant, a checkpoint at the end."""
    data, num = synthetic_shards
    args = base_train_args(data, num, tmp_path, "cement-cp", **{"--report-to": "tensorboard"})
    recommended = [
        "--cement-hard-margin-difficulty",
        "--cement-margin-hard",
        "0.2",
        "--cement-margin-batch",
        "0.1",
        "--cement-hard-columns",
        "separate",
        "--cement-hard-weight",
        "1",
    ]
    run = run_training([*args, "--loss", "cement", "--hn", "concreteplant", "--hn-num", "3", *recommended], nproc=2)
    _assert_ok(run)
    log = run.out_log
    # Both processes ran (OpenCLIP logs the world size) and the plugin was active (not the abbreviation trap).
    assert "total 2" in log or "world size 2" in log.lower() or "Running in distributed mode" in log
    assert "Slipform: loss=cement (CementLoss(" in log
    assert "margin_hard=0.2, margin_batch=0.1" in log and "hard_margin_difficulty=True" in log
    assert "hard_weight=1.0" in log and "hard_columns='separate'" in log
    assert "Slipform: hard negatives from 'concreteplant', K=3" in log
    # Negatives reached the loss with the expected shape: [batch, K, embed_dim] of slipform-tiny.
    shape = re.search(r"hn_text_features \[(\d+), (\d+), (\d+)\], real negatives (\d+)/(\d+)", log)
    assert shape, log[-3000:]
    assert shape.groups()[:3] == ("16", "3", "128")
    assert int(shape.group(4)) > 0
    # The stage ran in DataLoader workers and planted negatives for most samples.
    counts = re.findall(r"Slipform hard negatives \(pid (\d+)\): \{(.*)\}", log)
    assert counts and all("'samples': " in c[1] for c in counts)
    assert sum(int(re.search(r"'negatives': (\d+)", c[1]).group(1)) for c in counts) > 0
    assert os.getpid() not in {int(pid) for pid, _ in counts}
    # Hard-negative accuracy logged through OpenCLIP's logging and TensorBoard.
    assert "Hard-negative accuracy:" in log
    by_kind = re.findall(r"Hard-negative accuracy by kind: (.*)", log)
    assert by_kind, log[-3000:]
    logged_kinds = {item.strip().split(" ")[0] for item in by_kind[-1].split(",")}
    assert logged_kinds and logged_kinds <= set(HARD_NEGATIVE_KINDS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.log_dir / "tensorboard"))
    events.Reload()
    assert "train/hn_acc" in events.Tags()["scalars"]
    assert {f"train/hn_acc/{kind}" for kind in logged_kinds} <= set(events.Tags()["scalars"])
    assert "train/contrastive_loss" in events.Tags()["scalars"]
    # Finite losses, params.txt records the Slipform flags, and a checkpoint was written.
    losses = run.losses()
    assert losses and all(math.isfinite(v) for v in losses)
    params = run.params
    assert (params["loss"], params["hn"], params["hn_num"]) == ("cement", "concreteplant", "3")
    assert (run.log_dir / "checkpoints" / "epoch_1.pt").exists()


def test_without_slipform_flags_training_is_exactly_openclip(csv_dataset, tmp_path, tiny_model_dir):
    """Same seed, same data: the losses with the plugin installed equal those with it disabled, bit for bit.

    OpenCLIP's CSV loader is used because its order is seeded (the WebDataset sample shuffle is not), and the
    model is a ``local-dir:`` config because ``slipform-tiny`` exists only with the plugin.
    """
    data, num = csv_dataset
    model = {"--model": f"local-dir:{tiny_model_dir}", "--dataset-type": "csv"}
    with_plugin = run_training(base_train_args(data, num, tmp_path, "with", **model))
    without = run_training(base_train_args(data, num, tmp_path, "without", **model), env={"SLIPFORM_DISABLE": "1"})
    _assert_ok(with_plugin)
    _assert_ok(without)
    assert "loss" in with_plugin.params and "loss" not in without.params  # the plugin really was on, then off
    assert len(with_plugin.losses()) >= 8
    assert with_plugin.losses() == without.losses()


def test_infonce_without_negatives_trains_like_clip_loss(csv_dataset, tmp_path):
    """--loss infonce (chunked path, K = 0) follows the same trajectory as OpenCLIP's ClipLoss (seeded CSV data)."""
    data, num = csv_dataset
    csv = {"--dataset-type": "csv"}
    clip = run_training(base_train_args(data, num, tmp_path, "clip", **csv))
    infonce = run_training([*base_train_args(data, num, tmp_path, "infonce", **csv), "--loss", "infonce"])
    _assert_ok(clip)
    _assert_ok(infonce)
    assert "Slipform: loss=infonce (InfoNCELoss(" in infonce.out_log
    assert infonce.losses() == pytest.approx(clip.losses(), rel=1e-4, abs=1e-4)


def test_accum_freq_local_loss_and_third_party_extension(synthetic_shards, tmp_path, toy_extension):
    """Entry-point loss and generator from another package, under DDP with --accum-freq 2 --local-loss."""
    data, num = synthetic_shards
    args = base_train_args(data, num, tmp_path, "toy", **{"--batch-size": "8"})
    extra = ["--loss", "toy_infonce", "--hn", "word_swap", "--hn-num", "2", "--accum-freq", "2"]
    extra += ["--local-loss", "--gather-with-grad"]
    run = run_training([*args, *extra], nproc=2, env={"PYTHONPATH": str(toy_extension)})
    _assert_ok(run)
    log = run.out_log
    assert "Slipform: loss=toy_infonce (ToyLoss(" in log
    assert "Slipform: hard negatives from 'word_swap', K=2" in log
    # With --accum-freq 2 the loss sees both micro-batches' features: 2 x 8 rows, K = 2.
    assert re.search(r"hn_text_features \[16, 2, 128\]", log), log[-3000:]
    # The toy loss inherits accepts_hard_negative_kinds; its negatives are all of kind "other".
    assert re.search(r"Hard-negative accuracy by kind: other [0-9.]+\n", log), log[-3000:]
    assert all(math.isfinite(v) for v in run.losses())
    assert (run.log_dir / "checkpoints" / "epoch_1.pt").exists()
