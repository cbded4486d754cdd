"""The recommended Cement settings are one constant (slipform_plugin.recommended), and every place that writes
them out (the trainer's flags, the experiment's (c), launch_slurm's CEMENT_ARGS=recommended, README) agrees."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from slipform_plugin.integration import add_arguments
from slipform_plugin.losses import CementLoss, create_cement_loss
from slipform_plugin.recommended import RECOMMENDED_CEMENT, RECOMMENDED_CEMENT_FLAGS, cement_flags

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = tuple(RECOMMENDED_CEMENT)  # the CementLoss attributes the recommendation sets


def _loss_from_flags(flags: list[str] | tuple[str, ...]) -> CementLoss:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return create_cement_loss(parser.parse_args(list(flags)))


def _settings(loss: CementLoss) -> dict[str, object]:
    return {name: getattr(loss, name) for name in SETTINGS}


def test_flags_give_the_loss_of_the_keywords():
    from_keywords = CementLoss(**RECOMMENDED_CEMENT)
    assert _settings(_loss_from_flags(RECOMMENDED_CEMENT_FLAGS)) == _settings(from_keywords) == dict(RECOMMENDED_CEMENT)
    assert _settings(_loss_from_flags([])) != dict(RECOMMENDED_CEMENT)  # the loss's own defaults differ


def test_cement_flags_writes_booleans_and_refuses_unknown_keywords():
    assert cement_flags({"hard_margin_difficulty": False, "hard_weight": 0.5}) == ("--cement-hard-weight", "0.5")
    assert cement_flags({"hard_columns": "joint"}) == ("--cement-hard-columns", "joint")
    with pytest.raises(ValueError, match=re.escape("settings: expected keywords among")):
        cement_flags({"margin_gate": "none"})
    with pytest.raises(TypeError):
        RECOMMENDED_CEMENT["hard_weight"] = 2.0  # read-only


def test_experiment_c_runs_the_recommendation():
    from slipform_plugin.evaluation.experiment import build_configs, build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args([]))
    configs = build_configs(settings.margin_hard, settings.margin_batch, settings.margin_gate, settings.hard_weight,
                            settings.hard_margin_difficulty, settings.hard_columns)  # fmt: skip
    assert _settings(_loss_from_flags(configs["c"].flags)) == dict(RECOMMENDED_CEMENT)


def test_launchers_expand_recommended_to_the_constant():
    script = f'source "{ROOT / "launch_slurm" / "_common.sh"}" && printf %s "$SLIPFORM_RECOMMENDED_CEMENT_ARGS"'
    expanded = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert expanded.split() == list(RECOMMENDED_CEMENT_FLAGS)


def test_readme_writes_the_recommendation_where_it_names_it():
    readme = ROOT / "README.md"
    text = " ".join(readme.read_text().replace("\\\n", " ").split())  # backslash-joined lines, one space
    flags = " ".join(RECOMMENDED_CEMENT_FLAGS)
    first_command = next(line for line in readme.read_text().splitlines() if "open_clip_train.main" in line)
    assert "--loss cement --hn concreteplant" in first_command and flags in first_command
    assert f"--loss cement --hn concreteplant {flags}" in text  # the Cement section's "What we recommend"
    assert f"`recommended` is the Cement section's recommendation (`{flags}`" in text  # the Slurm knob's row
    keywords = ", ".join(f"{name}={value!r}" for name, value in RECOMMENDED_CEMENT.items())
    assert "CementLoss(**RECOMMENDED_CEMENT) # " in text  # the Python form, spelled out in its comment lines
    assert f"CementLoss({keywords})" in re.sub(r" # ", " ", text)


def test_readme_own_loop_example_runs():
    """README's "Cement in your own training loop" block runs as written on one process."""
    import torch

    section = (ROOT / "README.md").read_text().split("## Cement in your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    batch, negatives, dim = 5, 3, 8
    image = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scope = {
        "rank": 0,
        "world_size": 1,
        "image_features": image,
        "text_features": torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1),
        "logit_scale": torch.tensor(2.0),
        "hn": torch.nn.functional.normalize(torch.randn(batch, negatives, dim), dim=-1),
        "scores": torch.rand(batch, negatives),
        "mask": torch.ones(batch, negatives, dtype=torch.bool),
        "kinds": torch.tensor([[0, 4, 5]] * batch),  # replace_object, swap_attributes, swap_objects
    }
    exec(code, scope)  # README's own code
    assert scope["loss_fn"].hard_columns == "separate" and torch.isfinite(scope["loss"])
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert 0.0 <= scope["accuracy"] <= 1.0
    assert set(scope["by_kind"]) == {"replace_object", "swap_attributes", "swap_objects"}
