"""ConcretePlant: operations on hand-written captions, determinism, pickling, bad inputs, the offline tool and a
small SugarCrepe run held to the issue's targets. spaCy loads once for the module."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest

from slipform_plugin.concreteplant import ConcretePlant, create_from_args, lexicon, offline
from slipform_plugin.concreteplant import vocabulary as V
from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS, HardNegative

SUGARCREPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sugarcrepe"


@pytest.fixture(scope="module")
def plant() -> ConcretePlant:
    generator = ConcretePlant(num_negatives=3, seed=0)
    generator.plant(["A dog on a couch."], ["warm-up"])  # loads spaCy and the norms once for the module
    return generator


def texts(negatives, kind=None) -> set[str]:
    return {n.text for n in negatives if kind is None or n.kind == kind}


def _article_ok(text: str) -> bool:
    for article, word in re.findall(r"\b([Aa]n?) ([A-Za-z]+)", text):
        if article.lower() != lexicon.article_for(word):
            return False
    return True


# ------------------------------------------------------------------------------------------- lexicon
def test_norms_and_within_pos_percentiles():
    assert lexicon.lookup("dog") == pytest.approx(4.85)
    assert lexicon.lookup("fire hydrant") is not None  # a two-word entry of the norms
    assert lexicon.lookup("riding", "rid") == lexicon.lookup("riding")  # surface form before lemma
    # Ranked within POS: a fairly concrete preposition outranks most prepositions, a noun of the same rating
    # sits low among nouns.
    assert lexicon.percentile(3.45, "ADP") > 0.8
    assert lexicon.percentile(3.45, "NOUN") < 0.2
    assert 0.0 <= lexicon.percentile(1.0, "NOUN") <= lexicon.percentile(5.0, "NOUN") <= 1.0


@pytest.mark.parametrize(
    ("word", "tag", "lemma"),
    [("riding", "VBG", "ride"), ("sitting", "VBG", "sit"), ("lying", "VBG", "lie"), ("parked", "VBN", "park"),
     ("knives", "NNS", "knife"), ("benches", "NNS", "bench"), ("men", "NNS", "man"), ("is", "VBZ", "be")],
)  # fmt: skip
def test_lemmatize(word, tag, lemma):
    assert lexicon.lemmatize(word, tag) == lemma


def test_inflection_helpers():
    assert [lexicon.pluralize(w) for w in ("dog", "bus", "pony", "man", "knife", "fire hydrant")] == [
        "dogs", "buses", "ponies", "men", "knives", "fire hydrants"
    ]  # fmt: skip
    assert [lexicon.verb_form("sit", t) for t in ("VBG", "VBZ", "VBD", "VB")] == ["sitting", "sits", "sat", "sit"]
    assert lexicon.verb_form("ride", "VBG") == "riding" and lexicon.verb_form("lie", "VBG") == "lying"
    assert [lexicon.article_for(w) for w in ("orange", "red", "hour", "uniform")] == ["an", "a", "an", "a"]


def test_vocabulary_entries_have_ratings():
    vocabulary = lexicon.load_vocabulary()
    assert all(entry.concreteness >= 1.0 for entry in vocabulary.by_lemma.values())
    assert ("NOUN", "cat") in vocabulary.by_lemma and ("ADJ", "red") in vocabulary.by_lemma


# ------------------------------------------------------------------------------------------- operations
def test_swap_objects(plant):
    found = plant.candidates("A woman prepares a pizza while a man watches.")
    assert "A man prepares a pizza while a woman watches." in texts(found, "swap_objects")


def test_swaps_keep_number_and_casing(plant):
    found = plant.candidates("People and their stuff on a little boat in the ocean")
    assert "A little boat and their stuff on people in the ocean" in texts(found, "swap_objects")


def test_swap_attributes(plant):
    found = plant.candidates("Blue bathroom with two white towels hanging by the shower.")
    assert "White bathroom with two blue towels hanging by the shower." in texts(found, "swap_attributes")
    found = plant.candidates("A black and white cat laying down in dead leaves.")
    assert "A dead cat laying down in black and white leaves." in texts(found, "swap_attributes")


def test_no_symmetric_object_swap(plant):
    # "a cat and a dog" -> "a dog and a cat" says the same thing: never a negative.
    found = plant.candidates("A cat and a dog.")
    assert "A dog and a cat." not in texts(found)


def test_change_count_agrees(plant):
    found = texts(plant.candidates("A dog is sitting on a couch."), "change_count")
    assert any(re.fullmatch(r"(Two|Three|Four|Five|Six) dogs are sitting on a couch\.", t) for t in found), found
    found = texts(plant.candidates("Two dogs playing in the snow."), "change_count")
    assert found and all(re.fullmatch(r"(Three|Four|Five|Six) dogs playing in the snow\.", t) for t in found)


def test_replace_object_same_category_number_and_span(plant):
    caption = "Two dogs playing in the snow."
    objects = [n for n in plant.candidates(caption) if n.kind == "replace_object" and n.span == (4, 8)]
    assert objects
    animals = {lexicon.pluralize(a) for a in V.NOUN_CATEGORIES["animal"]} - {"dogs", "puppies"}
    for negative in objects:
        new_word = negative.text.split()[1]
        assert new_word in animals, negative.text


def test_replace_attribute_relation_and_articles(plant):
    seen_kinds = set()
    for seed in range(12):
        generator = ConcretePlant(seed=seed)
        generator._nlp = plant.nlp  # share the loaded pipeline
        for negative in generator.candidates("A red apple is sitting under a wooden table."):
            seen_kinds.add(negative.kind)
            assert _article_ok(negative.text), negative.text
            if negative.kind == "replace_attribute" and negative.span == (2, 5):  # "red"
                colour = negative.text.split()[1]
                assert colour in V.ATTRIBUTE_CATEGORIES["colour"] and colour != "red", negative.text
            if negative.kind == "replace_relation" and negative.span == (24, 29):  # "under"
                preposition = negative.text[24:].split(" a wooden")[0]
                assert preposition not in {"under", "beneath", "below", "underneath"}, negative.text
    assert {"replace_object", "replace_attribute", "replace_relation", "change_count", "swap_objects"} <= seen_kinds


def test_verb_relation_keeps_tense(plant):
    found = [n for n in plant.candidates("A man riding a horse.") if n.kind == "replace_relation"]
    assert found and all(re.fullmatch(r"A man \w+ing a horse\.", n.text) for n in found), found


def test_candidate_fields(plant):
    caption = "A brown dog sleeping on a green couch next to two cats."
    found = plant.candidates(caption)
    assert len(found) >= 8
    for negative in found:
        assert isinstance(negative, HardNegative) and negative.kind in HARD_NEGATIVE_KINDS
        assert 0.0 <= negative.score <= 1.0 and negative.text != caption
        start, end = negative.span
        assert 0 <= start < end <= len(caption)


def test_kinds_filter_and_weights(plant):
    generator = ConcretePlant(kinds="swap_objects,replace_object")
    generator._nlp = plant.nlp
    result = generator.plant(["A dog chasing a cat across a green field."], ["k"])[0]
    assert result and {n.kind for n in result} <= {"swap_objects", "replace_object"}
    weighted = ConcretePlant(kind_weights={"replace_object": 0.0, "swap_objects": 0.0})
    weighted._nlp = plant.nlp
    result = weighted.plant(CAPTIONS, [str(i) for i in range(len(CAPTIONS))])
    assert all(n.kind not in {"replace_object", "swap_objects"} for negatives in result for n in negatives)
    with pytest.raises(ValueError, match="--hn-kinds"):
        ConcretePlant(kinds="rhyme")
    with pytest.raises(ValueError, match="kind_weights"):
        ConcretePlant(kind_weights={"rhyme": 1.0})


def test_create_from_args():
    generator = create_from_args(argparse.Namespace(hn_num=2, hn_seed=7, hn_kinds="swap_objects", hn_spacy_model=None))
    assert (generator.num_negatives, generator.seed, generator.kinds) == (2, 7, frozenset({"swap_objects"}))
    generator = create_from_args(argparse.Namespace(hn_num=4))  # the other flags may be missing
    assert (generator.num_negatives, generator.seed, generator.kinds) == (4, 0, None)
    generator = create_from_args(argparse.Namespace(hn_num=3, hn_kind_weights="swap_objects=2, change_count=0"))
    assert generator.kind_weights["swap_objects"] == 2.0 and generator.kind_weights["change_count"] == 0.0
    assert generator.kind_weights["replace_object"] == 1.0
    with pytest.raises(ValueError, match="--hn-kind-weights"):
        create_from_args(argparse.Namespace(hn_num=3, hn_kind_weights="swap_objects"))


def test_text_concreteness_ranks_across_parts_of_speech():
    """The cross-POS scale: a preposition below a colour below a concrete noun; a piece counts as its most
    concrete rated word, several pieces as their mean, unrated pieces not at all."""
    from slipform_plugin.concreteplant.lexicon import lookup, percentile, text_concreteness

    above, blue, table = (text_concreteness([word]) for word in ("above", "blue", "table"))
    assert above < blue < table
    assert above == pytest.approx(percentile(lookup("above"), "ALL"))
    assert text_concreteness(["to the left of"]) == pytest.approx(percentile(lookup("left"), "ALL"))
    assert text_concreteness(["blue", "table"]) == pytest.approx((blue + table) / 2)
    assert text_concreteness(["blue", "qwzxv"]) == pytest.approx(blue)
    assert text_concreteness(["qwzxv"]) is None and text_concreteness([]) is None


def test_score_scale_all_rescores_the_same_negatives(plant):
    """score_scale="all" keeps ConcretePlant's draw (same texts, kinds, spans) and gives each negative the
    cross-POS concreteness of what it changed, so a changed preposition scores below a changed colour."""
    from slipform_plugin.concreteplant.lexicon import text_concreteness

    within = ConcretePlant()
    across = ConcretePlant(score_scale="all")
    within._nlp = across._nlp = plant.nlp
    keys = [str(i) for i in range(len(CAPTIONS))]
    planted = {"pos": within.plant(CAPTIONS, keys), "all": across.plant(CAPTIONS, keys)}

    def drawn(result):
        return [[(n.text, n.kind, n.span) for n in negatives] for negatives in result]

    assert drawn(planted["pos"]) == drawn(planted["all"]) and any(planted["pos"])
    pairs = [(x.score, y.score) for xs, ys in zip(planted["pos"], planted["all"], strict=True) for x, y in zip(xs, ys)]
    assert sum(x != y for x, y in pairs) > len(pairs) // 2
    caption = "A red cup on a blue table."
    found = {(n.kind, n.text): n.score for n in across.candidates(caption)}
    relation = found[("replace_relation", "A red cup inside a blue table.")]
    colour = found[("replace_attribute", "A crimson cup on a blue table.")]
    swap = found[("swap_attributes", "A blue cup on a red table.")]
    assert relation == pytest.approx(text_concreteness(["on"]))
    assert colour == pytest.approx(text_concreteness(["red"]))
    assert swap == pytest.approx(text_concreteness(["red", "blue"]))
    assert relation < colour < found[("replace_object", "A red shower on a blue table.")]
    within_scores = {(n.kind, n.text): n.score for n in within.candidates(caption)}
    assert within_scores[("replace_relation", "A red cup inside a blue table.")] > colour  # within POS: 0.84
    with pytest.raises(ValueError, match="--hn-score-scale"):
        ConcretePlant(score_scale="global")
    assert create_from_args(argparse.Namespace(hn_num=3, hn_score_scale="all")).score_scale == "all"
    assert create_from_args(argparse.Namespace(hn_num=3)).score_scale == "pos"


def test_changed_rating_is_the_least_concrete_side():
    from slipform_plugin.concreteplant.lexicon import changed_rating, lookup

    assert changed_rating(["square"]) == pytest.approx(lookup("square"))
    assert changed_rating(["red circle", "old square"]) == pytest.approx(min(lookup("circle"), lookup("square")))
    assert changed_rating(["old", "red"]) == pytest.approx(lookup("old"))
    assert changed_rating(["red", "qwzxv"]) is None and changed_rating(["qwzxv"]) is None


class _Fake:
    def __init__(self, text: str, kind: str, score: float) -> None:
        self.text, self.kind, self.score = text, kind, score


def test_sample_first_tier_predicate():
    """A candidate the predicate marks is drawn in the first tier despite a low score; without it, it waits for
    the second tier; a predicate marking nothing draws exactly what no predicate draws."""
    import random

    from slipform_plugin.concreteplant import sampling

    weights = sampling.default_kind_weights()
    low = [_Fake(f"low {i}", "replace_object", 0.2) for i in range(3)]
    high = [_Fake(f"high {i}", "replace_attribute", 0.9) for i in range(3)]
    candidates = low + high
    for seed in range(20):
        plain = sampling.sample(candidates, 3, random.Random(seed), weights)
        assert {c.text for c in plain} == {c.text for c in high}
        marked_none = sampling.sample(candidates, 3, random.Random(seed), weights, first_tier=lambda c: False)
        assert [c.text for c in marked_none] == [c.text for c in plain]
    drawn = [
        c.kind
        for seed in range(200)
        for c in sampling.sample(candidates, 3, random.Random(seed), weights, first_tier=lambda c: c.score > 0.1)
    ]
    assert 0.35 < drawn.count("replace_object") / len(drawn) < 0.65  # kinds balanced again


def test_first_tier_rating_draws_shape_nouns(plant):
    """Shape nouns rank low among caption nouns (within-POS percentile under the second-tier cut), so by
    default their changes are drawn only to reach K; with first_tier_rating=4 they are drawn like any other
    kind, while a change of an ungrounded age (rated under 3.2) stays second-tier."""
    from slipform_plugin.concreteplant.lexicon import lookup, percentile

    assert percentile(lookup("square"), "NOUN") < 0.4 <= percentile(lookup("red"), "ADJ")
    captions = ["an old red circle to the left of a new blue square", "a young yellow star above a vintage green cross"]
    tiered = ConcretePlant(first_tier_rating=4)
    tiered._nlp = plant.nlp
    keys = [f"{i}" for i in range(150)]

    def shares(generator):
        kinds, ages = [], 0
        for caption in captions:
            for negatives in generator.plant([caption] * len(keys), keys):
                for negative in negatives:
                    kinds.append(negative.kind)
                    changed = set(negative.text.split()) ^ set(caption.split())
                    ages += bool(changed) and changed <= {"old", "new", "young", "vintage", "modern"}
        objects = sum(kind in {"replace_object", "swap_objects"} for kind in kinds) / len(kinds)
        return objects, ages

    default_objects, default_ages = shares(plant)
    tiered_objects, tiered_ages = shares(tiered)
    assert default_objects < 0.15 and tiered_objects > 0.3
    assert default_ages == tiered_ages == 0
    assert "first_tier_rating=4" in repr(tiered) and "first_tier_rating" not in repr(plant)
    for bad in (0.5, 6, float("nan")):
        with pytest.raises(ValueError, match="--hn-first-tier-rating"):
            ConcretePlant(first_tier_rating=bad)
    assert create_from_args(argparse.Namespace(hn_num=3, hn_first_tier_rating=4.0)).first_tier_rating == 4.0
    assert create_from_args(argparse.Namespace(hn_num=3)).first_tier_rating is None


# ------------------------------------------------------------------------------------------- plant()
CAPTIONS = [
    "A man riding a horse on the beach.",
    "Two cats sleeping on a red couch.",
    "A woman holding an umbrella next to a yellow taxi.",
    "A plate of pizza and a glass of wine on a wooden table.",
    "Three children playing soccer in a park.",
    "A kitchen with white cabinets and a steel refrigerator.",
]


def test_plant_distinct_k_and_deterministic_across_batches(plant):
    keys = [f"key{i}" for i in range(len(CAPTIONS))]
    together = plant.plant(CAPTIONS, keys)
    for caption, negatives in zip(CAPTIONS, together, strict=True):
        assert len(negatives) == 3 and len(texts(negatives)) == 3 and caption not in texts(negatives)
    # Same (seed, key) -> same negatives, whatever else is in the batch and in which order.
    alone = [plant.plant([c], [k])[0] for c, k in zip(CAPTIONS, keys, strict=True)]
    reversed_ = plant.plant(CAPTIONS[::-1], keys[::-1])[::-1]
    mixed = plant.plant(["A cat.", *CAPTIONS[3:], "", *CAPTIONS[:3]], ["x", *keys[3:], "y", *keys[:3]])
    assert together == alone == reversed_ == [*mixed[5:], *mixed[1:4]]
    # A fresh object (as in another DataLoader worker) agrees; another seed or key differs.
    fresh = ConcretePlant(seed=0)
    fresh._nlp = plant.nlp
    assert fresh.plant(CAPTIONS, keys) == together
    other = ConcretePlant(seed=1)
    other._nlp = plant.nlp
    assert other.plant(CAPTIONS, keys) != together
    assert plant.plant(CAPTIONS, [k + "!" for k in keys]) != together


def test_pickles_without_the_pipeline(plant):
    assert plant._nlp is not None
    blob = pickle.dumps(plant)
    assert len(blob) < 10_000  # no spaCy pipeline inside
    clone = pickle.loads(blob)
    assert clone._nlp is None and clone.stats == plant.stats
    clone._nlp = plant.nlp  # what the lazy load would give in a worker, without paying for it again here
    assert clone.plant(CAPTIONS[:2], ["a", "b"]) == plant.plant(CAPTIONS[:2], ["a", "b"])


BAD_INPUTS = [
    None,
    b"a dog on a red couch",
    b"\xff\xfe\x00broken bytes",
    "",
    "   \n\t ",
    "🐶🐱🚗",
    "a\x00dog\x07on\x1ba couch\x7f",
    "A dog on a red couch. " + "Hello " * 1700,  # over 10,000 characters
    "<p>a <b>cat</b> on a <i>mat</i></p><script>alert(1)</script>",
    "Ein Hund sitzt auf dem roten Sofa.",
    "一只狗坐在红色的沙发上",
    "of the and with",
    "12345 !!! ???",
    42,
    "dog",
]


def test_bad_inputs_never_raise(plant):
    generator = ConcretePlant(seed=3)
    generator._nlp = plant.nlp
    keys = [str(i) for i in range(len(BAD_INPUTS))]
    results = generator.plant(BAD_INPUTS, keys)
    assert len(results) == len(BAD_INPUTS)
    for caption, negatives in zip(BAD_INPUTS, results, strict=True):
        text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption or "")
        for negative in negatives:
            assert negative.text.strip() and negative.text.strip() != text.strip()
    assert results[0] == [] and results[3] == [] and results[4] == []
    assert results[1], "bytes are decoded and planted"
    assert len(results[7][0].text) > 10_000, "the unparsed tail of a long caption is kept"
    stats = generator.stats
    assert stats["captions"] == len(BAD_INPUTS) and stats["no_negative"] >= 4
    assert sum(v for k, v in stats.items() if k.startswith("kind/")) == stats["negatives"]
    assert generator.candidates(None) == [] and generator.plant([], []) == []


# ------------------------------------------------------------------------------------------- offline tool
def _write_shards(directory: Path, captions: list[str], num_shards: int) -> list[Path]:
    import webdataset as wds

    directory.mkdir(parents=True)
    paths = []
    per_shard = -(-len(captions) // num_shards)
    for s in range(num_shards):
        path = directory / f"part-{s:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i, caption in enumerate(captions[s * per_shard : (s + 1) * per_shard]):
                sample = {"__key__": f"s{s}-{i:04d}", "jpg": f"image {s} {i}".encode(), "txt": caption}
                if i == 0:
                    sample["txt"] = "" if s == 0 else caption
                writer.write(sample)
        paths.append(path)
    return paths


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_offline_round_trip_interrupt_and_resume(plant, tmp_path, monkeypatch, capsys):
    import webdataset as wds

    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(90)]
    inputs = _write_shards(tmp_path / "in", captions, 3)
    before = _digest(inputs)
    out = tmp_path / "out"
    monkeypatch.setattr(offline, "_init_worker", _init_sharing(plant))

    # Interrupt while the second shard is being written.
    calls = {"n": 0}
    original = ConcretePlant.plant

    def interrupted(self, batch, keys=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch, keys)

    monkeypatch.setattr(ConcretePlant, "plant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offline.main([str(tmp_path / "in" / "part-{000..002}.tar"), str(out), "--workers", "1", "--batch-size", "16",
                      "--no-progress"])  # fmt: skip
    assert (out / "part-000.tar").is_file() and (out / "part-000.tar.done.json").is_file()
    assert not (out / "part-001.tar").exists() and not list(out.glob(".tmp-*")), "no partial shard left"
    first_done = (out / "part-000.tar").stat().st_mtime_ns

    # Resume: the finished shard is skipped, the rest is written; the input is never touched.
    monkeypatch.setattr(ConcretePlant, "plant", original)
    capsys.readouterr()
    assert offline.main([str(tmp_path / "in"), str(out), "--workers", "1", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "2 written now, 1 already done, 0 failed" in summary and "samples: 90" in summary
    assert (out / "part-000.tar").stat().st_mtime_ns == first_done
    assert _digest(inputs) == before

    # Read back: every sample with its original fields and up to K valid negatives.
    samples = list(wds.WebDataset([str(out / f"part-{s:03d}.tar") for s in range(3)], shardshuffle=False))
    originals = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in inputs], shardshuffle=False)}
    assert len(samples) == 90
    for sample in samples:
        original_sample = originals[sample["__key__"]]
        assert sample["jpg"] == original_sample["jpg"] and sample["txt"] == original_sample["txt"]
        negatives = [HardNegative.from_json(r) for r in json.loads(sample["hn.json"])]
        caption = sample["txt"].decode()
        assert len(negatives) <= 3 and all(n.text != caption for n in negatives)
        assert len(negatives) == (0 if caption == "" else 3)
    record = json.loads((out / "part-001.tar.done.json").read_text())
    assert record["status"] == "done" and record["counts"]["samples"] == 30
    assert json.loads((out / "summary.json").read_text())["counts"]["samples"] == 90

    # Rerunning does nothing; a Slurm-style slice takes every T-th shard.
    assert offline.main([str(tmp_path / "in"), str(out), "--no-progress"]) == 0
    assert "0 written now, 3 already done" in capsys.readouterr().out
    assert offline.task_slice(offline.expand_shards([str(tmp_path / "in" / "*.tar")]), 1, 2) == [inputs[1]]


def test_offline_score_scale(plant, tmp_path, monkeypatch):
    """``slipform plant --score-scale all`` writes the same negatives as the default, rescored across POS."""
    import webdataset as wds

    _write_shards(tmp_path / "in", CAPTIONS, 1)
    monkeypatch.setattr(offline, "_init_worker", _init_sharing(plant))
    written = {}
    for scale in ("pos", "all"):
        out = tmp_path / scale
        args = [str(tmp_path / "in"), str(out), "--workers", "1", "--no-progress", "--score-scale", scale]
        assert offline.main(args) == 0
        written[scale] = [
            (sample["__key__"], sample["txt"].decode(), json.loads(sample["hn.json"]))
            for sample in wds.WebDataset(str(out / "part-000.tar"), shardshuffle=False)
        ]
    texts = {scale: [[r["text"] for r in records] for *_, records in rows] for scale, rows in written.items()}
    assert texts["pos"] == texts["all"] and any(texts["all"])
    expected = ConcretePlant(score_scale="all")
    expected._nlp = plant.nlp
    keys, captions, records = zip(*written["all"], strict=True)
    rescored = expected.plant(list(captions), list(keys))
    assert [[r["score"] for r in rs] for rs in records] == [[pytest.approx(n.score) for n in ns] for ns in rescored]
    with pytest.raises(SystemExit):
        offline.main([str(tmp_path / "in"), str(tmp_path / "bad"), "--score-scale", "global"])


def test_offline_first_tier_rating(plant, tmp_path, monkeypatch):
    """``slipform plant --first-tier-rating 4`` writes what ``ConcretePlant(first_tier_rating=4)`` plants."""
    import webdataset as wds

    captions = [*CAPTIONS, "an old red circle to the left of a new blue square"]
    _write_shards(tmp_path / "in", captions, 1)
    monkeypatch.setattr(offline, "_init_worker", _init_sharing(plant))
    out = tmp_path / "tier"
    args = [str(tmp_path / "in"), str(out), "--workers", "1", "--no-progress", "--first-tier-rating", "4"]
    assert offline.main(args) == 0
    rows = [
        (sample["__key__"], sample["txt"].decode(), json.loads(sample["hn.json"]))
        for sample in wds.WebDataset(str(out / "part-000.tar"), shardshuffle=False)
    ]
    expected = ConcretePlant(first_tier_rating=4)
    expected._nlp = plant.nlp
    keys, texts_in, records = zip(*rows, strict=True)
    planted = expected.plant(list(texts_in), list(keys))
    assert [[r["text"] for r in rs] for rs in records] == [[n.text for n in ns] for ns in planted]
    default = plant.plant(list(texts_in), list(keys))
    assert [[n.text for n in ns] for ns in default] != [[n.text for n in ns] for ns in planted]
    with pytest.raises(SystemExit):
        offline.main([str(tmp_path / "in"), str(tmp_path / "bad"), "--first-tier-rating", "0"])


def _init_sharing(plant):
    """``offline._init_worker`` that reuses the module's loaded pipeline (in-process runs only)."""
    original = offline._init_worker

    def init(options, queue):
        original(options, queue)
        offline._WORKER["plant"]._nlp = plant.nlp

    return init


