"""``slipform compare``: per-seed differences between configurations of separate ``slipform experiment`` runs.

``slipform experiment`` pairs its own configurations by seed (results.md, "Differences paired by seed"). A
variant is often run later, into its own ``--out`` (for example c with one flag changed), and has to be paired
with the a, b or c of an earlier run. This command does that from the runs' ``results.json`` files:

    slipform compare runs/pr-sep05:c runs/pr-c6:c runs/final,runs/confirm:a

The first argument is the variant; each further one is a baseline. An argument is ``DIR[,DIR...][:CONFIG]``
(CONFIG defaults to ``c``): several directories are read together, so seeds 0 to 2 of one run and 3 to 5 of
another form one baseline. Pairs are made on the seeds both sides have. The runs must share the settings that
fix data and budget (samples, epochs, batch, learning rate, world, model, data seed, K ...) and the environment
(CPU, torch, OpenCLIP; runs written before results.json recorded it are taken as they are): a difference is
refused unless ``--allow-different-settings`` is given, because a paired difference across budgets means
nothing, and the same command lands a few points elsewhere on another CPU. Prints a Markdown table
(percentage points: mean ± sample sd over the paired seeds, then the per-seed values) and, with
``--json FILE``, writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: settings of ``results.json`` that fix the data and the budget: two runs are comparable only when these agree
BUDGET_SETTINGS: tuple[str, ...] = (
    "train_samples",
    "test_samples",
    "epochs",
    "batch_size",
    "lr",
    "warmup",
    "image_size",
    "model",
    "data_seed",
    "hn_num",
    "corpus_vocabulary",
    "world",
    "single_group_fraction",
    "precision",
)
#: the value of a budget setting in runs written before results.json recorded it
_BUDGET_DEFAULTS: dict[str, Any] = {"precision": "fp32"}
#: metrics compared unless ``--metrics`` says otherwise
DEFAULT_METRICS: tuple[str, ...] = ("attribute_swap", "attribute_replace", "i2t_r1", "t2i_r1")


@dataclass
class Side:
    """One side of a comparison: a configuration's per-seed metrics gathered from one or more runs."""

    label: str
    per_seed: dict[int, dict[str, float]]
    settings: dict[str, Any]
    environment: dict[str, Any] | None  # results.json's "environment" (None for runs written before it existed)
    #: per seed, the runs' per-item outcomes by metric (``"outcomes"`` of run records; empty for older runs)
    outcomes: dict[int, dict[str, str]] = field(default_factory=dict)


def parse_side(text: str) -> tuple[list[Path], str]:
    """``"DIR[,DIR...][:CONFIG]"`` -> (directories, config); CONFIG defaults to ``"c"``."""
    directories, _, config = text.rpartition(":") if ":" in text else (text, "", "c")
    if not directories or not config:
        raise ValueError(f"expected DIR[,DIR...][:CONFIG], got {text!r}")
    return [Path(d) for d in directories.split(",") if d], config


def load_side(text: str) -> Side:
    """Read the ``results.json`` of every directory of ``text`` and collect ``config``'s runs by seed.

    Raises ``ValueError`` when a file is missing, the config has no run there, a seed appears twice, or the
    directories disagree on a budget setting.
    """
    directories, config = parse_side(text)
    per_seed: dict[int, dict[str, float]] = {}
    outcomes: dict[int, dict[str, str]] = {}
    settings: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    for directory in directories:
        path = directory / "results.json"
        if not path.is_file():
            raise ValueError(f"{text}: no results.json in {directory} (run slipform experiment --out {directory})")
        results = json.loads(path.read_text())
        runs = [r for r in results.get("runs", []) if r.get("config") == config and "metrics" in r]
        if not runs:
            found = sorted({r.get("config") for r in results.get("runs", [])})
            raise ValueError(f"{text}: {path} has no finished run of config {config!r} (it has {found})")
        recorded = results.get("settings", {})
        budget = {key: recorded.get(key, _BUDGET_DEFAULTS.get(key)) for key in BUDGET_SETTINGS}
        if differences := _mismatch(settings, budget):
            raise ValueError(f"{text}: the directories differ in {differences}")
        settings = budget
        run_environment = results.get("environment")
        if differences := _mismatch(environment, run_environment):
            raise ValueError(f"{text}: the directories ran in different environments: {differences}")
        environment = environment or run_environment
        for run in runs:
            seed = int(run["seed"])
            if seed in per_seed:
                raise ValueError(f"{text}: seed {seed} of config {config!r} appears in more than one directory")
            per_seed[seed] = {k: float(v) for k, v in run["metrics"].items() if isinstance(v, (int, float))}
            outcomes[seed] = {k: v for k, v in run.get("outcomes", {}).items() if isinstance(v, str)}
    assert settings is not None
    return Side(label=text, per_seed=per_seed, settings=settings, environment=environment, outcomes=outcomes)


