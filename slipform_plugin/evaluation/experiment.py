"""``slipform experiment``: the synthetic ablation of ConcretePlant and Cement, with OpenCLIP's own trainer.

Every configuration trains ``slipform-micro-cnn`` (or ``--model``) with the real ``python -m open_clip_train.main``
command on the same training shards, with the same budget (samples, epochs, batch, learning rate) and the same seeds,
then is scored by ``slipform eval --synthetic`` on the same held-out test shards:

====  ==========================================================  =========================================
name  training flags                                               what it shows
====  ==========================================================  =========================================
a     ``--loss clip``                                              OpenCLIP's baseline
b     ``--loss infonce --hn concreteplant``                        the NegCLIP recipe (margins at zero)
c     ``--loss cement --hn concreteplant``                         Slipform (the recommended settings)
d     ``--loss cement --hn concreteplant-uniform``                 concreteness ablation (uniform draw)
dk    c with ``--hn concreteplant-uniform-kinds``                  the same, ConcretePlant's kinds kept (extra)
e1    c with ``--cement-margin-batch 0``                           concreteness margin only
e2    c with ``--cement-margin-hard 0``                            difficulty margin only
====  ==========================================================  =========================================

Every Cement configuration (c, d, e1, e2, o) runs with the same Cement settings (``MARGIN_GATE``,
``HARD_MARGIN_DIFFICULTY``, ``MARGIN_HARD``, ``MARGIN_BATCH``, ``HARD_WEIGHT``, ``HARD_COLUMNS`` below, each
overridable by the experiment's flags): ungated margins, each concreteness margin scaled by its pair's difficulty,
and the hard negatives in the hard-negative term only, at lambda 1 (session 12's recommendation; session 9's c
was ``--cement-hard-columns joint --cement-hard-weight 0.5``). The world is ``pair-relations`` unless ``--world``
says otherwise.

Hard negatives are planted once, offline (``slipform plant``'s writer; negatives seeded by sample key and
``--hn-seed``), so all negative-using configurations of a seed train on exactly the same negatives, and the
training runs do not pay for spaCy. ``--hn concreteplant``/``concreteplant-uniform`` is still passed so the
plugin's stage and the run's ``params.txt`` say which generator made the shards.

Outputs in ``--out``: ``results.json`` (settings, the command of every run, per-run metrics and timings,
mean and standard deviation over seeds), ``results.md`` (the table) and ``results.png`` (the plot).
A finished run (its ``eval.json`` exists) is not trained again, so an interrupted experiment resumes.

Examples::

    slipform experiment --out runs/experiment              # the full experiment (3 seeds x 6 configs)
    slipform experiment --quick --out runs/quick           # a few minutes: proves the pipeline, no claims
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slipform_plugin._argtypes import float_in_range, positive_int
from slipform_plugin.evaluation.compare import format_stat, mean_sd, paired_stat
from slipform_plugin.evaluation.synthetic import PROBED_ATTRIBUTES
from slipform_plugin.hard_negatives import DEFAULT_SCORE_SCALE, HARD_NEGATIVE_KINDS, SCORE_SCALES
from slipform_plugin.recommended import RECOMMENDED_CEMENT
from slipform_plugin.synthetic.scene import WORLDS, get_world

logger = logging.getLogger("slipform")

#: the default model: a small ModifiedResNet image tower (1.4M parameters, 64 px) and a 2-layer text
#: transformer (context 32), 8M parameters in all. The ViT ``slipform-micro`` (16 tokens of 16 px) was the first
#: default; it does not learn shape or relative position at this budget (README, Evidence).
MODEL = "slipform-micro-cnn"
#: ``--precision`` values of ``slipform experiment`` (open_clip_train.main's; the mixed ones need a GPU)
PRECISIONS: tuple[str, ...] = ("fp32", "amp", "amp_bf16")
#: the synthetic world of the experiment: two objects, four relations (README, Evidence: the calibration ladder)
WORLD = "pair-relations"
#: Cement's settings in every Cement configuration unless the experiment's flags say otherwise (README, Evidence:
#: session 9's variants): margins at full strength from the first step (no gate), each concreteness margin scaled
#: by its pair's difficulty, mu_h 0.2, mu_b 0.1, and the hard negatives in the hard-negative term only, at
#: lambda 1 (session 12; sessions 9 to 12 ran c with the hard negatives as joint columns and lambda 0.5): README's
#: recommendation, slipform_plugin.recommended
MARGIN_GATE = "none"
HARD_MARGIN_DIFFICULTY: bool = RECOMMENDED_CEMENT["hard_margin_difficulty"]
MARGIN_HARD: float = RECOMMENDED_CEMENT["margin_hard"]
MARGIN_BATCH: float = RECOMMENDED_CEMENT["margin_batch"]
HARD_WEIGHT: float = RECOMMENDED_CEMENT["hard_weight"]
HARD_COLUMNS: str = RECOMMENDED_CEMENT["hard_columns"]
ALL_CONFIGS: tuple[str, ...] = ("a", "b", "c", "d", "e1", "e2")
#: configurations run only when named in --configs
EXTRA_CONFIGS: tuple[str, ...] = ("dk", "o")
HARD_KINDS: tuple[str, ...] = (
    "attribute_swap",
    "attribute_replace",
    "object_swap",
    "object_replace",
    "relation_swap",
    "count_change",
    "all_kinds",
)
#: metric name -> (path in eval.json's ``results.synthetic``, column title)
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    **{kind: (("hard", kind, "accuracy"), kind.replace("_", " ")) for kind in HARD_KINDS},
    "attribute_swap_heldout": (("hard", "attribute_swap", "accuracy_heldout"), "attribute swap (held-out)"),
    "attribute_swap_seen": (("hard", "attribute_swap", "accuracy_seen"), "attribute swap (seen)"),
    **{
        f"attribute_swap_{attribute}": (("hard", "attribute_swap", "by_attribute", attribute, "accuracy"), attribute)
        for attribute in ("colour", "size", "material", "texture")
    },
    "i2t_r1": (("retrieval", "image_to_text", "R@1"), "I→T R@1"),
    "t2i_r1": (("retrieval", "text_to_image", "R@1"), "T→I R@1"),
    "i2t_r5": (("retrieval", "image_to_text", "R@5"), "I→T R@5"),
    "t2i_r5": (("retrieval", "text_to_image", "R@5"), "T→I R@5"),
    "zs_shape": (("zero_shot", "shape", "accuracy"), "zero-shot shape"),
    "zs_colour": (("zero_shot", "colour", "accuracy"), "zero-shot colour"),
    **{
        f"probe_{attribute}": (("perception", attribute, "accuracy"), f"probe {attribute}")
        for attribute in PROBED_ATTRIBUTES
    },
    "probe_relation_axis": (("layout", "relation_axis", "accuracy"), "probe relation axis (scene)"),
    "probe_relation_by_colour": (("layout", "relation_by_colour", "accuracy"), "probe relation by colour (scene)"),
}
#: where each metric's per-item outcomes sit in the synthetic report (``outcomes`` of the run records)
OUTCOME_PATHS: dict[str, tuple[str, ...]] = {
    **{kind: ("hard", kind, "outcomes") for kind in HARD_KINDS},
    "i2t_r1": ("retrieval", "image_to_text", "outcomes@1"),
    "t2i_r1": ("retrieval", "text_to_image", "outcomes@1"),
}
#: the columns of the Markdown table, in order
TABLE_METRICS: tuple[str, ...] = (
    "attribute_swap",
    "attribute_replace",
    "object_swap",
    "object_replace",
    "relation_swap",
    "count_change",
    "all_kinds",
    "i2t_r1",
    "t2i_r1",
    "zs_shape",
    "zs_colour",
)
#: the columns of the second table: attribute swap split by held-out combinations and by the swapped attribute
SWAP_TABLE_METRICS: tuple[str, ...] = (
    "attribute_swap",
    "attribute_swap_seen",
    "attribute_swap_heldout",
    "attribute_swap_colour",
    "attribute_swap_size",
    "attribute_swap_material",
    "attribute_swap_texture",
)


#: the columns of the third table: the linear perception probe of the image features (no text involved)
PERCEPTION_TABLE_METRICS: tuple[str, ...] = (
    *(f"probe_{attribute}" for attribute in PROBED_ATTRIBUTES),
    "probe_relation_axis",
    "probe_relation_by_colour",
)


@dataclass(frozen=True)
class Config:
    """One configuration of the experiment: its training flags and which planted shards it reads."""

    name: str
    label: str
    flags: tuple[str, ...]
    negatives: str | None  # None, "concreteplant", "concreteplant-uniform[-kinds]" or "synthetic-oracle"
    hn_flag: str | None = None  # the --hn value when it differs from ``negatives`` (the shards carry hn.json)


@dataclass
class Settings:
    """Everything that fixes the experiment's budget and data (recorded in results.json)."""

    out: Path
    seeds: list[int]
    configs: list[str]
    train_samples: int
    test_samples: int
    epochs: int
    batch_size: int
    lr: float
    warmup: int
    image_size: int
    model: str
    data_seed: int
    hn_num: int
    corpus_vocabulary: bool
    margin_hard: float
    margin_batch: float
    margin_gate: str
    threads: int
    quick: bool
    keep_going: bool
    keep_checkpoints: bool
    extra_train_args: list[str] = field(default_factory=list)
    world: str = WORLD
    hard_weight: float = HARD_WEIGHT
    single_group_fraction: float = 0.0
    hard_margin_difficulty: bool = HARD_MARGIN_DIFFICULTY
    hard_columns: str = HARD_COLUMNS
    hn_kind_weights: str | None = None
    hn_score_scale: str = DEFAULT_SCORE_SCALE
    hn_first_tier_rating: float | None = None
    device: str = "cpu"
    precision: str = "fp32"