def test_offline_identical_across_worker_counts(tmp_path):
    """Two spawned worker processes write exactly what one in-process worker writes."""
    inputs = _write_shards(tmp_path / "in", CAPTIONS * 4, 2)
    assert offline.main([str(tmp_path / "in"), str(tmp_path / "one"), "--workers", "1", "--no-progress"]) == 0
    assert offline.main([str(tmp_path / "in"), str(tmp_path / "two"), "--workers", "2", "--no-progress"]) == 0
    for path in inputs:
        assert (tmp_path / "one" / path.name).read_bytes() == (tmp_path / "two" / path.name).read_bytes()


def test_offline_rejects_bad_arguments(tmp_path, capsys):
    inputs = _write_shards(tmp_path / "in", CAPTIONS, 1)
    assert offline.main([str(tmp_path / "missing-*.tar"), str(tmp_path / "out")]) == 2
    assert offline.main([str(inputs[0]), str(tmp_path / "in")]) == 2  # would overwrite its input
    with pytest.raises(SystemExit):
        offline.main([str(inputs[0]), str(tmp_path / "out"), "--task-index", "2", "--num-tasks", "2"])
    assert "--task-index must be in [0, --num-tasks=2)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- quality
@pytest.mark.skipif(not SUGARCREPE.is_dir(), reason="SugarCrepe data not found")
def test_sugarcrepe_figures_meet_targets(plant):
    from slipform_plugin.concreteplant.evaluate import TARGETS, evaluate, load_sugarcrepe

    report = evaluate(plant, load_sugarcrepe(SUGARCREPE, limit=150))
    assert report["coverage_1"] >= TARGETS["coverage_1"]
    assert report["coverage_k"] >= TARGETS["coverage_k"]
    assert report["max_kind_share"] <= TARGETS["max_kind_share"]
    assert report["mean_percentile"] >= TARGETS["mean_percentile"] > report["baseline_percentile"] + 0.1
    recall = report["recall"]
    assert recall["swap"]["recall"] >= TARGETS["swap_recall"]
    assert recall["replace_obj"]["recall"] >= TARGETS["replace_obj"]
    assert recall["replace_att"]["recall"] >= TARGETS["replace_att"]
    assert recall["replace_rel"]["recall"] >= TARGETS["replace_rel"]


