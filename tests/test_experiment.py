"""The synthetic experiment: the uniform-draw ablation generator and ``slipform experiment --quick`` end to end.

The end-to-end test proves the pipeline (data, offline planting, six real ``open_clip_train.main`` runs,
``slipform eval``, table, JSON and plot); it never asserts the size of an effect.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pickle
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from slipform_plugin.concreteplant import ConcretePlant, sampling
from slipform_plugin.evaluation.ablations import (
    KindMatchedUniformConcretePlant,
    UniformConcretePlant,
    create_uniform_concreteplant,
    sample_uniform,
)
from slipform_plugin.evaluation.experiment import (
    ALL_CONFIGS,
    MODEL,
    TABLE_METRICS,
    aggregate,
    build_configs,
    parse_train_log,
    training_kind_table,
)
from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS, HardNegative
from slipform_plugin.synthetic import make_item

CAPTIONS = [
    "two small red matte striped circles to the left of a large blue metallic solid square",
    "a large green metallic dotted star above three small yellow matte solid crosses",
    "A brown dog sleeps on a red couch next to a wooden table.",
    "a man riding a horse on the beach",
]


@pytest.fixture(scope="module")
def uniform() -> UniformConcretePlant:
    generator = UniformConcretePlant(num_negatives=3, seed=0)
    generator.plant(["A dog on a couch."], ["warm-up"])  # loads spaCy and the norms once for the module
    return generator


# ------------------------------------------------------------------------------------- uniform sampling
def _fake(kind: str, score: float, index: int) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, score=score, text=f"{kind}-{index}", primary=True)


def test_sample_uniform_ignores_scores_where_concreteplant_follows_them():
    """Within one kind the uniform draw picks every candidate alike; ConcretePlant's picks the concrete ones."""
    pool = [_fake("replace_attribute", score, i) for i, score in enumerate((0.05, 0.3, 0.5, 0.7, 0.95))]
    weights = sampling.default_kind_weights()
    trials = 4000
    uniform_counts: Counter = Counter()
    weighted_counts: Counter = Counter()
    for trial in range(trials):
        uniform_counts[sample_uniform(pool, 1, random.Random(trial), weights)[0].text] += 1
        weighted_counts[sampling.sample(pool, 1, random.Random(trial), weights)[0].text] += 1
    # Uniform: each of the 5 candidates about 800 times (binomial sd about 25).
    assert all(abs(uniform_counts[c.text] - trials / 5) < 150 for c in pool), uniform_counts
    # Concreteness-weighted: the most concrete candidate dominates, the least concrete is almost never drawn.
    assert weighted_counts["replace_attribute-4"] > trials / 2
    assert weighted_counts["replace_attribute-0"] < trials / 50


def test_sample_uniform_balances_kinds_and_keeps_texts_distinct():
    pool = [_fake("replace_attribute", 0.5, i) for i in range(20)] + [_fake("swap_objects", 0.5, 0)]
    pool.append(SimpleNamespace(kind="swap_objects", score=0.9, text="swap_objects-0", primary=True))  # duplicate
    pool.append(SimpleNamespace(kind="swap_objects", score=0.9, text="variant", primary=False))  # never drawn
    weights = sampling.default_kind_weights()
    first = Counter(sample_uniform(pool, 1, random.Random(t), weights)[0].kind for t in range(2000))
    assert abs(first["swap_objects"] - 1000) < 120, first  # kinds drawn alike, not by number of candidates
    for trial in range(200):
        chosen = sample_uniform(pool, 5, random.Random(trial), weights)
        assert len({c.text for c in chosen}) == len(chosen) == 5
        assert all(c.text != "variant" for c in chosen)
    assert sorted(c.text for c in sample_uniform(pool[:2], 5, random.Random(0), weights)) == sorted(
        c.text for c in pool[:2]
    )
    assert sample_uniform([], 3, random.Random(0), weights) == []


# ------------------------------------------------------------------------------------- the generator
def test_same_candidates_as_concreteplant_and_scores_kept(uniform):
    reference = ConcretePlant(num_negatives=3, seed=0)
    reference._nlp = uniform.nlp
    caption = CAPTIONS[0]
    candidates = {(n.text, n.kind, n.score) for n in reference.candidates(caption, "k0")}
    assert {(n.text, n.kind, n.score) for n in uniform.candidates(caption, "k0")} == candidates
    for negatives in uniform.plant(CAPTIONS, [f"k{i}" for i in range(len(CAPTIONS))]):
        assert 1 <= len(negatives) <= 3
        for negative in negatives:
            assert isinstance(negative, HardNegative) and 0.0 <= negative.score <= 1.0
    for negative in uniform.plant([caption], ["k0"])[0]:
        assert (negative.text, negative.kind, negative.score) in candidates


def test_deterministic_per_seed_and_key(uniform):
    keys = [f"key-{i}" for i in range(len(CAPTIONS))]
    first = uniform.plant(CAPTIONS, keys)
    assert uniform.plant(list(reversed(CAPTIONS)), list(reversed(keys))) == list(reversed(first))
    assert [uniform.plant([c], [k])[0] for c, k in zip(CAPTIONS, keys)] == first
    other = UniformConcretePlant(num_negatives=3, seed=1)
    other._nlp = uniform.nlp
    many = [CAPTIONS[0]] * 20
    many_keys = [f"m{i}" for i in range(20)]
    assert other.plant(many, many_keys) != uniform.plant(many, many_keys)


