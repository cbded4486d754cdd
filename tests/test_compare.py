"""``slipform compare``: per-seed pairing of configurations across separate experiment runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slipform_plugin.evaluation import compare

SETTINGS = {
    "train_samples": 8192,
    "test_samples": 500,
    "epochs": 1,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 10,
    "image_size": 64,
    "model": "slipform-micro-cnn",
    "data_seed": 0,
    "hn_num": 3,
    "corpus_vocabulary": True,
    "world": "pair-relations",
    "single_group_fraction": 0.0,
    "extra_train_args": [],
}


def write_run(
    directory: Path, runs: list[tuple[str, int, float, float]], environment: dict | None = None, **settings: object
) -> Path:
    """results.json with (config, seed, attribute_swap, i2t_r1) runs, as ``slipform experiment`` writes it."""
    directory.mkdir(parents=True)
    records = [
        {"config": c, "seed": s, "metrics": {"attribute_swap": swap, "i2t_r1": r1, "t2i_r1": None}}
        for c, s, swap, r1 in runs
    ]
    body = {"settings": {**SETTINGS, **settings}, "runs": records}
    if environment is not None:
        body["environment"] = environment
    (directory / "results.json").write_text(json.dumps(body))
    return directory


def test_pairs_by_seed_across_runs_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.80, 0.50), ("c", 1, 0.70, 0.40), ("c", 2, 0.90, 0.30)])
    # the baseline's seeds come from two runs; seed 2 is missing, seed 3 has no partner
    first = write_run(tmp_path / "b1", [("a", 0, 0.60, 0.45), ("c", 0, 0.1, 0.1)])
    second = write_run(tmp_path / "b2", [("a", 1, 0.65, 0.42), ("a", 3, 0.99, 0.99)])
    code = compare.main(
        [
            f"{variant}:c",
            f"{first},{second}:a",
            "--metrics",
            "attribute_swap,i2t_r1",
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "out.json").read_text())
    (entry,) = result["baselines"]
    assert entry["seeds"] == [0, 1]
    assert entry["attribute_swap"]["per_seed"] == pytest.approx([0.20, 0.05])
    assert entry["attribute_swap"]["mean"] == pytest.approx(0.125)
    assert entry["attribute_swap"]["std"] == pytest.approx(0.10606601717798213)
    assert entry["i2t_r1"]["per_seed"] == pytest.approx([0.05, -0.02])
    assert result["variant"]["values"]["attribute_swap"]["per_seed"] == pytest.approx([0.80, 0.70, 0.90])
    table = capsys.readouterr().out
    assert "+12.5 ± 10.6 (+20.0, +5.0)" in table
    assert "80.0 ± 10.0 (80.0, 70.0, 90.0)" in table


def test_config_defaults_to_c(tmp_path: Path) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)])
    base = write_run(tmp_path / "b", [("c", 0, 0.7, 0.5)])
    result = compare.compare(compare.load_side(str(variant)), [compare.load_side(str(base))], ["attribute_swap"])
    assert result["baselines"][0]["attribute_swap"]["per_seed"] == pytest.approx([0.1])


def test_refuses_different_budgets_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)])
    base = write_run(tmp_path / "b", [("a", 0, 0.7, 0.5)], train_samples=16384)
    assert compare.main([str(variant), f"{base}:a", "--metrics", "attribute_swap"]) == 2
    assert "train_samples (8192 vs 16384)" in capsys.readouterr().err
    assert compare.main([str(variant), f"{base}:a", "--allow-different-settings", "--metrics", "attribute_swap"]) == 0


def test_precision_is_a_budget_setting_and_fp32_for_older_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)], precision="fp32")
    older = write_run(tmp_path / "older", [("a", 0, 0.7, 0.5)])  # written before results.json recorded it
    mixed = write_run(tmp_path / "amp", [("a", 0, 0.7, 0.5)], precision="amp")
    assert compare.main([str(variant), f"{older}:a", "--metrics", "attribute_swap"]) == 0
    capsys.readouterr()
    assert compare.main([str(variant), f"{mixed}:a", "--metrics", "attribute_swap"]) == 2
    assert "precision ('fp32' vs 'amp')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("baseline_runs", "message"),
    [
        ([("a", 5, 0.7, 0.5)], "shares no seed"),
        ([("b", 0, 0.7, 0.5)], "no finished run of config 'a'"),
    ],
)
def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture, baseline_runs: list, message: str) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)])
    base = write_run(tmp_path / "b", baseline_runs)
    assert compare.main([str(variant), f"{base}:a", "--metrics", "attribute_swap"]) == 2
    assert message in capsys.readouterr().err


def test_missing_results_and_unknown_metric(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)])
    assert compare.main([str(variant), str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err
    base = write_run(tmp_path / "b", [("c", 0, 0.7, 0.5)])
    assert compare.main([str(variant), str(base), "--metrics", "atribute_swap"]) == 2
    assert "--metrics: ['atribute_swap']" in capsys.readouterr().err


def test_same_seed_twice_is_refused(tmp_path: Path) -> None:
    first = write_run(tmp_path / "one", [("c", 0, 0.8, 0.5)])
    second = write_run(tmp_path / "two", [("c", 0, 0.7, 0.5)])
    with pytest.raises(ValueError, match="seed 0 of config 'c' appears in more than one directory"):
        compare.load_side(f"{first},{second}")


def test_refuses_different_environments_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    here = {"cpu": "AMD EPYC", "torch": "2.14.1", "torch_cpu_capability": "AVX2"}
    there = {**here, "torch_cpu_capability": "AVX512"}
    variant = write_run(tmp_path / "v", [("c", 0, 0.8, 0.5)], environment=here)
    same = write_run(tmp_path / "same", [("c", 0, 0.7, 0.5)], environment=dict(here))
    other = write_run(tmp_path / "other", [("c", 0, 0.7, 0.5)], environment=there)
    unknown = write_run(tmp_path / "unknown", [("c", 0, 0.7, 0.5)])  # written before the environment was recorded
    assert compare.main([str(variant), str(same), str(unknown), "--metrics", "attribute_swap"]) == 0
    capsys.readouterr()
    assert compare.main([str(variant), str(other), "--metrics", "attribute_swap"]) == 2
    assert "different environments (torch_cpu_capability ('AVX2' vs 'AVX512'))" in capsys.readouterr().err
    args = [str(variant), str(other), "--metrics", "attribute_swap", "--allow-different-settings"]
    assert compare.main(args) == 0
    with pytest.raises(ValueError, match="different environments"):
        compare.load_side(f"{same},{other}")


def test_test_split_sd_is_the_item_resampling_sd_of_a_paired_difference() -> None:
    # d = (0, +1, -1, 0): sample variance 2/3, over n = 4 items 1/6; a second seed with identical outcomes adds 0
    assert compare.test_split_sd([("1100", "1010")]) == pytest.approx((1 / 6) ** 0.5)
    assert compare.test_split_sd([("1100", "1010"), ("1111", "1111")]) == pytest.approx((1 / 12) ** 0.5)
    assert compare.test_split_sd([("1100", "1010"), (None, "1111")]) is None  # a seed without outcomes
    assert compare.test_split_sd([("1100", "10100")]) is None  # scored on splits of different sizes
    assert compare.test_split_sd([]) is None


def test_outcomes_of_the_runs_give_each_difference_its_test_split_sd(tmp_path: Path, capsys) -> None:
    variant = write_run(tmp_path / "v", [("c", 0, 0.75, 0.5), ("c", 1, 0.5, 0.5)])
    baseline = write_run(tmp_path / "b", [("a", 0, 0.5, 0.5), ("a", 1, 0.5, 0.5)])
    for directory, bits in ((variant, ["1110", "1100"]), (baseline, ["1100", "1100"])):
        body = json.loads((directory / "results.json").read_text())
        for run, swap_bits in zip(body["runs"], bits):
            run["outcomes"] = {"attribute_swap": swap_bits}
        (directory / "results.json").write_text(json.dumps(body))
    result = compare.compare(
        compare.load_side(f"{variant}:c"), [compare.load_side(f"{baseline}:a")], ["attribute_swap", "i2t_r1"]
    )
    swap = result["baselines"][0]["attribute_swap"]
    # seed 0: d = (0, 0, +1, 0), variance 1/4 over 4 items; seed 1: d = 0
    assert swap["test_sd"] == pytest.approx((0.0625 / 2) ** 0.5)
    assert "test_sd" not in result["baselines"][0]["i2t_r1"]  # no outcomes recorded for it
    assert compare.main([f"{variant}:c", f"{baseline}:a", "--metrics", "attribute_swap"]) == 0
    assert "+12.5 ± 17.7 (+25.0, +0.0) [test split ± 17.7]" in capsys.readouterr().out