def test_missing_spacy_model_is_reported_not_raised(tmp_path, capsys):
    generator = ConcretePlant(spacy_model="no_such_spacy_model")
    assert generator.plant(["A dog on a couch.", None], ["a", "b"]) == [[], []]
    assert generator.stats["errors"] == 1 and generator.stats["no_negative"] == 2
    inputs = _write_shards(tmp_path / "in", CAPTIONS, 1)
    code = offline.main([str(inputs[0]), str(tmp_path / "out"), "--spacy-model", "no_such_spacy_model",
                         "--workers", "1", "--no-progress"])  # fmt: skip
    assert code == 1 and "FAILED" in capsys.readouterr().out
    assert not (tmp_path / "out" / inputs[0].name).exists()


@pytest.mark.skipif(not SUGARCREPE.is_dir(), reason="SugarCrepe data not found")
def test_eval_plant_cli_writes_json(plant, tmp_path, capsys):
    from slipform_plugin.cli import main as slipform

    out = tmp_path / "report.json"
    assert slipform(["eval-plant", "--sugarcrepe-dir", str(SUGARCREPE), "--limit", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "coverage >=1 negative" in printed and "SugarCrepe recall" in printed
    report = json.loads(out.read_text())
    assert report["k"] == 3 and set(report["kind_shares"]) == set(HARD_NEGATIVE_KINDS)
    with pytest.raises(SystemExit):
        slipform(["eval-plant", "--sugarcrepe-dir", str(SUGARCREPE), "--first-tier-rating", "9"])
    assert "--first-tier-rating: expected a number in [1, 5]" in capsys.readouterr().err


def test_numpy_matmul_ops_give_spacys_tags(plant, monkeypatch):
    """The faster numpy-matmul gemm tags exactly as spaCy's own (BLIS) ops do."""
    from slipform_plugin.concreteplant import parsing

    assert any(type(node.ops).__name__ == "MatmulOps" for node in plant.nlp.get_pipe("tagger").model.walk())
    monkeypatch.setenv("SLIPFORM_SPACY_BLIS", "1")
    reference = parsing.load_nlp.__wrapped__(None)  # uncached load with spaCy's own ops
    assert all(type(node.ops).__name__ != "MatmulOps" for node in reference.get_pipe("tagger").model.walk())
    captions = [*CAPTIONS, *(str(c) for c in BAD_INPUTS if isinstance(c, str))]
    if SUGARCREPE.is_dir():
        records = json.loads((SUGARCREPE / "replace_rel.json").read_text())
        captions += [r["caption"] for r in list(records.values())[:300]]
    fast = [[t.tag for t in toks] for toks in parsing.parse(plant.nlp, captions)]
    assert fast == [[t.tag for t in toks] for toks in parsing.parse(reference, captions)]


# ------------------------------------------------------------------------------------------- closed vocabularies
SYNTHETIC = "two small red matte striped circles to the left of a large blue metallic solid square"
BINDING_SWAPS = {
    "two large red matte striped circles to the left of a small blue metallic solid square",
    "two small blue matte striped circles to the left of a large red metallic solid square",
    "two small red metallic striped circles to the left of a large blue matte solid square",
    "two small red matte solid circles to the left of a large blue metallic striped square",
}


def _generator(plant: ConcretePlant, **kwargs) -> ConcretePlant:
    generator = ConcretePlant(**kwargs)
    generator._nlp = plant.nlp  # share the loaded pipeline
    return generator


def _synthetic_captions(count: int) -> list[str]:
    from slipform_plugin.synthetic import make_item

    return [make_item(seed=0, split="train", index=i, image_size=32).caption for i in range(count)]


def test_attribute_roles_come_from_the_category_lexicon():
    from slipform_plugin.concreteplant.operations import attribute_role

    roles = {word: attribute_role(word) for word in ("red", "Cyan", "large", "matte", "metallic", "striped", "solid")}
    assert roles == {"red": "colour", "Cyan": "colour", "large": "size", "matte": "material", "metallic": "material",
                     "striped": "pattern", "solid": "pattern"}  # fmt: skip
    assert attribute_role("circle") is None and attribute_role("dog") is None


def test_same_role_swap_is_the_binding_swap(plant):
    found = texts(plant.candidates(SYNTHETIC), "swap_attributes")
    assert "two small blue matte striped circles to the left of a large red metallic solid square" in found
    # Only the same-role swaps are ever sampled, and all of them are: exactly the four binding swaps.
    generator = _generator(plant, num_negatives=10, kinds="swap_attributes")
    assert texts(generator.plant([SYNTHETIC], ["k"])[0]) == BINDING_SWAPS
    # Cross-role swaps (a texture word in the colour slot) stay candidates, never samples.
    assert "two small striped matte red circles to the left of a large blue metallic solid square" not in found
    assert "two small metallic matte striped circles to the left of a large blue red solid square" in found
    # Phrases whose modifiers are all attributes of known role exchange their heads: the shape binding swap.
    generator = _generator(plant, num_negatives=10, kinds="swap_objects")
    assert texts(generator.plant([SYNTHETIC], ["k"])[0]) == {
        "two small red matte striped squares to the left of a large blue metallic solid circle"
    }


def test_swap_attributes_fall_back_to_any_role_without_a_same_role_pair(plant):
    generator = _generator(plant, num_negatives=10, kinds="swap_attributes")
    swapped = texts(generator.plant(["A wooden table with a red vase."], ["k"])[0])
    assert swapped == {"A red table with a wooden vase."}  # material <-> colour, the only swap there is
    # Synonyms of one role are no negative: "big" <-> "large" is not sampled when a real swap exists.
    swapped = texts(generator.plant(["A big white dog next to a large black cat."], ["k"])[0])
    assert "A big black dog next to a large white cat." in swapped
    assert "A large white dog next to a big black cat." not in swapped


def test_spatial_relations_offer_their_converse_first(plant):
    relations = [n.text for n in plant.candidates(SYNTHETIC) if n.kind == "replace_relation"]
    assert relations[0] == SYNTHETIC.replace("to the left of", "to the right of")
    generator = _generator(plant, num_negatives=5, kinds="replace_relation")
    for caption, converse in [
        (SYNTHETIC, SYNTHETIC.replace("left", "right")),
        ("A red ball above a blue box.", "A red ball below a blue box."),
        ("A cat on top of a car.", "A cat under a car."),
        ("A dog in front of a house.", "A dog behind a house."),
        ("A cat inside a box.", "A cat outside a box."),
    ]:
        assert texts(generator.plant([caption], ["k"])[0]) == {converse}, caption


def test_multiword_relations_are_replaced_whole(plant):
    for seed in range(8):
        for negative in _generator(plant, seed=seed).candidates(SYNTHETIC):
            # never "to the hand of" / "to the rock of": "left" is no object and the phrase moves as one unit
            assert not re.search(r"\bto the (?!left of|right of)\w+ of\b", negative.text), negative.text
            if negative.kind == "replace_relation":
                relation = negative.text[
                    len("two small red matte striped circles ") : -len(" a large blue metallic solid square")
                ]
                assert ("ADP", relation) in lexicon.load_vocabulary().by_lemma, negative.text


def test_corpus_vocabulary_helpers(tmp_path):
    from slipform_plugin.concreteplant import corpus_vocabulary, read_vocabulary_file, write_vocabulary_file

    captions = ["A red ball.", "A red box", b"two Boxes", None]
    assert corpus_vocabulary(captions) == {"a", "red", "ball", "box", "two", "boxes"}
    assert corpus_vocabulary(captions, min_count=2) == {"a", "red"}
    path = write_vocabulary_file(corpus_vocabulary(captions), tmp_path / "vocab.txt")
    assert path.read_text().splitlines() == ["a", "ball", "box", "boxes", "red", "two"]
    assert read_vocabulary_file(path) == corpus_vocabulary(captions)
    with pytest.raises(FileNotFoundError, match="--vocab"):
        read_vocabulary_file(tmp_path / "missing.txt", "--vocab")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no words"):
        read_vocabulary_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="min_count"):
        corpus_vocabulary(captions, min_count=0)
    with pytest.raises(ValueError, match="vocabulary"):
        ConcretePlant(vocabulary=[])


def test_corpus_vocabulary_keeps_every_negative_in_the_corpus(plant, tmp_path):
    from slipform_plugin.concreteplant import corpus_vocabulary, write_vocabulary_file
    from slipform_plugin.concreteplant.corpus import words

    captions = _synthetic_captions(150)
    vocabulary = corpus_vocabulary(captions)
    generator = _generator(plant, num_negatives=6, vocabulary=vocabulary)
    planted = generator.plant(captions, [str(i) for i in range(len(captions))])
    kinds = {n.kind for negatives in planted for n in negatives}
    assert {"replace_object", "replace_attribute", "replace_relation", "change_count", "swap_attributes"} <= kinds
    for negatives in planted:
        for negative in negatives:
            assert set(words(negative.text)) <= vocabulary, negative.text
    assert all(len(negatives) >= 3 for negatives in planted)
    # Without it the same captions get words no image shows (the audit's "parrots", "bronze", "floral").
    free = _generator(plant, num_negatives=6).plant(captions, [str(i) for i in range(len(captions))])
    assert any(not set(words(n.text)) <= vocabulary for negatives in free for n in negatives)
    # A file gives the same negatives as the set; so does the full candidate list.
    path = write_vocabulary_file(vocabulary, tmp_path / "vocab.txt")
    assert _generator(plant, num_negatives=6, vocabulary=str(path)).plant(
        captions[:20], list("abcdefghijklmnopqrst")
    ) == (generator.plant(captions[:20], list("abcdefghijklmnopqrst")))
    for negative in generator.candidates(SYNTHETIC):
        assert set(words(negative.text)) <= vocabulary | set(SYNTHETIC.split()), negative.text


def test_corpus_vocabulary_on_real_captions(plant):
    from slipform_plugin.concreteplant import corpus_vocabulary
    from slipform_plugin.concreteplant.corpus import words

    corpus = [*CAPTIONS, "A dog and a cat on a blue chair.", "Four birds and six cows.", "A cow riding a bus."]
    vocabulary = corpus_vocabulary(corpus)
    generator = _generator(plant, num_negatives=6, vocabulary=vocabulary)
    planted = generator.plant(CAPTIONS, [str(i) for i in range(len(CAPTIONS))])
    assert all(planted)
    for caption, negatives in zip(CAPTIONS, planted, strict=True):
        for negative in negatives:
            assert set(words(negative.text)) <= vocabulary | set(words(caption)), negative.text


def test_hn_vocab_flag(tmp_path, capsys):
    import open_clip_train.params as params

    base = ["--loss", "cement", "--hn", "concreteplant"]
    for path, reason in ((tmp_path / "missing.txt", "not found"), (tmp_path / "empty.txt", "no words")):
        if reason == "no words":
            path.write_text("\n\n")
        with pytest.raises(SystemExit) as raised:
            params.parse_args([*base, "--hn-vocab", str(path)])
        assert raised.value.code == 2
        err = capsys.readouterr().err
        assert "--hn-vocab" in err and str(path) in err and reason in err
    good = tmp_path / "vocab.txt"
    good.write_text("red\nblue\ncircle\n")
    args = params.parse_args([*base, "--hn-vocab", str(good)])
    assert args.hn_vocab == str(good)
    assert create_from_args(args).vocabulary == {"red", "blue", "circle"}
    assert params.parse_args(base).hn_vocab is None and create_from_args(params.parse_args(base)).vocabulary is None


def test_hn_score_scale_flag(capsys):
    """OpenCLIP's parser takes --hn-score-scale {pos,all} and the generator it builds uses it."""
    import open_clip_train.params as params

    base = ["--loss", "cement", "--hn", "concreteplant"]
    assert create_from_args(params.parse_args(base)).score_scale == "pos"
    assert create_from_args(params.parse_args([*base, "--hn-score-scale", "all"])).score_scale == "all"
    with pytest.raises(SystemExit):
        params.parse_args([*base, "--hn-score-scale", "global"])
    assert "--hn-score-scale" in capsys.readouterr().err


def test_hn_first_tier_rating_flag(capsys):
    """OpenCLIP's parser takes --hn-first-tier-rating RATING in [1, 5] and the generator it builds uses it."""
    import open_clip_train.params as params

    base = ["--loss", "cement", "--hn", "concreteplant"]
    assert create_from_args(params.parse_args(base)).first_tier_rating is None
    assert create_from_args(params.parse_args([*base, "--hn-first-tier-rating", "4"])).first_tier_rating == 4.0
    for bad in ("6", "four"):
        with pytest.raises(SystemExit):
            params.parse_args([*base, "--hn-first-tier-rating", bad])
        assert "--hn-first-tier-rating: expected a number in [1, 5]" in capsys.readouterr().err


def test_offline_vocab_flag(plant, tmp_path, monkeypatch, capsys):
    from slipform_plugin.concreteplant import corpus_vocabulary, write_vocabulary_file
    from slipform_plugin.concreteplant.corpus import words

    captions = _synthetic_captions(40)
    inputs = _write_shards(tmp_path / "in", captions, 1)
    with pytest.raises(SystemExit):
        offline.main([str(inputs[0]), str(tmp_path / "out"), "--vocab", str(tmp_path / "missing.txt")])
    assert "--vocab" in capsys.readouterr().err
    vocabulary = corpus_vocabulary(captions)
    path = write_vocabulary_file(vocabulary, tmp_path / "vocab.txt")
    monkeypatch.setattr(offline, "_init_worker", _init_sharing(plant))
    out = tmp_path / "out"
    assert offline.main([str(inputs[0]), str(out), "--workers", "1", "--no-progress", "--vocab", str(path)]) == 0
    import tarfile

    with tarfile.open(out / inputs[0].name) as tar:
        planted = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".hn.json")]
    assert sum(len(p) for p in planted) > 60
    assert all(set(words(n["text"])) <= vocabulary for negatives in planted for n in negatives)