def test_uniform_draw_is_less_concrete_than_concreteplant(uniform):
    """On the synthetic captions, the mean concreteness of what changed is lower for the uniform draw."""
    reference = ConcretePlant(num_negatives=3, seed=0)
    reference._nlp = uniform.nlp
    captions = [CAPTIONS[i % 2] for i in range(120)]
    keys = [f"s{i}" for i in range(120)]

    def mean_score(generator) -> float:
        scores = [n.score for negatives in generator.plant(captions, keys) for n in negatives]
        return sum(scores) / len(scores)

    assert mean_score(uniform) < mean_score(reference) - 0.03


def test_pickles_without_the_pipeline(uniform):
    assert uniform._nlp is not None
    blob = pickle.dumps(uniform)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert isinstance(clone, UniformConcretePlant) and clone._nlp is None
    clone._nlp = uniform.nlp
    assert clone.plant(CAPTIONS[:2], ["a", "b"]) == uniform.plant(CAPTIONS[:2], ["a", "b"])
    assert repr(clone).startswith("UniformConcretePlant(")


BAD_INPUTS = [None, b"a dog on a red couch", b"\xff\xfe\x00", "", "   \n", "🐶🐱🚗", 42, "of the and", "x" * 20_000]


def test_bad_captions_never_raise(uniform):
    generator = UniformConcretePlant(seed=3)
    generator._nlp = uniform.nlp
    results = generator.plant(BAD_INPUTS, [str(i) for i in range(len(BAD_INPUTS))])
    assert len(results) == len(BAD_INPUTS)
    assert results[0] == [] and results[3] == [] and results[4] == []
    assert generator.plant([], []) == []
    assert generator.stats["captions"] == len(BAD_INPUTS)
    with pytest.raises(ValueError, match="one key per caption"):
        generator.plant(["a"], ["k1", "k2"])


def test_created_from_openclip_args_and_registered():
    args = argparse.Namespace(hn_num=5, hn_seed=7, hn_kinds="swap_attributes,replace_object", hn_spacy_model=None)
    generator = create_uniform_concreteplant(args)
    assert isinstance(generator, UniformConcretePlant)
    assert (generator.num_negatives, generator.seed) == (5, 7)
    assert generator.kinds == frozenset({"swap_attributes", "replace_object"})
    from slipform_plugin import registry

    assert registry.get_hard_negative_factory("concreteplant-uniform") is create_uniform_concreteplant
    matched = registry.get_hard_negative_factory("concreteplant-uniform-kinds")
    assert isinstance(matched(SimpleNamespace(hn_num=2, hn_seed=0)), KindMatchedUniformConcretePlant)


# ------------------------------------------------------------------------------------- experiment pieces
def test_configs_differ_only_where_they_should():
    configs = build_configs(0.1, 0.05)
    assert set(configs) == {*ALL_CONFIGS, "dk", "o"}
    assert (configs["o"].negatives, configs["o"].hn_flag, configs["o"].flags) == (
        "synthetic-oracle",
        "concreteplant",
        configs["c"].flags,
    )
    assert configs["a"].negatives is None and configs["a"].flags == ("--loss", "clip")
    assert configs["b"].flags == ("--loss", "infonce")
    assert configs["c"].flags == configs["d"].flags
    assert (configs["c"].negatives, configs["d"].negatives) == ("concreteplant", "concreteplant-uniform")
    assert configs["dk"].flags == configs["c"].flags and configs["dk"].negatives == "concreteplant-uniform-kinds"
    assert "--cement-margin-batch" in configs["e1"].flags and configs["e1"].flags[-1] == "0"
    assert configs["e2"].flags[configs["e2"].flags.index("--cement-margin-hard") + 1] == "0"
    # Every Cement configuration runs ungated, with the pair difficulty, lambda 1 and the hard negatives in the
    # hard-negative term only unless the experiment says otherwise; a and b never get a Cement flag.
    cement_flags = (
        "--cement-margin-gate",
        "--cement-hard-weight",
        "--cement-hard-margin-difficulty",
        "--cement-hard-columns",
    )
    for name in ("c", "d", "e1", "e2", "o"):
        flags = configs[name].flags
        assert flags[flags.index("--cement-margin-gate") + 1] == "none", name
        assert flags[flags.index("--cement-hard-weight") + 1] == "1", name
        assert flags[flags.index("--cement-hard-columns") + 1] == "separate", name
        assert "--cement-hard-margin-difficulty" in flags, name
    assert all(flag not in configs[name].flags for name in ("a", "b") for flag in cement_flags)
    gated = build_configs(0.1, 0.05, "hn-accuracy")["c"].flags
    assert gated[gated.index("--cement-margin-gate") + 1] == "hn-accuracy"
    # lambda = 0, the constant margin and the joint columns (the loss's defaults) leave their flags out.
    plain = build_configs(0.1, 0.05, "none", 0.0, hard_margin_difficulty=False, hard_columns="joint")
    for name in ("c", "d", "e1", "e2", "o"):
        assert "--cement-hard-weight" not in plain[name].flags, name
        assert "--cement-hard-margin-difficulty" not in plain[name].flags, name
        assert "--cement-hard-columns" not in plain[name].flags, name
    weighted = build_configs(0.1, 0.05, "hn-accuracy", 1.5)
    for name in ("c", "d", "e1", "e2", "o"):
        flags = weighted[name].flags
        assert flags[flags.index("--cement-hard-weight") + 1] == "1.5", name


