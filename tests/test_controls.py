"""``slipform controls``: the perception controls run end to end at a tiny budget and reject bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slipform_plugin.evaluation import controls
from slipform_plugin.synthetic.scene import COLOURS, SHAPES


def test_subject_items_render_the_subject_alone():
    items = controls.subject_items(20, "train", seed=3, world_name="default", image_size=64)
    assert len(items) == 20
    for item in items:
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
        assert item["shape"] in SHAPES and item["colour"] in COLOURS
        assert item["colour"] in item["phrase"] and item["size"] in item["phrase"]
        drawn = (item["image"] != 30).any(axis=2)  # 30: the background grey
        assert 0 < drawn.mean() < 0.5
    again = controls.subject_items(20, "train", seed=3, world_name="default", image_size=64)
    assert all((a["image"] == b["image"]).all() and a["phrase"] == b["phrase"] for a, b in zip(items, again))
    other = controls.subject_items(20, "test", seed=3, world_name="default", image_size=64)
    assert [a["phrase"] for a in items] != [b["phrase"] for b in other]


def test_controls_run_and_write_their_results(tmp_path, capsys):
    assert controls.main(["--out", str(tmp_path), "--steps", "3", "--batch-size", "8", "--warmup", "1",
                          "--test-items", "40", "--threads", "1"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "controls.json").read_text())
    assert results["settings"]["steps"] == 3
    supervised = results["supervised"]
    assert {a: supervised[a]["classes"] for a in controls.SUPERVISED_ATTRIBUTES} == {
        "shape": 6, "colour": 8, "size": 2, "material": 2, "texture": 3,
    }  # fmt: skip
    for attribute in controls.SUPERVISED_ATTRIBUTES:
        assert 0.0 <= supervised[attribute]["accuracy"] <= 1.0
        assert 0.0 < supervised[attribute]["majority"] <= 1.0
    contrastive = results["contrastive"]
    assert contrastive["perception"]["n"] == 40 and 0.0 <= contrastive["zero_shot_shape"] <= 1.0
    assert np.isfinite(contrastive["final_loss"])
    table = (tmp_path / "controls.md").read_text()
    assert "| supervised |" in table and "| contrastive |" in table
    assert "controls.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--controls", "supervised,nope"], "--controls"),
        (["--warmup", "-1"], "--warmup"),
    ],
)
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        controls.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