def build_configs(
    margin_hard: float,
    margin_batch: float,
    margin_gate: str = MARGIN_GATE,
    hard_weight: float = HARD_WEIGHT,
    hard_margin_difficulty: bool = HARD_MARGIN_DIFFICULTY,
    hard_columns: str = HARD_COLUMNS,
) -> dict[str, Config]:
    """The configurations; ``margin_*`` are Cement's mu_h and mu_b for c, d and e (the ones left on),
    ``margin_gate`` its ``--cement-margin-gate``, ``hard_weight`` its ``--cement-hard-weight``,
    ``hard_margin_difficulty`` its ``--cement-hard-margin-difficulty`` and ``hard_columns`` its
    ``--cement-hard-columns`` (every Cement configuration; ``joint``, the loss's default, adds no flag)."""
    mh, mb = f"{margin_hard:g}", f"{margin_batch:g}"
    cement: tuple[str, ...] = ("--loss", "cement", "--cement-margin-gate", margin_gate)
    if hard_weight != 0.0:
        cement += ("--cement-hard-weight", f"{hard_weight:g}")
    if hard_margin_difficulty:
        cement += ("--cement-hard-margin-difficulty",)
    if hard_columns != "joint":
        cement += ("--cement-hard-columns", hard_columns)
    return {
        "a": Config("a", "CLIP (no hard negatives)", ("--loss", "clip"), None),
        "b": Config("b", "InfoNCE + ConcretePlant (NegCLIP)", ("--loss", "infonce"), "concreteplant"),
        "c": Config(
            "c",
            "Cement + ConcretePlant",
            (*cement, "--cement-margin-hard", mh, "--cement-margin-batch", mb),
            "concreteplant",
        ),
        "d": Config(
            "d",
            "Cement + uniform negatives",
            (*cement, "--cement-margin-hard", mh, "--cement-margin-batch", mb),
            "concreteplant-uniform",
        ),
        # Not in the default set: d without d's change of the mix of kinds (ConcretePlant's kinds, uniform words).
        "dk": Config(
            "dk",
            "Cement + uniform words, ConcretePlant's kinds",
            (*cement, "--cement-margin-hard", mh, "--cement-margin-batch", mb),
            "concreteplant-uniform-kinds",
        ),
        "e1": Config(
            "e1",
            "Cement, concreteness margin only",
            (*cement, "--cement-margin-hard", mh, "--cement-margin-batch", "0"),
            "concreteplant",
        ),
        "e2": Config(
            "e2",
            "Cement, difficulty margin only",
            (*cement, "--cement-margin-hard", "0", "--cement-margin-batch", mb),
            "concreteplant",
        ),
        # Diagnostic only (not in the default set): the benchmark's own in-domain hard captions of the training
        # items as negatives, to tell "the negatives do not match the test" from "the budget is too small".
        "o": Config(
            "o",
            "Cement + in-domain negatives (oracle)",
            (*cement, "--cement-margin-hard", mh, "--cement-margin-batch", mb),
            "synthetic-oracle",
            hn_flag="concreteplant",
        ),
    }


