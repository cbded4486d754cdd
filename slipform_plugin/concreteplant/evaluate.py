"""``slipform eval-plant``: ConcretePlant's quality report on SugarCrepe's captions.

SugarCrepe (Hsieh et al. 2023, MIT) pairs COCO val2017 captions with one negative each. The report gives:

- coverage: the share of distinct positive captions with at least one, and with K distinct, negatives;
- the distribution of kinds over the sampled negatives;
- the mean within-POS concreteness percentile of what the sampled negatives change (their ``score``), against a
  baseline that changes one random rated word of each caption (same POS ranking);
- swap recall: over the ``swap_att``/``swap_obj`` pairs whose negative is a pure permutation of the caption's
  words, the share whose negative is among ConcretePlant's candidates (compared on lowercased words);
- replace target recall: over the ``replace_obj``/``replace_att``/``replace_rel`` pairs that differ in one
  word, the share where that word lies inside the span of a ConcretePlant candidate of the matching kind.

With ``--synthetic N`` it audits N synthetic training captions instead (:func:`audit_synthetic`): the share of
``swap_attributes`` negatives that are exact binding swaps, and of all negatives that are in-vocabulary, without
and with the corpus vocabulary of those captions.

Usage::

    slipform eval-plant --sugarcrepe-dir ../shared/data/sugarcrepe [--limit N] [--json OUT] [--vocab FILE]
    slipform eval-plant --synthetic 2000 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

from slipform_plugin._argtypes import float_in_range
from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS

SWAP_FILES = {"swap_att": "swap_attributes", "swap_obj": "swap_objects"}
REPLACE_FILES = {"replace_obj": "replace_object", "replace_att": "replace_attribute", "replace_rel": "replace_relation"}
ALL_FILES = ("add_att", "add_obj", *REPLACE_FILES, *SWAP_FILES)
TARGETS = {
    "coverage_1": 0.99,
    "coverage_k": 0.95,
    "max_kind_share": 0.50,
    "mean_percentile": 0.70,
    "swap_recall": 0.80,
    "replace_obj": 0.90,
    "replace_att": 0.85,
    "replace_rel": 0.70,
}
_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def load_sugarcrepe(directory: str | Path, limit: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """``{file stem: [(caption, negative_caption), ...]}`` for the files present (first ``limit`` of each)."""
    directory = Path(directory)
    out = {}
    for stem in ALL_FILES:
        path = directory / f"{stem}.json"
        if not path.exists():
            continue
        records = json.loads(path.read_text())
        pairs = [(str(r["caption"]).strip(), str(r["negative_caption"]).strip()) for r in records.values()]
        out[stem] = pairs[:limit] if limit else pairs
    if not out:
        raise FileNotFoundError(f"--sugarcrepe-dir: expected SugarCrepe's *.json files in {directory}, found none")
    return out


def _one_word_change(caption: str, negative: str) -> tuple[int, int] | None:
    """Character span of the one word that differs (same word count, one position), else None."""
    pos_matches = list(_WORD.finditer(caption))
    neg_words = _words(negative)
    if len(pos_matches) != len(neg_words):
        return None
    diffs = [i for i, m in enumerate(pos_matches) if m.group().lower() != neg_words[i]]
    if len(diffs) != 1:
        return None
    match = pos_matches[diffs[0]]
    return match.start(), match.end()


def evaluate(plant, data: dict[str, list[tuple[str, str]]], seed: int = 0) -> dict:
    """All figures of the report as a dict (see the module docstring)."""
    from slipform_plugin.concreteplant import lexicon, parsing

    captions = sorted({caption for pairs in data.values() for caption, _ in pairs})
    started = time.perf_counter()
    planted = plant.plant(captions, captions)
    plant_seconds = time.perf_counter() - started
    k = plant.num_negatives
    kinds = Counter(n.kind for negatives in planted for n in negatives)
    total = sum(kinds.values())
    scores = [n.score for negatives in planted for n in negatives]

    rng = random.Random(seed)
    baseline = []
    for toks in parsing.parse(plant.nlp, captions):
        rated = [
            lexicon.percentile(rating, t.pos)
            for t in toks
            if t.pos in lexicon.RANKED_POS and (rating := lexicon.lookup(t.text, t.lemma)) is not None
        ]
        if rated:
            baseline.append(rated[rng.randrange(len(rated))])

    candidates = dict(zip(captions, plant.candidates_batch(captions, captions), strict=True))
    report: dict = {
        "captions": len(captions),
        "k": k,
        "plant_seconds": round(plant_seconds, 2),
        "coverage_1": sum(bool(n) for n in planted) / len(captions),
        "coverage_k": sum(len({x.text for x in n}) >= k for n in planted) / len(captions),
        "kind_shares": {kind: kinds[kind] / total if total else 0.0 for kind in HARD_NEGATIVE_KINDS},
        "kind_mean_percentile": {
            kind: sum(n.score for ns in planted for n in ns if n.kind == kind) / kinds[kind]
            for kind in HARD_NEGATIVE_KINDS
            if kinds[kind]
        },
        "mean_percentile": sum(scores) / len(scores) if scores else 0.0,
        "baseline_percentile": sum(baseline) / len(baseline) if baseline else 0.0,
        "mean_candidates": sum(len(c) for c in candidates.values()) / len(captions),
        "recall": {},
    }
    report["max_kind_share"] = max(report["kind_shares"].values())

    swap_hits = swap_total = 0
    for stem, kind in SWAP_FILES.items():
        hits = n = 0
        for caption, negative in data.get(stem, []):
            if sorted(_words(caption)) != sorted(_words(negative)) or _words(caption) == _words(negative):
                continue
            n += 1
            texts = {tuple(_words(c.text)) for c in candidates[caption] if c.kind == kind}
            hits += tuple(_words(negative)) in texts
        report["recall"][stem] = {"recall": hits / n if n else None, "pairs": n, "of": len(data.get(stem, []))}
        swap_hits, swap_total = swap_hits + hits, swap_total + n
    report["recall"]["swap"] = {"recall": swap_hits / swap_total if swap_total else None, "pairs": swap_total}

    for stem, kind in REPLACE_FILES.items():
        hits = n = 0
        for caption, negative in data.get(stem, []):
            changed = _one_word_change(caption, negative)
            if changed is None:
                continue
            n += 1
            start, end = changed
            hits += any(c.kind == kind and c.span[0] <= start and end <= c.span[1] for c in candidates[caption])
        report["recall"][stem] = {"recall": hits / n if n else None, "pairs": n, "of": len(data.get(stem, []))}
    return report


def synthetic_audit_items(num_captions: int = 2000, seed: int = 0, split: str = "train") -> list[dict]:
    """``num_captions`` synthetic captions with their key and binding swaps (scene attributes exchanged).

    Each item is ``{"key", "caption", "binding_swaps"}``; ``binding_swaps`` holds the captions that exchange one
    attribute (size, colour, material, texture) or the shape between the two described groups, word order kept:
    what the synthetic test's ``attribute_swap``/``object_swap`` kinds ask about.
    """
    import dataclasses

    from slipform_plugin.synthetic import make_item
    from slipform_plugin.synthetic.scene import caption_of

    items = []
    for index in range(num_captions):
        item = make_item(seed=seed, split=split, index=index, image_size=32)
        subject, reference = item.scene.subject, item.scene.reference
        swaps = set()
        for attribute in ("size", "colour", "material", "texture", "shape"):
            mine, theirs = getattr(subject, attribute), getattr(reference, attribute)
            if mine != theirs:
                swaps.add(
                    caption_of(
                        dataclasses.replace(subject, **{attribute: theirs}),
                        item.scene.relation,
                        dataclasses.replace(reference, **{attribute: mine}),
                    )
                )
        items.append({"key": item.key, "caption": item.caption, "binding_swaps": swaps})
    return items


def audit_synthetic(plant, items: list[dict]) -> dict:
    """Caption-level audit of a generator's negatives on synthetic captions (:func:`synthetic_audit_items`).

    Returns ``{"captions", "negatives", "in_vocabulary", "binding_swap_of_swap_attributes", "kinds": {kind:
    {"n", "in_vocabulary", "binding_swap"}}}`` (shares in [0, 1]); a negative is *in-vocabulary* when every word
    of it occurs in the audited captions, a *binding swap* when it is exactly one of its caption's binding swaps.
    """
    from slipform_plugin.concreteplant.corpus import corpus_vocabulary, words

    captions = [item["caption"] for item in items]
    vocabulary = corpus_vocabulary(captions)
    planted = plant.plant(captions, [item["key"] for item in items])
    kinds: dict[str, dict[str, float]] = {}
    for item, negatives in zip(items, planted, strict=True):
        for negative in negatives:
            entry = kinds.setdefault(negative.kind, {"n": 0, "in_vocabulary": 0, "binding_swap": 0})
            entry["n"] += 1
            entry["in_vocabulary"] += set(words(negative.text)) <= vocabulary
            entry["binding_swap"] += negative.text in item["binding_swaps"]
    total = sum(entry["n"] for entry in kinds.values())
    in_vocabulary = sum(entry["in_vocabulary"] for entry in kinds.values())
    for entry in kinds.values():
        entry["in_vocabulary"] /= entry["n"]
        entry["binding_swap"] /= entry["n"]
    swaps = kinds.get("swap_attributes", {})
    return {
        "captions": len(items),
        "negatives": total,
        "in_vocabulary": in_vocabulary / total if total else 0.0,
        "binding_swap_of_swap_attributes": swaps.get("binding_swap", 0.0),
        "kinds": dict(sorted(kinds.items())),
    }


def format_synthetic(audits: dict[str, dict]) -> str:
    """The audits of :func:`audit_synthetic` side by side, one line per configuration and one per kind."""
    lines = []
    for name, audit in audits.items():
        lines.append(
            f"{name}: {audit['captions']} synthetic captions, {audit['negatives']} negatives; in-vocabulary "
            f"{audit['in_vocabulary']:.3f}; swap_attributes that are binding swaps "
            f"{audit['binding_swap_of_swap_attributes']:.3f}"
        )
        lines += [
            f"  {kind:<18} n={entry['n']:<5} in-vocabulary {entry['in_vocabulary']:.3f}  "
            f"binding swap {entry['binding_swap']:.3f}"
            for kind, entry in audit["kinds"].items()
        ]
    return "\n".join(lines)


def _changed_percentiles(toks, caption_words: list[str], negative: str) -> list[float] | None:
    """Within-POS percentiles of the caption words a negative changed (position-wise diff of equal-length word
    lists); None when the word counts differ."""
    from slipform_plugin.concreteplant import lexicon

    words = [t for t in toks if _WORD.fullmatch(t.text)]
    negative_words = _words(negative)
    if len(words) != len(caption_words) or len(negative_words) != len(caption_words):
        return None
    out = []
    for tok, before, after in zip(words, caption_words, negative_words, strict=True):
        if before != after and tok.pos in lexicon.RANKED_POS:
            rating = lexicon.lookup(tok.text, tok.lemma)
            if rating is not None:
                out.append(lexicon.percentile(rating, tok.pos))
    return out


def compare_negclip(plant, tsv: str | Path, limit: int | None = None) -> dict:
    """ConcretePlant beside NegCLIP's own negatives on NegCLIP's validation captions (same diff-based measure)."""
    import ast
    import csv

    from slipform_plugin.concreteplant import parsing

    rows = []
    with open(tsv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            try:
                negatives = [str(n) for n in ast.literal_eval(row["neg_caption"])]
            except (ValueError, SyntaxError):
                negatives = []
            rows.append((row["title"].strip(), negatives))
    rows = rows[:limit] if limit else rows
    captions = [caption for caption, _ in rows]
    planted = plant.plant(captions, captions)
    candidates = plant.candidates_batch(captions, captions)
    parsed = parsing.parse(plant.nlp, captions)
    figures = {}
    for name, negatives_of in (
        ("negclip", [n for _, n in rows]),
        ("concreteplant", [[x.text for x in p] for p in planted]),
    ):
        changed, measured, total, same_as_caption = [], 0, 0, 0
        for caption, toks, negatives in zip(captions, parsed, negatives_of, strict=True):
            caption_words = _words(caption)
            for negative in negatives:
                total += 1
                same_as_caption += _words(negative) == caption_words
                values = _changed_percentiles(toks, caption_words, negative)
                if values:
                    measured += 1
                    changed.extend(values)
        figures[name] = {
            "negatives_per_caption": total / len(captions),
            "equal_to_caption": same_as_caption,
            "mean_changed_percentile": sum(changed) / len(changed) if changed else 0.0,
            "negatives_measured": measured,
        }
    in_candidates = sum(
        tuple(_words(n)) in {tuple(_words(c.text)) for c in cands}
        for (_, negatives), cands in zip(rows, candidates, strict=True)
        for n in negatives
    )
    figures["negclip_in_concreteplant_candidates"] = in_candidates / max(1, sum(len(n) for _, n in rows))
    figures["captions"] = len(captions)
    return figures


def format_negclip(figures: dict) -> str:
    lines = [f"NegCLIP validation captions: {figures['captions']} (same diff-based measure for both generators)"]
    for name in ("negclip", "concreteplant"):
        f = figures[name]
        lines.append(
            f"  {name:<14} {f['negatives_per_caption']:.2f} negatives/caption, changed-word within-POS percentile "
            f"{f['mean_changed_percentile']:.3f} (over {f['negatives_measured']} equal-length negatives), "
            f"{f['equal_to_caption']} equal to their caption"
        )
    share = figures["negclip_in_concreteplant_candidates"]
    lines.append(f"  NegCLIP negatives found among ConcretePlant's candidates: {share:.3f}")
    return "\n".join(lines)


def _status(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "BELOW TARGET"


def format_report(report: dict) -> str:
    lines = [
        f"ConcretePlant on {report['captions']} SugarCrepe captions, K={report['k']} "
        f"(plant: {report['plant_seconds']} s, {report['mean_candidates']:.1f} candidates/caption)",
        f"coverage >=1 negative : {report['coverage_1']:.4f}  (target >= 0.99: "
        f"{_status(report['coverage_1'], TARGETS['coverage_1'])})",
        f"coverage  K distinct  : {report['coverage_k']:.4f}  (target >= 0.95: "
        f"{_status(report['coverage_k'], TARGETS['coverage_k'])})",
        "kinds of sampled negatives:",
    ]
    lines += [
        f"  {kind:<18} {share:.3f}   mean percentile {report['kind_mean_percentile'].get(kind, 0.0):.3f}"
        for kind, share in report["kind_shares"].items()
    ]
    lines.append(
        f"  largest share {report['max_kind_share']:.3f} (target <= 0.50: "
        f"{_status(report['max_kind_share'], TARGETS['max_kind_share'], higher_is_better=False)})"
    )
    lines.append(
        f"within-POS concreteness percentile of changed words: {report['mean_percentile']:.3f} "
        f"vs random word {report['baseline_percentile']:.3f} "
        f"(target >= 0.70: {_status(report['mean_percentile'], TARGETS['mean_percentile'])})"
    )
    lines.append("SugarCrepe recall:")
    for stem, target_key in (
        ("swap_att", "swap_recall"),
        ("swap_obj", "swap_recall"),
        ("swap", "swap_recall"),
        ("replace_obj", "replace_obj"),
        ("replace_att", "replace_att"),
        ("replace_rel", "replace_rel"),
    ):
        entry = report["recall"].get(stem)
        if not entry:
            continue
        value = entry["recall"]
        shown = "n/a" if value is None else f"{value:.3f}"
        of = f" of {entry['of']}" if "of" in entry else ""
        lines.append(
            f"  {stem:<12} {shown} over {entry['pairs']} pairs{of} "
            f"(target >= {TARGETS[target_key]:.2f}: {_status(value, TARGETS[target_key])})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from slipform_plugin.concreteplant import ConcretePlant, read_vocabulary_file

    parser = argparse.ArgumentParser(prog="slipform eval-plant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sugarcrepe-dir", default="../shared/data/sugarcrepe", help="SugarCrepe's JSON files")
    parser.add_argument("--limit", type=int, default=None, help="use the first N pairs of each file")
    parser.add_argument("--num", type=int, default=3, help="K, negatives sampled per caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=None, help="comma-separated kinds (default: all)")
    parser.add_argument("--spacy-model", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--negclip-tsv", default=None, help="also compare with NegCLIP's negatives (valid_neg_clip.tsv from ARO)"
    )
    parser.add_argument("--vocab", default=None, help="restrict replacements to these words (one per line)")
    parser.add_argument(
        "--first-tier-rating",
        type=float_in_range(1.0, 5.0),
        default=None,
        metavar="RATING",
        help="ConcretePlant's first_tier_rating: changes rated at least RATING (Brysbaert, 1 to 5) on every side "
        "are first-tier whatever their within-POS percentile (default: off)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="audit N synthetic training captions instead (without and with their corpus vocabulary)",
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.synthetic is not None and args.synthetic < 1:
        parser.error(f"--synthetic must be >= 1, got {args.synthetic}")
    options = {
        "num_negatives": args.num,
        "seed": args.seed,
        "kinds": args.kinds,
        "spacy_model": args.spacy_model,
        "first_tier_rating": args.first_tier_rating,
    }
    try:
        vocabulary = read_vocabulary_file(args.vocab, "--vocab") if args.vocab else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.synthetic is not None:
        from slipform_plugin.concreteplant.corpus import corpus_vocabulary

        items = synthetic_audit_items(args.synthetic, seed=args.seed)
        corpus = corpus_vocabulary(item["caption"] for item in items)
        audits = {
            "no vocabulary": audit_synthetic(ConcretePlant(**options), items),
            "corpus vocabulary": audit_synthetic(ConcretePlant(**options, vocabulary=corpus), items),
        }
        print(format_synthetic(audits))
        if args.json:
            Path(args.json).write_text(json.dumps(audits, indent=2))
        return 0
    data = load_sugarcrepe(args.sugarcrepe_dir, args.limit)
    plant = ConcretePlant(**options, vocabulary=vocabulary)
    report = evaluate(plant, data, seed=args.seed)
    print(format_report(report))
    if args.negclip_tsv:
        report["negclip"] = compare_negclip(plant, args.negclip_tsv, args.limit)
        print(format_negclip(report["negclip"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