def test_uniform_ablation_overrides_only_the_selection(plant):
    from slipform_plugin.evaluation.ablations import UniformConcretePlant, create_uniform_concreteplant

    assert "plant" not in vars(UniformConcretePlant) and "_select" in vars(UniformConcretePlant)
    uniform = UniformConcretePlant(num_negatives=3, seed=0)
    uniform._nlp = plant.nlp
    keys = [f"key{i}" for i in range(len(CAPTIONS))]
    planted = uniform.plant(CAPTIONS, keys)
    for caption, negatives in zip(CAPTIONS, planted, strict=True):
        assert len(texts(negatives)) == 3 and caption not in texts(negatives)
    assert uniform.plant(CAPTIONS[::-1], keys[::-1])[::-1] == planted  # deterministic per (seed, key)
    # Same candidates as ConcretePlant, another draw: the selections differ somewhere.
    assert planted != plant.plant(CAPTIONS, keys)
    assert uniform.stats["captions"] == 2 * len(CAPTIONS) and uniform.stats["negatives"] == 6 * len(CAPTIONS)
    args = argparse.Namespace(hn_num=2, hn_seed=1, hn_kinds=None, hn_spacy_model=None, hn_vocab=None)
    assert create_uniform_concreteplant(args).num_negatives == 2