# --------------------------------------------------------------------------------------------------- data
def _shards_ready(directory: Path, expected: dict[str, Any]) -> bool:
    from slipform_plugin.synthetic.shards import INFO_FILE

    info_path = directory / INFO_FILE
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    return all(info.get(name) == value for name, value in expected.items())


def split_identity(settings: Settings, split: str) -> dict[str, Any]:
    """What identifies the rendered ``split`` ("train" or "test"): its size, data seed, image size and world.

    A run's ``run.json`` records the test split's identity, so a run is reused only when it was scored on
    the split the experiment renders now."""
    num = settings.train_samples if split == "train" else settings.test_samples
    return {
        "num_samples": num,
        "seed": settings.data_seed,
        "split": split,
        "image_size": settings.image_size,
        "world": settings.world,
    }


def make_data(settings: Settings) -> dict[str, Any]:
    """Write (or reuse) the train and test shards; returns their patterns and the seconds spent."""
    from slipform_plugin.synthetic.shards import write_shards

    data = settings.out / "data"
    started = time.perf_counter()
    result: dict[str, Any] = {}
    for split in ("train", "test"):
        directory = data / split
        expected = split_identity(settings, split)
        num = expected["num_samples"]
        if split == "train":
            expected["single_group_fraction"] = settings.single_group_fraction
        if not _shards_ready(directory, expected):
            shutil.rmtree(directory, ignore_errors=True)
            if split == "train":  # negatives planted into older training shards are stale
                for planted in data.glob("planted-*"):
                    shutil.rmtree(planted, ignore_errors=True)
            shard_size = max(64, math.ceil(num / 8)) if split == "train" else num
            write_shards(
                directory,
                num,
                settings.data_seed,
                shard_size,
                settings.image_size,
                split,
                workers=settings.threads,
                world=settings.world,
                single_group_fraction=settings.single_group_fraction if split == "train" else 0.0,
            )
        pattern = json.loads((directory / "slipform-synthetic.json").read_text())["pattern"]
        result[split] = str(directory / Path(pattern).name)  # where the shards are now (an --out may be copied)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def plant_data(settings: Settings, generator_name: str, seed: int, train_pattern: str) -> tuple[str, float]:
    """Plant ``generator_name``'s negatives (``--hn-seed seed``) into the train shards once; returns the pattern."""
    from slipform_plugin.concreteplant import ConcretePlant, corpus_vocabulary, parse_kind_weights
    from slipform_plugin.concreteplant.offline import expand_shards, is_done
    from slipform_plugin.evaluation.ablations import (
        KindMatchedUniformConcretePlant,
        SyntheticOracleNegatives,
        UniformConcretePlant,
        plant_shards,
    )

    shards = expand_shards([train_pattern])
    vocab_tag = "-corpusvocab" if settings.corpus_vocabulary else ""
    kind_weights = parse_kind_weights(settings.hn_kind_weights)
    weights_tag = "".join(f"-{kind}{weight:g}" for kind, weight in sorted((kind_weights or {}).items()))
    scale_tag = "" if settings.hn_score_scale == DEFAULT_SCORE_SCALE else f"-score{settings.hn_score_scale}"
    tier_tag = "" if settings.hn_first_tier_rating is None else f"-tier{settings.hn_first_tier_rating:g}"
    name = f"planted-{generator_name}-k{settings.hn_num}{vocab_tag}{weights_tag}{scale_tag}{tier_tag}-seed{seed}"
    out_dir = settings.out / "data" / name
    started = time.perf_counter()
    todo = [s for s in shards if not is_done(s, out_dir)]
    if todo:
        # Replacement words come from the training captions themselves (--hn-vocab's corpus vocabulary):
        # a closed world's images can only show its own words.
        vocabulary = corpus_vocabulary(_captions_of(shards)) if settings.corpus_vocabulary else None
        if generator_name == "synthetic-oracle":
            generator: Any = SyntheticOracleNegatives.from_shards(shards, settings.hn_num, seed)
        else:
            plant_class = {
                "concreteplant-uniform": UniformConcretePlant,
                "concreteplant-uniform-kinds": KindMatchedUniformConcretePlant,
            }.get(generator_name, ConcretePlant)
            generator = plant_class(
                num_negatives=settings.hn_num,
                seed=seed,
                vocabulary=vocabulary,
                kind_weights=kind_weights,
                score_scale=settings.hn_score_scale,
                first_tier_rating=settings.hn_first_tier_rating,
            )
        counts = plant_shards(generator, todo, out_dir)
        logger.info("planted %s (seed %d): %s", generator_name, seed, counts)
    pattern = str(out_dir / Path(train_pattern).name)  # same shard names, brace pattern and all
    return pattern, round(time.perf_counter() - started, 2)


def _captions_of(shards: list[Path]) -> list[str]:
    """The ``.txt`` captions of every sample of ``shards``."""
    import tarfile

    captions = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
    return captions


def _binding_swaps(scene: dict[str, Any]) -> set[str]:
    """The captions that exchange one attribute (or the shape) between the scene's two groups, as the test does."""
    from slipform_plugin.synthetic.scene import Group, caption_of

    subject, reference = scene["subject"], scene["reference"]
    swaps: set[str] = set()
    if reference is None:  # a single-group item (--single-group-fraction): nothing to swap
        return swaps
    for attribute in ("size", "colour", "material", "texture", "shape"):
        if subject[attribute] != reference[attribute]:
            new_subject = Group(**{**subject, attribute: reference[attribute]})
            new_reference = Group(**{**reference, attribute: subject[attribute]})
            swaps.add(caption_of(new_subject, scene["relation"], new_reference))
    return swaps