def test_cement_settings_reach_settings_with_their_defaults():
    from slipform_plugin.evaluation.experiment import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args([]))
    assert (settings.world, settings.margin_gate, settings.hard_margin_difficulty) == ("pair-relations", "none", True)
    assert (settings.margin_hard, settings.margin_batch, settings.hard_weight) == (0.2, 0.1, 1.0)
    assert settings.hard_columns == "separate"
    session9 = settings_from_args(
        build_parser().parse_args(["--cement-hard-columns", "joint", "--cement-hard-weight", "0.5"])
    )
    assert (session9.hard_columns, session9.hard_weight) == ("joint", 0.5)
    assert build_configs(0.2, 0.1, "none", session9.hard_weight, True, session9.hard_columns)["c"].flags == (
        "--loss", "cement", "--cement-margin-gate", "none", "--cement-hard-weight", "0.5",
        "--cement-hard-margin-difficulty", "--cement-margin-hard", "0.2", "--cement-margin-batch", "0.1",
    )  # fmt: skip
    off = settings_from_args(build_parser().parse_args(["--no-cement-hard-margin-difficulty", "--world", "default"]))
    assert (off.hard_margin_difficulty, off.world) == (False, "default")


def test_margin_gate_flag_reaches_settings_and_is_checked(capsys):
    from slipform_plugin.evaluation.experiment import build_parser, settings_from_args

    assert settings_from_args(build_parser().parse_args([])).margin_gate == "none"
    assert (
        settings_from_args(build_parser().parse_args(["--cement-margin-gate", "hn-accuracy"])).margin_gate
        == "hn-accuracy"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cement-margin-gate", "always"])
    assert "--cement-margin-gate" in capsys.readouterr().err


def test_hard_weight_flag_reaches_settings_and_is_checked():
    from slipform_plugin.evaluation.experiment import build_parser, check_settings, settings_from_args

    assert settings_from_args(build_parser().parse_args([])).hard_weight == 1.0
    assert settings_from_args(build_parser().parse_args(["--cement-hard-weight", "2"])).hard_weight == 2.0
    with pytest.raises(ValueError, match=re.escape("--cement-hard-weight must be a finite number >= 0, got -1.0")):
        check_settings(settings_from_args(build_parser().parse_args(["--cement-hard-weight", "-1"])))
    # The separate columns put the hard negatives in the lambda-weighted term only: lambda 0 would drop them.
    with pytest.raises(ValueError, match=re.escape("--cement-hard-columns separate needs --cement-hard-weight > 0")):
        check_settings(settings_from_args(build_parser().parse_args(["--cement-hard-weight", "0"])))
    check_settings(
        settings_from_args(build_parser().parse_args(["--cement-hard-weight", "0", "--cement-hard-columns", "joint"]))
    )


def test_device_and_precision_reach_the_train_command_and_are_checked(monkeypatch):
    import torch

    from slipform_plugin.evaluation.experiment import (
        build_parser,
        check_settings,
        environment,
        settings_from_args,
        train_command,
    )

    def command(argv: list[str]) -> list[str]:
        settings = settings_from_args(build_parser().parse_args(argv))
        check_settings(settings)
        return train_command(settings, build_configs(0.2, 0.1)["c"], 0, "train-{0..1}.tar", "c-seed0")

    def value(cmd: list[str], flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    default = command([])
    assert (value(default, "--device"), value(default, "--precision")) == ("cpu", "fp32")
    with pytest.raises(ValueError, match=re.escape("--device: expected cpu, cuda or cuda:N, got 'gpu'")):
        command(["--device", "gpu"])
    with pytest.raises(ValueError, match=re.escape("--precision amp needs --device cuda")):
        command(["--precision", "amp"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--precision", "fp8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("--device cuda: torch sees no CUDA device here")):
        command(["--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = command(["--device", "cuda:1", "--precision", "amp_bf16"])
    assert (value(on_gpu, "--device"), value(on_gpu, "--precision")) == ("cuda:1", "amp_bf16")
    # A GPU run's environment names the device, so slipform compare never pairs it with a CPU run.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Test GPU {device}")
    assert "device" not in environment() and "accelerator" not in environment("cpu")
    gpu = environment("cuda:1")
    assert (gpu["device"], gpu["accelerator"]) == ("cuda:1", "Test GPU cuda:1")
    assert {k: v for k, v in gpu.items() if k not in ("device", "accelerator")} == environment()


def test_world_flag_reaches_the_shards(tmp_path):
    from slipform_plugin.evaluation.experiment import build_parser, make_data, settings_from_args

    argv = ["--quick", "--out", str(tmp_path), "--world", "simple", "--train-samples", "8", "--test-samples", "4"]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.world == "simple"
    make_data(settings)
    for split in ("train", "test"):
        info = json.loads((tmp_path / "data" / split / "slipform-synthetic.json").read_text())
        assert info["world"] == "simple" and info["split"] == split
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--world", "huge"])


def test_parse_train_log():
    log = (
        "Train Epoch: 0 [64/128 (50%)] Data (t): 0.1 Batch (t): 1.0, 61.5/s, 61.5/s/gpu LR: 0.001 "
        "Contrastive_loss: 3.5 (3.6) Loss: 3.5 (3.6)\nSlipform: Train Epoch: 0 step 1 Hard-negative accuracy: 0.25\n"
        "Train Epoch: 0 [128/128 (100%)] Data (t): 0.1 Batch (t): 1.0, 63.5/s, 63.5/s/gpu LR: 0.0 "
        "Contrastive_loss: 3.25 (3.4) Loss: 3.25 (3.4)\nSlipform: Train Epoch: 0 step 2 Hard-negative accuracy: 0.5\n"
        "2026-12-07,10:00:00 | INFO | Slipform: Train Epoch: 0 step 2 Hard-negative accuracy by kind: "
        "swap_attributes 0.7500, replace_object 1.0000\n"
    )
    assert parse_train_log(log) == {
        "final_loss": 3.25,
        "final_hn_acc": 0.5,
        "final_hn_acc_by_kind": {"swap_attributes": 0.75, "replace_object": 1.0},
        "samples_per_second": 62.5,
    }
    empty = {"final_loss": None, "final_hn_acc": None, "final_hn_acc_by_kind": {}, "samples_per_second": None}
    assert parse_train_log("") == empty


def test_training_kind_table_counts_only_the_runs_that_logged_kinds():
    """Mean ± sd over the runs with by-kind records; a run reused from before kinds were logged adds none."""
    records = [
        {"config": "a", "seed": 0, "metrics": {}, "final_hn_acc_by_kind": {}},
        {"config": "c", "seed": 0, "metrics": {}, "final_hn_acc_by_kind": {"swap_attributes": 0.5, "other": 1.0}},
        {"config": "c", "seed": 1, "metrics": {}, "final_hn_acc_by_kind": {"swap_attributes": 0.75}},
        {"config": "c", "seed": 2, "metrics": {}},  # an older run.json: no by-kind record
    ]
    summary = aggregate(records, ["a", "c"])
    assert "final_hn_acc_by_kind" not in summary["a"]
    assert summary["c"]["final_hn_acc_by_kind"]["swap_attributes"]["n"] == 2
    assert summary["c"]["final_hn_acc_by_kind"]["swap_attributes"]["mean"] == pytest.approx(0.625)
    table = training_kind_table(summary, build_configs(0.2, 0.1, "none", 1.0, True, "separate"))
    lines = table.splitlines()
    assert lines[0] == "| config | runs | swap attributes | other |"
    assert len(lines) == 3 and lines[2].startswith("| (c) ") and "| 2 | 62.5 ± 17.7 | 100.0 |" in lines[2]
    assert training_kind_table(aggregate(records[:1], ["a"]), {}) == ""


# ------------------------------------------------------------------------------------- end to end
def test_quick_experiment_end_to_end(tmp_path):
    """``slipform experiment --quick`` with the smallest settings: finite numbers for every config, 3 files."""
    out = tmp_path / "quick"
    command = [
        str(Path(sys.executable).with_name("slipform")),
        "experiment",
        "--quick",
        "--out", str(out),
        "--train-samples", "64",
        "--test-samples", "24",
        "--batch-size", "16",
        "--image-size", "48",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    assert set(results["summary"]) == set(ALL_CONFIGS)
    assert {"cpu", "torch", "open_clip_torch"} <= set(results["environment"])
    for name, entry in results["summary"].items():
        for metric in TABLE_METRICS:
            assert math.isfinite(entry[metric]["mean"]) and 0.0 <= entry[metric]["mean"] <= 1.0, (name, metric)
    runs = results["runs"]
    assert {r["config"] for r in runs} == set(ALL_CONFIGS)
    for run in runs:
        assert run["command"][1:3] == ["-m", "open_clip_train.main"]
        assert math.isfinite(run["final_loss"])
        if run["config"] != "a":
            assert math.isfinite(run["final_hn_acc"])
            by_kind = run["final_hn_acc_by_kind"]
            assert by_kind and set(by_kind) <= set(HARD_NEGATIVE_KINDS)
            assert all(0.0 <= value <= 1.0 for value in by_kind.values()), by_kind
        else:
            assert run["final_hn_acc_by_kind"] == {}  # plain CLIP sees no negatives
    assert "final_hn_acc_by_kind" not in results["summary"]["a"] and "final_hn_acc_by_kind" in results["summary"]["c"]
    table = (out / "results.md").read_text()
    assert all(f"({name})" in table for name in ALL_CONFIGS) and "attribute swap" in table
    assert "In training: share of each kind's negatives that their caption beat" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The negative-using runs read the planted shards, and the uniform ablation its own.
    planted = sorted(p.name for p in (out / "data").iterdir() if p.name.startswith("planted-"))
    assert planted == [
        "planted-concreteplant-k3-corpusvocab-seed0",
        "planted-concreteplant-uniform-k3-corpusvocab-seed0",
    ]
    assert set(results["negatives_audit"]) == {"concreteplant-seed0", "concreteplant-uniform-seed0"}
    # With the corpus vocabulary every planted word occurs in the training captions, and ConcretePlant's
    # attribute swaps exchange same-role attributes: exactly the test's binding swaps.
    for audit in results["negatives_audit"].values():
        assert audit and all(entry["in_vocabulary"] == 1.0 for entry in audit.values()), audit
    assert results["negatives_audit"]["concreteplant-seed0"]["swap_attributes"]["binding_swap"] == 1.0
    assert all(run["command"][run["command"].index("--model") + 1] == MODEL for run in runs)
    assert "attribute swap (held-out)" in table and "material" in table  # the second table
    log_c = (out / "runs" / "c-seed0" / "out.log").read_text()
    assert "Slipform: loss=cement" in log_c and "'precomputed': 64" in log_c


def test_oracle_negatives_planted_and_audited(tmp_path):
    """The oracle diagnostic plants the benchmark's own hard captions; the audit finds them all in-domain."""
    from slipform_plugin.evaluation.ablations import SyntheticOracleNegatives, plant_shards
    from slipform_plugin.evaluation.experiment import audit_negatives
    from slipform_plugin.synthetic import write_shards

    summary = write_shards(tmp_path / "train", 12, seed=0, shard_size=6, image_size=32)
    oracle = SyntheticOracleNegatives.from_shards(summary.shards, num_negatives=6, seed=0)
    assert len(oracle.hard_by_key) == 12 and pickle.loads(pickle.dumps(oracle)).num_negatives == 6
    counts = plant_shards(oracle, summary.shards, tmp_path / "planted")
    assert counts["samples"] == 12 and counts["negatives"] == 72
    audit = audit_negatives(tmp_path / "planted")
    assert set(audit) == {"swap_attributes", "swap_objects", "replace_relation", "replace_attribute",
                          "replace_object", "change_count"}  # fmt: skip
    assert all(entry["in_vocabulary"] == 1.0 and entry["n"] == 12 for entry in audit.values())
    assert audit["swap_attributes"]["binding_swap"] == 1.0 and audit["swap_objects"]["binding_swap"] == 1.0
    assert audit["replace_attribute"]["binding_swap"] == 0.0
    # Audited against the simple world, whose captions are all matte and solid, the default world's
    # material and texture words are out of vocabulary.
    assert audit_negatives(tmp_path / "planted", world="simple")["swap_attributes"]["in_vocabulary"] < 1.0
    first = oracle.plant(["x"], ["train000000000"])[0]
    assert first == oracle.plant(["x"], ["train000000000"])[0] and oracle.plant(["x"], ["unknown"]) == [[]]


def test_audit_counts_negatives_that_change_only_unseen_words(tmp_path):
    """In ``pair-relations-unseen`` a negative that changes only an age is true of its image. ConcretePlant ranks
    the ages low and never plants one here; the uniform draw plants them at the rate the candidates hold them,
    and the audit counts them (``unseen_only``), within the attribute kinds only."""
    from slipform_plugin.concreteplant.corpus import corpus_vocabulary
    from slipform_plugin.evaluation.ablations import plant_shards
    from slipform_plugin.evaluation.experiment import audit_negatives
    from slipform_plugin.synthetic import write_shards

    world = "pair-relations-unseen"
    summary = write_shards(tmp_path / "train", 40, seed=0, shard_size=20, image_size=32, world=world)
    captions = [make_item(0, "train", i, 32, world=world).caption for i in range(40)]
    vocabulary = corpus_vocabulary(captions)
    audits = {}
    generators = (
        ("concreteplant", ConcretePlant),
        ("uniform", UniformConcretePlant),
        ("uniform-kinds", KindMatchedUniformConcretePlant),
    )
    for name, generator in generators:
        plant_shards(generator(num_negatives=3, seed=0, vocabulary=vocabulary), summary.shards, tmp_path / name)
        audits[name] = audit_negatives(tmp_path / name, world=world)
    assert all(
        entry["unseen_only"] == 0.0 and entry["in_vocabulary"] == 1.0 for entry in audits["concreteplant"].values()
    )
    uniform = audits["uniform"]
    assert all(entry["in_vocabulary"] == 1.0 for entry in uniform.values())
    assert uniform["replace_attribute"]["unseen_only"] > 0.1 and uniform["swap_attributes"]["unseen_only"] > 0.1
    assert all(uniform[kind]["unseen_only"] == 0.0 for kind in ("replace_relation", "replace_object", "swap_objects"))
    # the kind-matched draw keeps ConcretePlant's kinds, count for count, and draws the ages within them
    matched = audits["uniform-kinds"]
    assert {kind: entry["n"] for kind, entry in matched.items()} == {
        kind: entry["n"] for kind, entry in audits["concreteplant"].items()
    }
    assert matched["replace_attribute"]["unseen_only"] > 0.1 and matched["swap_attributes"]["unseen_only"] > 0.1
    # audited as the world without ages, the age words are out of vocabulary
    assert audit_negatives(tmp_path / "uniform", world="pair-relations")["replace_attribute"]["in_vocabulary"] < 1.0


def test_kind_matched_draw_keeps_concreteplant_kinds_per_caption():
    """Caption by caption: ConcretePlant's kinds in ConcretePlant's number, distinct texts, and a different
    word where a kind offers more than one; deterministic for (seed, key)."""
    captions = [
        "a red cup on a blue table",
        "two small dogs sitting next to a large black cat",
        "a man in a green shirt riding a bicycle down the street",
        "an old wooden bench under a tall tree",
    ]
    keys = [f"k{i}" for i in range(len(captions))]
    concrete = ConcretePlant(num_negatives=3, seed=5).plant(captions, keys)
    matched = KindMatchedUniformConcretePlant(num_negatives=3, seed=5).plant(captions, keys)
    assert matched == KindMatchedUniformConcretePlant(num_negatives=3, seed=5).plant(captions, keys)
    for caption, ours, theirs in zip(captions, matched, concrete, strict=True):
        assert Counter(n.kind for n in ours) == Counter(n.kind for n in theirs), caption
        assert len({n.text for n in ours}) == len(ours) and caption not in {n.text for n in ours}
    assert any([n.text for n in ours] != [n.text for n in theirs] for ours, theirs in zip(matched, concrete))
    assert "KindMatchedUniformConcretePlant(" in repr(KindMatchedUniformConcretePlant())


def test_paired_differences_pair_runs_by_seed():
    from slipform_plugin.evaluation.experiment import paired_differences, paired_table

    def run(config, seed, swap, r1):
        return {
            "config": config,
            "seed": seed,
            "metrics": {"attribute_swap": swap, "attribute_replace": 0.8, "i2t_r1": r1},
        }

    records = [run("a", 0, 0.70, 0.50), run("a", 1, 0.60, 0.40), run("b", 0, 0.75, 0.52), run("b", 1, 0.61, 0.40)]
    records.append(run("c", 1, 0.70, 0.30))  # c has seed 1 only: c - a and c - b pair that seed alone
    pairs = {entry["pair"]: entry for entry in paired_differences(records)}
    assert set(pairs) == {"b - a", "c - a", "c - b"}
    assert pairs["b - a"]["seeds"] == [0, 1]
    assert pairs["b - a"]["attribute_swap"]["per_seed"] == pytest.approx([0.05, 0.01])
    assert pairs["b - a"]["attribute_swap"]["mean"] == pytest.approx(0.03)
    assert pairs["b - a"]["attribute_swap"]["std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert pairs["c - b"]["seeds"] == [1] and pairs["c - b"]["i2t_r1"]["per_seed"] == pytest.approx([-0.10])
    table = paired_table(list(pairs.values()))
    assert "| b - a | hard negatives, no margins | +3.0 ± 2.8 (+5.0, +1.0) |" in table
    assert all("test_sd" not in entry["attribute_swap"] for entry in pairs.values())  # no outcomes recorded
    for record, bits in zip(records, ["1100", "1000", "1110", "1000", "1111"]):
        record["outcomes"] = {"attribute_swap": bits}
    pairs = {entry["pair"]: entry for entry in paired_differences(records)}
    # b - a: seed 0 d = (0, 0, +1, 0), variance 1/4 over 4 items; seed 1 d = 0; the sd averages the variances
    assert pairs["b - a"]["attribute_swap"]["test_sd"] == pytest.approx((0.0625 / 2) ** 0.5)
    assert "test_sd" not in pairs["b - a"]["i2t_r1"]
    assert "[test split ± 17.7]" in paired_table(list(pairs.values()))


def test_single_group_fraction_reaches_the_training_shards_only(tmp_path, capsys):
    """Training items without a reference get no oracle negatives and no binding swaps in the audit."""
    from slipform_plugin.evaluation.ablations import SyntheticOracleNegatives, plant_shards
    from slipform_plugin.evaluation.experiment import audit_negatives, build_parser, make_data, settings_from_args
    from slipform_plugin.synthetic.shards import INFO_FILE

    argv = ["--quick", "--out", str(tmp_path), "--single-group-fraction", "0.5", "--train-samples", "16",
            "--test-samples", "4"]  # fmt: skip
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.single_group_fraction == 0.5
    data = make_data(settings)
    assert json.loads((tmp_path / "data" / "train" / INFO_FILE).read_text())["single_group_fraction"] == 0.5
    assert json.loads((tmp_path / "data" / "test" / INFO_FILE).read_text())["single_group_fraction"] == 0.0
    shards = sorted((tmp_path / "data" / "train").glob("*.tar"))
    oracle = SyntheticOracleNegatives.from_shards(shards, num_negatives=6, seed=0)
    empty = [key for key, hard in oracle.hard_by_key.items() if not hard]
    assert 3 <= len(empty) <= 13 and all(oracle.plant(["x"], [key]) == [[]] for key in empty)
    counts = plant_shards(oracle, shards, tmp_path / "planted")
    assert counts["negatives"] == 6 * (16 - len(empty))
    audit = audit_negatives(tmp_path / "planted")
    assert audit["swap_attributes"]["n"] == 16 - len(empty) and audit["swap_attributes"]["binding_swap"] == 1.0
    # the same settings reuse the shards; another fraction writes them again
    assert make_data(settings)["train"] == data["train"]
    settings.single_group_fraction = 0.0
    make_data(settings)
    assert json.loads((tmp_path / "data" / "train" / INFO_FILE).read_text())["single_group_fraction"] == 0.0
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--single-group-fraction", bad])
        assert "--single-group-fraction" in capsys.readouterr().err


def _readme_commands(prefixes: tuple[str, ...]) -> list[str]:
    """The commands in README.md's code (fenced or indented) that start with one of ``prefixes``; a trailing
    backslash joins the next line; a ``#`` comment is dropped."""
    commands, pending = [], ""
    inside = False
    for line in (Path(__file__).parent.parent / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not (inside or line.startswith("    ")):
            continue
        text = line.strip()
        if pending or text.startswith(prefixes):
            pending = f"{pending} {text.removesuffix(chr(92)).strip()}".strip()
            if not text.endswith(chr(92)):
                commands.append(pending.split(" #")[0])
                pending = ""
    return commands


def test_readme_experiment_and_compare_commands_parse(monkeypatch):
    """Every ``slipform experiment``/``compare`` command README shows is accepted as written by today's flags
    (a default that changes, e.g. the separate columns needing lambda > 0, must not leave a command that fails);
    a ``--device cuda`` command as on a machine with a GPU."""
    import shlex

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    from slipform_plugin.evaluation import compare
    from slipform_plugin.evaluation.experiment import METRICS, build_parser, check_settings, settings_from_args

    experiments = _readme_commands(("slipform experiment",))
    comparisons = _readme_commands(("slipform compare",))
    assert len(experiments) >= 6 and len(comparisons) >= 2, (experiments, comparisons)
    for command in experiments:
        check_settings(settings_from_args(build_parser().parse_args(shlex.split(command)[2:])))
    for command in comparisons:
        args = compare.build_parser().parse_args(shlex.split(command)[2:])
        assert all(compare.parse_side(side) for side in [args.variant, *args.baselines]), command
        assert set(args.metrics.split(",")) <= set(METRICS), command


def test_hn_kind_weights_reach_the_planted_negatives(tmp_path):
    """--hn-kind-weights is checked, names the planted folder, and changes the mix of kinds that is planted."""
    import tarfile

    from slipform_plugin.concreteplant.offline import expand_shards
    from slipform_plugin.evaluation.experiment import (
        build_parser,
        check_settings,
        make_data,
        plant_data,
        settings_from_args,
    )

    def planted_kinds(pattern: str) -> Counter:
        counts: Counter = Counter()
        for shard in expand_shards([pattern]):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".hn.json"):
                        counts.update(record["kind"] for record in json.loads(tar.extractfile(member).read()))
        return counts

    for bad in ("swap_colours=2", "swap_attributes=-1", "swap_attributes"):
        with pytest.raises(ValueError, match="--hn-kind-weights: expected KIND=WEIGHT"):
            check_settings(settings_from_args(build_parser().parse_args(["--hn-kind-weights", bad])))
    argv = ["--quick", "--out", str(tmp_path), "--train-samples", "64", "--test-samples", "4", "--batch-size", "8"]
    plain = settings_from_args(build_parser().parse_args(argv))
    swaps = settings_from_args(build_parser().parse_args([*argv, "--hn-kind-weights", "swap_attributes=1000"]))
    assert (plain.hn_kind_weights, swaps.hn_kind_weights) == (None, "swap_attributes=1000")
    check_settings(swaps)
    train = make_data(plain)["train"]
    kinds = {}
    for settings in (plain, swaps):
        pattern, _ = plant_data(settings, "concreteplant", 0, train)
        kinds[settings.hn_kind_weights] = planted_kinds(pattern)
    assert (
        "-swap_attributes1000-seed0" in pattern
        and "-swap_attributes" not in plant_data(plain, "concreteplant", 0, train)[0]
    )
    share = {key: counts["swap_attributes"] / sum(counts.values()) for key, counts in kinds.items()}
    # A two-object caption has one attribute swap: weighted up, every caption's K = 3 negatives include it.
    assert share["swap_attributes=1000"] == pytest.approx(1 / 3) and share[None] < 0.3, share


def test_hn_score_scale_reaches_the_planted_negatives(tmp_path):
    """--hn-score-scale all names the planted folders and rescores the same negatives, for ConcretePlant and
    its uniform ablation alike: relation changes score below colour changes on the cross-POS scale."""
    import tarfile

    from slipform_plugin.concreteplant.offline import expand_shards
    from slipform_plugin.evaluation.experiment import build_parser, make_data, plant_data, settings_from_args

    def planted(pattern: str) -> list[dict]:
        records = []
        for shard in expand_shards([pattern]):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".hn.json"):
                        records.extend(json.loads(tar.extractfile(member).read()))
        return records

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--hn-score-scale", "global"])
    argv = ["--quick", "--out", str(tmp_path), "--train-samples", "64", "--test-samples", "4", "--batch-size", "8"]
    within = settings_from_args(build_parser().parse_args(argv))
    across = settings_from_args(build_parser().parse_args([*argv, "--hn-score-scale", "all"]))
    assert (within.hn_score_scale, across.hn_score_scale) == ("pos", "all")
    train = make_data(within)["train"]
    for generator in ("concreteplant", "concreteplant-uniform"):
        pattern_pos, _ = plant_data(within, generator, 0, train)
        pattern_all, _ = plant_data(across, generator, 0, train)
        assert "-scoreall-seed0" in pattern_all and "-score" not in pattern_pos
        records = {"pos": planted(pattern_pos), "all": planted(pattern_all)}
        assert [r["text"] for r in records["pos"]] == [r["text"] for r in records["all"]]

        mean = {}
        for scale, kind in itertools.product(("pos", "all"), ("replace_relation", "replace_attribute")):
            scores = [r["score"] for r in records[scale] if r["kind"] == kind]
            assert scores, (generator, scale, kind)
            mean[scale, kind] = sum(scores) / len(scores)
        assert mean["pos", "replace_relation"] > mean["pos", "replace_attribute"], mean
        assert mean["all", "replace_relation"] < mean["all", "replace_attribute"], mean


def test_hn_first_tier_rating_reaches_the_planted_negatives(tmp_path):
    """--hn-first-tier-rating is checked, names the planted folders and raises the share of shape negatives
    ConcretePlant plants in the synthetic world (its shape nouns rank low among caption nouns)."""
    import tarfile

    from slipform_plugin.concreteplant.offline import expand_shards
    from slipform_plugin.evaluation.experiment import build_parser, make_data, plant_data, settings_from_args

    def object_share(pattern: str) -> float:
        counts: Counter = Counter()
        for shard in expand_shards([pattern]):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name.endswith(".hn.json"):
                        counts.update(record["kind"] for record in json.loads(tar.extractfile(member).read()))
        return (counts["replace_object"] + counts["swap_objects"]) / sum(counts.values())

    for bad in ("0", "5.5", "high"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--hn-first-tier-rating", bad])
    argv = ["--quick", "--out", str(tmp_path), "--train-samples", "64", "--test-samples", "4", "--batch-size", "8"]
    plain = settings_from_args(build_parser().parse_args(argv))
    tiered = settings_from_args(build_parser().parse_args([*argv, "--hn-first-tier-rating", "4"]))
    assert (plain.hn_first_tier_rating, tiered.hn_first_tier_rating) == (None, 4.0)
    train = make_data(plain)["train"]
    pattern_plain, _ = plant_data(plain, "concreteplant", 0, train)
    pattern_tiered, _ = plant_data(tiered, "concreteplant", 0, train)
    assert "-tier4-seed0" in pattern_tiered and "-tier" not in pattern_plain
    shares = object_share(pattern_plain), object_share(pattern_tiered)
    assert shares[0] < 0.2 < 0.3 < shares[1], shares


def test_finished_runs_are_reused_only_on_the_same_test_split(tmp_path, monkeypatch):
    """A run scored on another test split is scored again from its kept checkpoint, or else trained again."""
    from slipform_plugin.evaluation import experiment

    trained: list[str] = []
    scored: list[str] = []

    def fake_train(command, **kwargs):
        name = command[command.index("--name") + 1]
        run_dir = Path(command[command.index("--logs") + 1]) / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "epoch_1.pt").write_bytes(b"weights")
        (run_dir / "out.log").write_text("Slipform: loss=cement\n")
        trained.append(name)
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    def fake_evaluate(checkpoint, test_pattern, out_dir, *args):
        assert checkpoint.read_bytes() == b"weights"
        out_dir.mkdir(parents=True)
        (out_dir / "eval.json").write_text("{}")
        scored.append(test_pattern)
        return {"test": test_pattern}

    monkeypatch.setattr(experiment.subprocess, "run", fake_train)
    monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
    monkeypatch.setattr(experiment, "extract_metrics", lambda report: {"attribute_swap": 0.5})
    monkeypatch.setattr(experiment, "extract_outcomes", lambda report: {"attribute_swap": "10"})
    parser = experiment.build_parser()
    config = build_configs(0.2, 0.1)["c"]

    def run(test_samples: int, *flags: str, out: Path = tmp_path) -> dict:
        argv = ["--quick", "--out", str(out), "--test-samples", str(test_samples), *flags]
        settings = experiment.settings_from_args(parser.parse_args(argv))
        train = str(out / "data" / "train" / "shard-{0..1}.tar")  # the folder's own shards, as make_data finds them
        return experiment.run_one(settings, config, 0, train, f"test-{test_samples}.tar")

    first = run(8, "--keep-checkpoints")
    assert first["test_split"]["num_samples"] == 8 and trained == ["c-seed0"] and scored == ["test-8.tar"]
    assert run(8, "--keep-checkpoints")["eval"] == {"test": "test-8.tar"}  # reused: neither trained nor scored
    assert (len(trained), len(scored)) == (1, 1)
    rescored = run(12, "--keep-checkpoints")  # another test split, checkpoint kept: scored, not trained
    assert (len(trained), scored[-1]) == (1, "test-12.tar")
    assert rescored["test_split"]["num_samples"] == 12 and rescored["eval"] == {"test": "test-12.tar"}
    record = json.loads((tmp_path / "runs" / "c-seed0" / "run.json").read_text())
    assert record["test_split"]["num_samples"] == 12 and record["command"] == first["command"]
    run(16)  # scored again and, without --keep-checkpoints, the checkpoint is dropped afterwards
    assert len(trained) == 1 and scored[-1] == "test-16.tar"
    assert not (tmp_path / "runs" / "c-seed0" / "checkpoints").exists()
    run(20, "--keep-checkpoints")  # another split and no checkpoint left: trained again
    assert trained == ["c-seed0", "c-seed0"] and scored[-1] == "test-20.tar"
    # A copy of the experiment folder is the same experiment: its runs are scored again there, not trained.
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    assert run(24, "--keep-checkpoints", out=copy)["test_split"]["num_samples"] == 24
    assert len(trained) == 2 and scored[-1] == "test-24.tar"


def test_metrics_and_outcomes_extracted_from_an_eval_report():
    from slipform_plugin.evaluation.experiment import METRICS, extract_metrics, extract_outcomes

    synthetic = {
        "hard": {"attribute_swap": {"accuracy": 0.5, "outcomes": "10"}, "object_swap": {"accuracy": 1.0}},
        "retrieval": {"image_to_text": {"R@1": 0.25, "outcomes@1": "0001"}},
    }
    report = {"results": {"synthetic": synthetic}}
    metrics = extract_metrics(report)
    assert set(metrics) == set(METRICS)
    assert (metrics["attribute_swap"], metrics["object_swap"], metrics["i2t_r1"]) == (0.5, 1.0, 0.25)
    assert metrics["t2i_r1"] is None and metrics["attribute_replace"] is None  # absent from the report
    # only what the report holds: an eval.json written before outcomes existed gives none
    assert extract_outcomes(report) == {"attribute_swap": "10", "i2t_r1": "0001"}