def test_audit_synthetic_measures_binding_swaps_and_vocabulary(plant):
    from slipform_plugin.concreteplant.evaluate import audit_synthetic, synthetic_audit_items

    items = synthetic_audit_items(60)
    assert all(item["binding_swaps"] for item in items)
    audit = audit_synthetic(_generator(plant, num_negatives=3), items)
    assert audit["negatives"] == 180
    assert audit["binding_swap_of_swap_attributes"] >= 0.95
    assert audit["kinds"]["replace_relation"]["in_vocabulary"] == 1.0


def test_cached_vocabulary_filter_equals_checking_each_rendered_lemma(plant):
    from slipform_plugin.concreteplant import corpus, corpus_vocabulary, operations, parsing

    captions = [*_synthetic_captions(30), *CAPTIONS, "TWO RED BALLS", "Three Dogs Are Running To The Left Of A Cat."]
    vocabulary = corpus_vocabulary([*captions, "balls dog dogs cats run runs ran sat"])
    checked = 0
    for caption, toks in zip(captions, parsing.parse(plant.nlp, captions), strict=True):
        analysis = operations.CaptionAnalysis(caption, toks, vocabulary)
        for unit in analysis.units:
            if unit.kind == "container":
                continue
            cached = operations._allowed_lemmas(
                unit.pool, unit.kind, unit.plural, unit.tag, operations._case_template(unit.text), vocabulary
            )
            direct = {
                lemma
                for lemma in lexicon.pool_lemmas(*unit.pool)
                if corpus.allows(vocabulary, operations._render(unit, lemma))
            }
            assert cached == direct, (caption, unit)
            checked += 1
    assert checked > 100