def audit_negatives(planted_dir: Path, world: str = "default") -> dict[str, dict[str, float]]:
    """Per kind of planted negative: count, mean score, and how many are *in-domain*.

    ``in_vocabulary``: every word of the negative occurs in the synthetic captions' vocabulary (otherwise a text
    encoder can reject it from the unknown word alone, without the image); ``binding_swap``: it is exactly a
    caption the test's ``attribute_swap``/``object_swap`` kinds could ask about (one attribute or the shape
    exchanged between the two groups, word order kept); ``unseen_only``: it changes only words the image never
    shows (a world's ``ages``), so it is *true* of the image: a false negative.
    """
    import tarfile

    from slipform_plugin.synthetic.scene import COLOURS, COUNT_WORDS, PLURALS, RELATIONS, SHAPES, SIZES

    spec = get_world(world)
    unseen = set(spec.ages)
    vocabulary = {*COLOURS, *SHAPES, *PLURALS.values(), *SIZES, *spec.materials, *spec.textures, *unseen}
    vocabulary |= {*COUNT_WORDS.values(), "an"} | {word for relation in RELATIONS for word in relation.split()}

    def seen_words(text: str) -> list[str]:
        return [word for word in text.split() if word not in unseen]

    counts: dict[str, dict[str, float]] = {}
    for path in sorted(planted_dir.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for parts in samples.values():
            if "hn.json" not in parts or "json" not in parts:
                continue
            meta = json.loads(parts["json"])
            swaps, seen_caption = _binding_swaps(meta["scene"]), seen_words(meta["caption"])
            for negative in json.loads(parts["hn.json"]):
                entry = counts.setdefault(
                    negative["kind"], {"n": 0, "score": 0.0, "in_vocabulary": 0, "binding_swap": 0, "unseen_only": 0}
                )
                entry["n"] += 1
                entry["score"] += float(negative["score"])
                entry["in_vocabulary"] += set(negative["text"].split()) <= vocabulary
                entry["binding_swap"] += negative["text"] in swaps
                entry["unseen_only"] += seen_words(negative["text"]) == seen_caption
    for entry in counts.values():
        n = max(1, entry["n"])
        entry.update(score=entry["score"] / n, in_vocabulary=entry["in_vocabulary"] / n)
        entry.update(binding_swap=entry["binding_swap"] / n, unseen_only=entry["unseen_only"] / n)
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------ training
def train_command(settings: Settings, config: Config, seed: int, train_pattern: str, name: str) -> list[str]:
    """The exact ``python -m open_clip_train.main ...`` command of one run."""
    steps = max(1, settings.train_samples // settings.batch_size)
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", settings.model,
        "--train-data", train_pattern,
        "--train-num-samples", str(settings.train_samples),
        "--dataset-type", "webdataset",
        "--batch-size", str(settings.batch_size),
        "--epochs", str(settings.epochs),
        "--lr", f"{settings.lr:g}",
        "--warmup", str(settings.warmup),
        "--seed", str(seed),
        "--workers", "1",
        "--device", settings.device,
        "--precision", settings.precision,
        "--log-every-n-steps", str(max(1, steps // 4)),
        "--logs", str(settings.out / "runs"),
        "--name", name,
        "--seed-sample-shuffle",  # the same sample order for every configuration of a seed, and on every rerun
        *config.flags,
    ]  # fmt: skip
    if config.negatives is not None:
        hn_flag = config.hn_flag or config.negatives
        command += ["--hn", hn_flag, "--hn-num", str(settings.hn_num), "--hn-seed", str(seed)]
    return command + list(settings.extra_train_args)


_LOSS_RE = re.compile(r"Contrastive_loss: ([-+0-9.eE]+|nan|inf)")
_HN_ACC_RE = re.compile(r"Hard-negative accuracy: ([-+0-9.eE]+|nan)")
_HN_ACC_BY_KIND_RE = re.compile(r"Hard-negative accuracy by kind: (.*)$", re.MULTILINE)
_RATE_RE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,")


def parse_train_log(text: str) -> dict[str, Any]:
    """Last logged contrastive loss, hard-negative accuracy (overall, and by kind: ``{kind: share}``, empty
    when the loss did not log kinds) and median samples/s from an OpenCLIP ``out.log``."""

    def last(pattern: re.Pattern, default: float | None = None) -> float | None:
        found = pattern.findall(text)
        return float(found[-1]) if found else default

    rates = [float(r) for r in _RATE_RE.findall(text)]
    by_kind_lines = _HN_ACC_BY_KIND_RE.findall(text)
    by_kind = {}
    if by_kind_lines:
        for item in by_kind_lines[-1].split(","):
            kind, _, value = item.strip().rpartition(" ")
            by_kind[kind] = float(value)
    return {
        "final_loss": last(_LOSS_RE),
        "final_hn_acc": last(_HN_ACC_RE),
        "final_hn_acc_by_kind": by_kind,
        "samples_per_second": statistics.median(rates) if rates else None,
    }


def run_one(settings: Settings, config: Config, seed: int, train_pattern: str, test_pattern: str) -> dict[str, Any]:
    """Train and evaluate one (config, seed), or reuse what an earlier experiment left in its folder.

    A finished run with the same training command is reused when it was scored on the same test split
    (``split_identity``); when only the test split differs and its checkpoint was kept
    (``--keep-checkpoints``), the checkpoint is scored again without training; otherwise it is trained anew.
    """
    name = f"{config.name}-seed{seed}"
    run_dir = settings.out / "runs" / name
    eval_dir = run_dir / "eval"
    command = train_command(settings, config, seed, train_pattern, name)
    test_split = split_identity(settings, "test")
    record: dict[str, Any] = {"config": config.name, "seed": seed, "command": command, "test_split": test_split}
    done = run_dir / "run.json"
    checkpoint = run_dir / "checkpoints" / f"epoch_{settings.epochs}.pt"
    if done.is_file():
        previous = json.loads(done.read_text())
        if _portable(previous.get("command", [])) == _portable(command):  # same settings, wherever --out was
            if previous.get("test_split") == test_split and (eval_dir / "eval.json").is_file():
                return previous
            if checkpoint.is_file():  # trained as asked, scored on another test split: score it again
                record = {**previous, **record}
                return _score(settings, record, checkpoint, test_pattern, eval_dir, done)
    shutil.rmtree(run_dir, ignore_errors=True)  # OpenCLIP refuses an existing experiment folder
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(settings.threads)}
    started, cpu_started = time.perf_counter(), _children_cpu_seconds()
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    record["train_seconds"] = round(time.perf_counter() - started, 2)
    # CPU seconds of the run's processes (trainer and its DataLoader worker): on a shared machine this, not
    # the wall time, says what the run would take on an idle one (about cpu_seconds / --threads).
    record["train_cpu_seconds"] = round(_children_cpu_seconds() - cpu_started, 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train-output.txt").write_text(process.stdout + process.stderr)
    if process.returncode != 0:
        raise RuntimeError(
            f"training {name} failed with exit status {process.returncode}; last output:\n"
            f"{(process.stdout + process.stderr)[-3000:]}"
        )
    log_text = (run_dir / "out.log").read_text() if (run_dir / "out.log").is_file() else ""
    if config.name != "a" and "Slipform: loss=" not in log_text:
        raise RuntimeError(f"training {name}: the Slipform plugin was not active (no 'Slipform: loss=' in out.log)")
    record.update(parse_train_log(log_text))
    return _score(settings, record, checkpoint, test_pattern, eval_dir, done)


def _portable(command: list[str]) -> list[str]:
    """A training command without its interpreter and with its ``--out`` folder (the parent of ``--logs``)
    written as ``<out>``, so a run is recognised in a copy of its experiment folder too."""
    if "--logs" not in command[:-1]:
        return command[1:]
    out = str(Path(command[command.index("--logs") + 1]).parent) + os.sep
    return [arg.replace(out, "<out>" + os.sep) for arg in command[1:]]


def _score(
    settings: Settings, record: dict[str, Any], checkpoint: Path, test_pattern: str, eval_dir: Path, done: Path
) -> dict[str, Any]:
    """Evaluate a trained run's checkpoint on the test split, complete its record and write ``run.json``."""
    shutil.rmtree(eval_dir, ignore_errors=True)
    started, cpu_started = time.perf_counter(), _own_cpu_seconds()
    record["eval"] = evaluate(checkpoint, test_pattern, eval_dir, settings.threads, settings.model, settings.device)
    record["eval_seconds"] = round(time.perf_counter() - started, 2)
    record["eval_cpu_seconds"] = round(_own_cpu_seconds() - cpu_started, 2)
    record["metrics"] = extract_metrics(record["eval"])
    record["outcomes"] = extract_outcomes(record["eval"])
    if not settings.keep_checkpoints:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process of this one."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def environment(device: str = "cpu") -> dict[str, str]:
    """What the numbers depend on besides the settings: CPU model, Python, torch, OpenCLIP (in results.json).

    Training on CPU is deterministic on one machine, but another CPU or torch build rounds differently and a
    run of 128 steps can land a few points elsewhere, so ``slipform compare`` pairs only runs of one environment.
    Runs on a GPU (``device`` not ``"cpu"``) add the device and its name, so they never pair with CPU runs.
    """
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_count": str(os.cpu_count()), "python": platform.python_version()}
    with contextlib.suppress(ImportError, AttributeError):
        import torch

        info["torch_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())  # the kernels torch picks
    for package in ("torch", "open_clip_torch"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    if device != "cpu":
        import torch

        info["device"] = device
        info["accelerator"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (its evaluation, planting and data writing)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def evaluate(
    checkpoint: Path, test_pattern: str, out_dir: Path, threads: int, model: str = MODEL, device: str = "cpu"
) -> dict[str, Any]:
    """``slipform eval --synthetic`` in this process (torch is already imported); returns its eval.json."""
    import torch

    from slipform_plugin.evaluation import cli

    torch.set_num_threads(threads)
    argv = ["--model", model, "--pretrained", str(checkpoint), "--synthetic", test_pattern, "--out", str(out_dir)]
    argv += ["--device", device]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(argv)
    if status != 0:
        raise RuntimeError(f"slipform eval {' '.join(argv)} failed with exit status {status}")
    return json.loads((out_dir / "eval.json").read_text())


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``, or None where a level is missing."""
    for part in path:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def extract_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """The experiment's metrics (fractions in [0, 1]) from a ``slipform eval`` report."""
    synthetic = report["results"]["synthetic"]
    values = {name: _lookup(synthetic, path) for name, (path, _) in METRICS.items()}
    return {name: None if value is None else float(value) for name, value in values.items()}


def extract_outcomes(report: dict[str, Any]) -> dict[str, str]:
    """Per-item outcomes (strings of ``1`` and ``0``) of :data:`OUTCOME_PATHS`' metrics in a ``slipform eval``
    report; a metric whose report has none (an older eval.json) is left out."""
    synthetic = report["results"]["synthetic"]
    values = {name: _lookup(synthetic, path) for name, path in OUTCOME_PATHS.items()}
    return {name: value for name, value in values.items() if isinstance(value, str)}


# ------------------------------------------------------------------------------------------------- summary
def aggregate(records: list[dict[str, Any]], configs: list[str]) -> dict[str, dict[str, Any]]:
    """Per config: mean and sample standard deviation over seeds of every metric and of the timings."""
    summary: dict[str, dict[str, Any]] = {}
    for name in configs:
        runs = [r for r in records if r["config"] == name and "metrics" in r]
        if not runs:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        keys = [*METRICS, "final_hn_acc", "train_seconds", "train_cpu_seconds", "samples_per_second"]
        for key in keys:
            values = [r["metrics"].get(key) if key in METRICS else r.get(key) for r in runs]
            values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            if values:
                entry[key] = {**mean_sd(values), "n": len(values)}
        by_kind: dict[str, Any] = {}
        for kind in HARD_NEGATIVE_KINDS:
            values = [r.get("final_hn_acc_by_kind", {}).get(kind) for r in runs]
            values = [float(v) for v in values if v is not None]
            if values:
                by_kind[kind] = {**mean_sd(values), "n": len(values)}
        if by_kind:
            entry["final_hn_acc_by_kind"] = by_kind
        summary[name] = entry
    return summary


def training_kind_table(summary: dict[str, dict[str, Any]], configs: dict[str, Config]) -> str:
    """Markdown table of the in-batch hard-negative accuracy by kind over each run's last logging interval
    (%, mean ± std over seeds); empty when no configuration logged kinds."""
    kinds = [k for k in HARD_NEGATIVE_KINDS if any(k in e.get("final_hn_acc_by_kind", {}) for e in summary.values())]
    if not kinds:
        return ""
    header = ["config", "runs", *(kind.replace("_", " ") for kind in kinds)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary.items():
        by_kind = entry.get("final_hn_acc_by_kind")
        if not by_kind:
            continue
        # the runs that logged kinds (a run reused from before the kinds were logged has none)
        cells = [f"({name}) {configs[name].label}", str(max(stat["n"] for stat in by_kind.values()))]
        cells += [_percent_cell(by_kind.get(kind)) for kind in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: the paired comparisons of the experiment: (minuend, subtrahend, what the difference isolates)
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("b", "a", "hard negatives, no margins"),
    ("c", "a", "Slipform against CLIP"),
    ("d", "a", "uniform draw against CLIP"),
    ("e1", "a", "concreteness margin only"),
    ("e2", "a", "difficulty margin only"),
    ("c", "b", "what Cement adds to InfoNCE"),
    ("c", "d", "what concreteness ranking adds"),
    ("c", "dk", "the ranking within each kind"),
    ("d", "dk", "uniform kinds against ConcretePlant's"),
    ("o", "a", "oracle negatives against CLIP"),
)
#: the metrics of the paired table
PAIRED_METRICS: tuple[str, ...] = ("attribute_swap", "attribute_replace", "i2t_r1")


def paired_differences(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair of :data:`PAIRS` with both configurations run: per-seed differences of :data:`PAIRED_METRICS`.

    Configurations of one seed share the training data, the planted negatives, the initialisation and (with
    ``--seed-sample-shuffle``) the sample order, so differences paired by seed resolve more than the spreads.
    Returns a list of ``{"pair", "meaning", "seeds", metric: {"per_seed", "mean", "std"}}``.
    """
    by_key = {(r["config"], r["seed"]): r["metrics"] for r in records if "metrics" in r}
    outcomes = {(r["config"], r["seed"]): r.get("outcomes", {}) for r in records if "metrics" in r}
    out = []
    for first, second, meaning in PAIRS:
        seeds = sorted(s for (c, s) in by_key if c == first and (second, s) in by_key)
        if not seeds:
            continue
        entry: dict[str, Any] = {"pair": f"{first} - {second}", "meaning": meaning, "seeds": seeds}
        for metric in PAIRED_METRICS:
            diffs = [
                by_key[(first, s)][metric] - by_key[(second, s)][metric]
                for s in seeds
                if by_key[(first, s)].get(metric) is not None and by_key[(second, s)].get(metric) is not None
            ]
            if diffs:
                outcome_pairs = [(outcomes[(first, s)].get(metric), outcomes[(second, s)].get(metric)) for s in seeds]
                entry[metric] = paired_stat(diffs, outcome_pairs)
        out.append(entry)
    return out


def paired_table(pairs: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`paired_differences`: mean ± sd over seeds (per-seed values), percentage points."""
    header = ["pair", "what it isolates", *(METRICS[m][1] for m in PAIRED_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in pairs:
        cells = [entry["pair"], entry["meaning"], *(format_stat(entry.get(m), signed=True) for m in PAIRED_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent_cell(stat: dict[str, Any] | None) -> str:
    """A table cell of a fraction's ``{"mean", "std", "n"}``: ``"81.5 ± 11.0"`` in %, the mean alone for one
    seed (no spread to show), ``"n/a"`` for None."""
    if stat is None:
        return "n/a"
    if stat["n"] == 1:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown_table(
    summary: dict[str, dict[str, Any]], configs: dict[str, Config], metrics: tuple[str, ...] = TABLE_METRICS
) -> str:
    """A results table of ``metrics``: accuracy in %, mean ± std over seeds, and the training CPU seconds."""
    header = ["config", "seeds", *(METRICS[m][1] for m in metrics), "train CPU s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary.items():
        cells = [f"({name}) {configs[name].label}", str(len(entry["seeds"]))]
        cells += [_percent_cell(entry.get(metric)) for metric in metrics]
        stat = entry.get("train_cpu_seconds")
        cells.append("n/a" if stat is None else f"{stat['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    """Grouped bars with standard deviations over seeds; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    metrics = ["attribute_swap", "attribute_replace", "object_swap", "relation_swap", "all_kinds", "i2t_r1", "t2i_r1"]
    names = list(summary)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for index, name in enumerate(names):
        means = [100 * summary[name].get(m, {"mean": math.nan})["mean"] for m in metrics]
        stds = [100 * summary[name].get(m, {"std": 0.0})["std"] for m in metrics]
        xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"({name})")
    ax.set_xticks(range(len(metrics)), [METRICS[m][1] for m in metrics], rotation=15)
    ax.set_ylabel("accuracy / recall (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", linewidth=0.5, linestyle=":")  # chance for a two-way choice
    ax.legend(ncol=len(names), fontsize=8, loc="upper right")
    seeds = max(len(entry["seeds"]) for entry in summary.values()) if summary else 0
    ax.set_title(f"slipform experiment: synthetic test split, mean ± std over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- command line
#: defaults of the full experiment and of ``--quick`` (a flag given explicitly wins over both)
DEFAULTS: dict[str, Any] = {
    "seeds": "0,1,2",
    "train_samples": 8192,
    "test_samples": 500,
    "epochs": 1,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 20,
}
QUICK: dict[str, Any] = {
    "seeds": "0",
    "train_samples": 256,
    "test_samples": 64,
    "epochs": 1,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup": 2,
}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def _config_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    known = (*ALL_CONFIGS, *EXTRA_CONFIGS)
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(known)}, got {text!r}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The ``slipform experiment`` argument parser."""
    from slipform_plugin.losses import HARD_COLUMNS as HARD_COLUMNS_CHOICES  # imports torch: not at module import
    from slipform_plugin.losses import MARGIN_GATES

    p = argparse.ArgumentParser(
        prog="slipform experiment",
        description="Train slipform-micro-cnn with open_clip_train.main under each configuration (a, b, c, d, e1, e2) "
        "and seed, evaluate on the synthetic test split, write results.json, results.md and results.png.",
        allow_abbrev=False,
    )
    p.add_argument("--out", default="runs/experiment", help="output directory (default runs/experiment)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, tiny data (proves the pipeline)")
    p.add_argument("--seeds", type=_int_list, default=None, help=f"training seeds (default {DEFAULTS['seeds']})")
    p.add_argument(
        "--configs",
        type=_config_list,
        default=list(ALL_CONFIGS),
        help="subset of a,b,c,d,e1,e2 (default all), dk (d with ConcretePlant's kinds) and o (oracle diagnostic)",
    )
    p.add_argument("--train-samples", type=positive_int, default=None, help="training samples per epoch")
    p.add_argument("--test-samples", type=positive_int, default=None, help="test items")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run")
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size per run")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    p.add_argument("--image-size", type=positive_int, default=64, help="rendered image side (default 64)")
    p.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default=WORLD,
        help=f"synthetic world of train and test data (default {WORLD}: two objects, four relations; default: the "
        "benchmark of make-shards, with sizes, materials, textures, counts and distractors; simple, pair: "
        "calibration worlds; pair-relations-unseen: its captions also state an age per object that the image never "
        "shows, see make-shards --help)",
    )
    p.add_argument(
        "--single-group-fraction",
        type=_fraction,
        default=0.0,
        help="share of training items that show and caption only their subject group, e.g. 'two small red matte "
        "striped circles' (default 0; the test split is unchanged)",
    )
    p.add_argument(
        "--model",
        default=MODEL,
        help=f"OpenCLIP model config every run trains (default {MODEL}; slipform-micro: the ViT of the first version)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--hn-num", type=positive_int, default=3, help="K, hard negatives per caption (default 3)")
    p.add_argument(
        "--hn-kind-weights",
        default=None,
        metavar="KIND=WEIGHT,...",
        help="ConcretePlant's (and the uniform draw's) weight of each kind when planting, e.g. "
        "swap_attributes=4 (unnamed kinds keep 1; default: all 1); the planted folders are named by it",
    )
    p.add_argument(
        "--hn-score-scale",
        default=DEFAULT_SCORE_SCALE,
        choices=SCORE_SCALES,
        help="scale of the concreteness score each planted negative carries to Cement's margin: pos, within its "
        "part of speech (default); all, among all caption words (ConcretePlant's score_scale); the planted "
        "folders are named by it",
    )
    p.add_argument(
        "--hn-first-tier-rating",
        type=float_in_range(1.0, 5.0),
        default=None,
        metavar="RATING",
        help="ConcretePlant's first_tier_rating when planting: a change whose every side is rated at least RATING "
        "(Brysbaert, 1 to 5) is drawn in the first tier whatever its within-POS percentile (default: off); the "
        "planted folders are named by it",
    )
    p.add_argument(
        "--open-vocabulary",
        action="store_true",
        help="let ConcretePlant draw replacement words from its open vocabulary "
        "(default: only words of the training captions, as --hn-vocab does)",
    )
    p.add_argument(
        "--cement-margin-hard", type=float, default=MARGIN_HARD, help=f"mu_h of c, d, e1 (default {MARGIN_HARD:g})"
    )
    p.add_argument(
        "--cement-margin-batch", type=float, default=MARGIN_BATCH, help=f"mu_b of c, d, e2 (default {MARGIN_BATCH:g})"
    )
    p.add_argument(
        "--cement-margin-gate",
        choices=MARGIN_GATES,
        default=MARGIN_GATE,
        help=f"--cement-margin-gate of every Cement configuration (default {MARGIN_GATE}; hn-accuracy: the "
        "gate of sessions 4 to 8)",
    )
    p.add_argument(
        "--cement-hard-weight",
        type=float,
        default=HARD_WEIGHT,
        help=f"lambda of every Cement configuration (default {HARD_WEIGHT:g})",
    )
    p.add_argument(
        "--cement-hard-margin-difficulty",
        action=argparse.BooleanOptionalAction,
        default=HARD_MARGIN_DIFFICULTY,
        help="--cement-hard-margin-difficulty for every Cement configuration: each concreteness margin scaled "
        "by its pair's difficulty (default on; --no-cement-hard-margin-difficulty: the constant margin)",
    )
    p.add_argument(
        "--cement-hard-columns",
        choices=HARD_COLUMNS_CHOICES,
        default=HARD_COLUMNS,
        help=f"--cement-hard-columns of every Cement configuration (default {HARD_COLUMNS}; joint: session 9's c, "
        "the hard negatives also as extra columns of their image's row)",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads per run (default 2)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where every run trains and is scored: cpu (the default, deterministic per machine), cuda or cuda:N",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="open_clip_train.main --precision of every run (default fp32; amp and amp_bf16 need --device cuda)",
    )
    p.add_argument("--keep-going", action="store_true", help="record a failed run and go on with the others")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every run's checkpoints; a later experiment on the same --out with another test split "
        "(--test-samples) then scores them again instead of training them again",
    )
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for open_clip_train.main (repeat; e.g. --train-arg=--wd --train-arg=0.1)",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Resolve the defaults (full or ``--quick``) under the flags given explicitly."""
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    seeds = pick("seeds")
    return Settings(
        out=Path(args.out).absolute(),
        seeds=_int_list(seeds) if isinstance(seeds, str) else list(seeds),
        configs=list(args.configs),
        train_samples=pick("train_samples"),
        test_samples=pick("test_samples"),
        epochs=pick("epochs"),
        batch_size=pick("batch_size"),
        lr=float(pick("lr")),
        warmup=int(pick("warmup")),
        image_size=args.image_size,
        model=args.model,
        data_seed=args.data_seed,
        hn_num=args.hn_num,
        corpus_vocabulary=not args.open_vocabulary,
        margin_hard=args.cement_margin_hard,
        margin_batch=args.cement_margin_batch,
        margin_gate=args.cement_margin_gate,
        hard_weight=args.cement_hard_weight,
        hard_margin_difficulty=args.cement_hard_margin_difficulty,
        hard_columns=args.cement_hard_columns,
        hn_kind_weights=args.hn_kind_weights,
        hn_score_scale=args.hn_score_scale,
        hn_first_tier_rating=args.hn_first_tier_rating,
        threads=args.threads,
        quick=args.quick,
        keep_going=args.keep_going,
        keep_checkpoints=args.keep_checkpoints,
        extra_train_args=list(args.train_arg),
        world=args.world,
        single_group_fraction=args.single_group_fraction,
        device=args.device,
        precision=args.precision,
    )


def check_settings(settings: Settings) -> None:
    """Raise ``ValueError`` naming the flag for values the runs would reject later."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", settings.device):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {settings.device!r}")
    if settings.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {settings.device}: torch sees no CUDA device here (use --device cpu)")
    if settings.precision != "fp32" and settings.device == "cpu":
        raise ValueError(f"--precision {settings.precision} needs --device cuda; on a CPU the runs use fp32")
    if settings.batch_size > settings.train_samples:
        raise ValueError(
            f"--batch-size must be <= --train-samples, got {settings.batch_size} > {settings.train_samples}"
        )
    if not settings.lr > 0:
        raise ValueError(f"--lr must be > 0, got {settings.lr}")
    if settings.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {settings.warmup}")
    if not (math.isfinite(settings.hard_weight) and settings.hard_weight >= 0):
        raise ValueError(f"--cement-hard-weight must be a finite number >= 0, got {settings.hard_weight}")
    if settings.hn_kind_weights is not None:
        from slipform_plugin.concreteplant import check_kind_weights, parse_kind_weights

        weights = parse_kind_weights(settings.hn_kind_weights) or {}  # raises naming --hn-kind-weights
        try:
            valid = all(math.isfinite(w) for w in check_kind_weights(weights).values())
        except ValueError:  # a key that is not a kind, or a weight below 0
            valid = False
        if not valid:
            raise ValueError(
                f"--hn-kind-weights: expected KIND=WEIGHT with KIND in {', '.join(HARD_NEGATIVE_KINDS)} and "
                f"WEIGHT >= 0, got {settings.hn_kind_weights!r}"
            )
    if settings.hard_columns == "separate" and settings.hard_weight == 0.0:
        raise ValueError(
            "--cement-hard-columns separate needs --cement-hard-weight > 0 (the hard negatives would enter no term)"
        )
    if settings.margin_hard < 0 or settings.margin_batch < 0:
        raise ValueError(
            f"--cement-margin-hard and --cement-margin-batch must be >= 0, got "
            f"{settings.margin_hard} and {settings.margin_batch}"
        )


def run_experiment(settings: Settings) -> dict[str, Any]:
    """Data, planting, every (config, seed) run, aggregation and the three output files."""
    settings.out.mkdir(parents=True, exist_ok=True)
    configs = build_configs(
        settings.margin_hard,
        settings.margin_batch,
        settings.margin_gate,
        settings.hard_weight,
        settings.hard_margin_difficulty,
        settings.hard_columns,
    )
    started, cpu_started = time.perf_counter(), _own_cpu_seconds() + _children_cpu_seconds()
    data = make_data(settings)
    print(f"data: train {data['train']}, test {data['test']} ({data['seconds']} s)", flush=True)
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    plant_seconds: dict[str, float] = {}
    audits: dict[str, dict[str, dict[str, float]]] = {}
    for seed in settings.seeds:
        planted: dict[str, str] = {}
        for name in settings.configs:
            config = configs[name]
            pattern = data["train"]
            if config.negatives is not None:
                if config.negatives not in planted:
                    planted[config.negatives], seconds = plant_data(settings, config.negatives, seed, data["train"])
                    plant_seconds[f"{config.negatives}-seed{seed}"] = seconds
                    planted_dir = Path(planted[config.negatives]).parent
                    audits[f"{config.negatives}-seed{seed}"] = audit_negatives(planted_dir, settings.world)
                pattern = planted[config.negatives]
            print(f"run {name} seed {seed}: {' '.join(config.flags)} ...", flush=True)
            try:
                record = run_one(settings, config, seed, pattern, data["test"])
            except (RuntimeError, OSError, ValueError, KeyError) as error:
                if not settings.keep_going:
                    raise
                failures.append({"config": name, "seed": seed, "error": str(error)[-2000:]})
                print(f"run {name} seed {seed} FAILED: {str(error)[:500]}", flush=True)
                continue
            records.append(record)
            m = record["metrics"]
            print(
                f"run {name} seed {seed}: attribute swap {m['attribute_swap']:.3f}, attribute replace "
                f"{m['attribute_replace']:.3f}, I->T R@1 {m['i2t_r1']:.3f}, T->I R@1 {m['t2i_r1']:.3f} "
                f"(train {record['train_seconds']:.0f} s)",
                flush=True,
            )
    summary = aggregate(records, settings.configs)
    table = markdown_table(summary, configs)
    table += "\nAttribute swap by test items (seen / held-out combinations) and by the swapped attribute:\n\n"
    table += markdown_table(summary, configs, SWAP_TABLE_METRICS)
    if any(metric in entry for entry in summary.values() for metric in PERCEPTION_TABLE_METRICS):
        table += (
            "\nWhat the image tower encodes: linear probe of the subject's image features, and of the whole scene's "
            "for the layout (chance: majority value):\n\n"
        )
        table += markdown_table(summary, configs, PERCEPTION_TABLE_METRICS)
    kind_table = training_kind_table(summary, configs)
    if kind_table:
        table += (
            "\nIn training: share of each kind's negatives that their caption beat over the last logging interval "
            "(the last `Hard-negative accuracy by kind` line of each run's `out.log`):\n\n"
        )
        table += kind_table
    pairs = paired_differences(records)
    if pairs:
        table += "\nDifferences paired by seed (percentage points; mean ± sd over seeds, per-seed values):\n\n"
        table += paired_table(pairs)
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "environment": environment(settings.device),
        "configs": {name: asdict(configs[name]) for name in settings.configs},
        "data": data,
        "plant_seconds": plant_seconds,
        "negatives_audit": audits,
        "runs": [{k: v for k, v in r.items() if k != "eval"} for r in records],
        "failures": failures,
        "summary": summary,
        "paired": pairs,
        "total_seconds": round(time.perf_counter() - started, 1),
        # every CPU second spent (this process, training runs, shard writers): the machine-independent cost
        "total_cpu_seconds": round(_own_cpu_seconds() + _children_cpu_seconds() - cpu_started, 1),
    }
    (settings.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (settings.out / "results.md").write_text(
        "# slipform experiment (synthetic test split; %, mean ± std over seeds)\n\n" + table
    )
    results["plotted"] = plot(summary, settings.out / "results.png")
    print(table, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slipform experiment``: 0 on success, 1 when a run failed, 2 for bad arguments."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    settings = settings_from_args(args)
    try:
        check_settings(settings)
    except ValueError as error:
        print(f"slipform experiment: error: {error}", file=sys.stderr)
        return 2
    try:
        results = run_experiment(settings)
    except RuntimeError as error:
        print(f"slipform experiment: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {settings.out / 'results.json'}, {settings.out / 'results.md'}"
        + (f" and {settings.out / 'results.png'}" if results["plotted"] else "")
        + f" in {results['total_seconds']:.0f} s ({results['total_cpu_seconds']:.0f} CPU s)"
    )
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