def _mismatch(first: dict[str, Any] | None, second: dict[str, Any] | None) -> str:
    """The keys where two known dicts differ, as ``key (a vs b), ...``; empty when equal or either is unknown."""
    if first is None or second is None or first == second:
        return ""
    keys = [*first, *(k for k in second if k not in first)]
    return ", ".join(f"{k} ({first.get(k)!r} vs {second.get(k)!r})" for k in keys if first.get(k) != second.get(k))


def mean_sd(values: list[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of ``values``: the mean and the sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def test_split_sd(outcome_pairs: list[tuple[str | None, str | None]]) -> float | None:
    """How much a paired difference of accuracies moves from the finite test split alone (a fraction).

    ``outcome_pairs`` holds, per seed, the two runs' per-item outcomes on one test split (strings of ``1`` and
    ``0``, :func:`slipform_plugin.evaluation.synthetic.outcome_bits`). With ``d_i = x_i - y_i`` over the ``n``
    items, one seed's difference ``mean(d)`` has sampling variance ``var(d) / n`` under resampling of the
    items; the result is the square root of that variance averaged over the seeds: the part of the spread
    over seeds that a larger test split would remove. None when a seed lacks outcomes, the two runs were
    scored on splits of different sizes, or a split has fewer than two items.
    """
    variances = []
    for first, second in outcome_pairs:
        if not first or not second or len(first) != len(second) or len(first) < 2:
            return None
        d = [int(a) - int(b) for a, b in zip(first, second)]
        variances.append(statistics.variance(d) / len(d))
    return math.sqrt(statistics.fmean(variances)) if variances else None


def paired_stat(diffs: list[float], outcome_pairs: list[tuple[str | None, str | None]]) -> dict[str, Any]:
    """``{"per_seed", "mean", "std"}`` of per-seed differences, with ``"test_sd"`` (:func:`test_split_sd` of the
    seeds' ``outcome_pairs``) where every seed has outcomes for both sides."""
    stat: dict[str, Any] = {"per_seed": diffs, **mean_sd(diffs)}
    if (sd := test_split_sd(outcome_pairs)) is not None:
        stat["test_sd"] = sd
    return stat


def compare(variant: Side, baselines: list[Side], metrics: list[str], allow_different_settings: bool = False) -> dict:
    """Per baseline: the variant's per-seed differences (fractions) of each metric, with mean and sd.

    Returns ``{"variant": {...}, "baselines": [{"label", "seeds", metric: {"per_seed", "mean", "std"}}]}``;
    raises ``ValueError`` when a baseline shares no seed with the variant or differs in a budget setting.
    """
    out: dict[str, Any] = {"variant": _summary(variant, metrics), "baselines": []}
    for baseline in baselines:
        if not allow_different_settings and (differences := _mismatch(variant.settings, baseline.settings)):
            raise ValueError(
                f"{baseline.label} and {variant.label} differ in {differences}; "
                "pass --allow-different-settings to pair them anyway"
            )
        if not allow_different_settings and (differences := _mismatch(variant.environment, baseline.environment)):
            raise ValueError(
                f"{baseline.label} and {variant.label} ran in different environments ({differences}): the same "
                "command lands a few points elsewhere on another CPU or torch build; pass --allow-different-settings "
                "to pair them anyway"
            )
        seeds = sorted(set(variant.per_seed) & set(baseline.per_seed))
        if not seeds:
            raise ValueError(
                f"{baseline.label} shares no seed with {variant.label} "
                f"(seeds {sorted(baseline.per_seed)} vs {sorted(variant.per_seed)})"
            )
        entry: dict[str, Any] = {"label": baseline.label, "seeds": seeds, **_summary(baseline, metrics, seeds)}
        for metric in metrics:
            pairs = [(variant.per_seed[s].get(metric), baseline.per_seed[s].get(metric)) for s in seeds]
            diffs = [v - b for v, b in pairs if v is not None and b is not None]
            if diffs:
                outcome_pairs = [
                    (variant.outcomes.get(s, {}).get(metric), baseline.outcomes.get(s, {}).get(metric)) for s in seeds
                ]
                entry[metric] = paired_stat(diffs, outcome_pairs)
        out["baselines"].append(entry)
    return out


def _summary(side: Side, metrics: list[str], seeds: list[int] | None = None) -> dict[str, Any]:
    seeds = sorted(side.per_seed) if seeds is None else seeds
    summary: dict[str, Any] = {"label": side.label, "seeds": seeds, "values": {}}
    for metric in metrics:
        values = [side.per_seed[s][metric] for s in seeds if metric in side.per_seed[s]]
        if values:
            summary["values"][metric] = {"per_seed": values, **mean_sd(values)}
    return summary


def format_stat(stat: dict[str, Any] | None, signed: bool) -> str:
    """``{"per_seed", "mean", "std"}`` (fractions) as ``mean ± sd (seed, seed, ...)`` in points; "n/a" for None.

    With a ``"test_sd"`` (:func:`test_split_sd`) it is appended as ``[test split ± x]``."""
    if stat is None:
        return "n/a"
    sign = "+" if signed else ""
    per_seed = ", ".join(f"{100 * v:{sign}.1f}" for v in stat["per_seed"])
    text = f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f} ({per_seed})"
    if stat.get("test_sd") is not None:
        text += f" [test split ± {100 * stat['test_sd']:.1f}]"
    return text


def markdown(result: dict[str, Any], metrics: list[str]) -> str:
    """The comparison as a Markdown table: the variant's values, then its difference from each baseline."""
    from slipform_plugin.evaluation.experiment import METRICS

    titles = [METRICS[m][1] if m in METRICS else m for m in metrics]
    lines = ["| | seeds | " + " | ".join(titles) + " |", "|" + "---|" * (len(metrics) + 2)]
    variant = result["variant"]
    seeds = ", ".join(map(str, variant["seeds"]))
    cells = [format_stat(variant["values"].get(m), signed=False) for m in metrics]
    lines.append(f"| {variant['label']} | {seeds} | " + " | ".join(cells) + " |")
    for entry in result["baselines"]:
        seeds = ", ".join(map(str, entry["seeds"]))
        cells = [format_stat(entry.get(m), signed=True) for m in metrics]
        lines.append(f"| minus {entry['label']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slipform compare",
        description="Pair a configuration of one slipform experiment run with configurations of others, seed by "
        "seed: DIR[,DIR...][:CONFIG] (CONFIG defaults to c); the first is the variant, the rest baselines.",
    )
    p.add_argument("variant", help="DIR[,DIR...][:CONFIG] of the variant")
    p.add_argument("baselines", nargs="+", help="DIR[,DIR...][:CONFIG] of each baseline")
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated metric names of results.json (default {','.join(DEFAULT_METRICS)})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--allow-different-settings",
        action="store_true",
        help="pair runs whose data or budget settings or environments differ (the table then says less)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slipform compare``: 0 on success, 2 for bad arguments or runs that cannot be paired."""
    args = build_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        print("slipform compare: error: --metrics: expected at least one metric name", file=sys.stderr)
        return 2
    try:
        variant = load_side(args.variant)
        baselines = [load_side(text) for text in args.baselines]
        known = set().union(*(m for side in (variant, *baselines) for m in side.per_seed.values()))
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ValueError(f"--metrics: {unknown} not in the runs' metrics (they have {sorted(known)})")
        result = compare(variant, baselines, metrics, args.allow_different_settings)
    except ValueError as error:
        print(f"slipform compare: error: {error}", file=sys.stderr)
        return 2
    print(markdown(result, metrics), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
