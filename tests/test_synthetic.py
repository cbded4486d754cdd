"""Synthetic scenes and ``slipform make-shards``: determinism, shard format, caption truth, held-out splits.

The truth of a caption is checked by an independent parser and geometric checker written here, not by the
generator's own code: the true caption must hold for the laid-out objects and every hard caption must not.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slipform_plugin.synthetic import (
    COLOURS,
    HARD_KINDS,
    MATERIALS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    HeldOut,
    make_item,
    write_shards,
)
from slipform_plugin.synthetic.render import render_array
from slipform_plugin.synthetic.scene import UNSEEN_AGES, WORLDS, get_world
from slipform_plugin.synthetic.shards import main as make_shards_main

COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3}
NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "crosses": "cross"}
_PHRASE = rf"(a|an|two|three) (\w+) (?:({'|'.join(UNSEEN_AGES)}) )?(\w+) (\w+) (\w+) (\w+)"
CAPTION_RE = re.compile(rf"^{_PHRASE} ({'|'.join(RELATIONS)}) {_PHRASE}$")


def parse(caption: str) -> dict:
    """Caption -> {"subject": {...}, "relation": str, "reference": {...}} (fails the test when malformed)."""
    m = CAPTION_RE.match(caption)
    assert m, f"caption does not follow the grammar: {caption!r}"
    g = m.groups()

    def phrase(art, size, age, colour, material, texture, noun):
        assert size in SIZES and colour in COLOURS and material in MATERIALS and texture in TEXTURES, caption
        assert noun in NOUNS, caption
        count = COUNTS[art]
        assert noun.endswith("s") == (count > 1) or noun == "cross", f"number disagreement in {caption!r}"
        return {"count": count, "size": size, "colour": colour, "material": material, "texture": texture,
                "shape": NOUNS[noun], "age": age or ""}  # fmt: skip

    return {"subject": phrase(*g[:7]), "relation": g[7], "reference": phrase(*g[8:])}


def holds(parsed: dict, objects: list[dict]) -> bool:
    """Whether a parsed caption is true of laid-out objects: exact counts and the relation between every pair
    (an age is never drawn, so it never decides)."""
    keys = ("shape", "colour", "size", "material", "texture")

    def matching(group):
        return [o for o in objects if all(o[k] == group[k] for k in keys)]

    subj, ref = matching(parsed["subject"]), matching(parsed["reference"])
    if len(subj) != parsed["subject"]["count"] or len(ref) != parsed["reference"]["count"]:
        return False
    rel = parsed["relation"]
    for a in subj:
        for b in ref:
            if rel == "to the left of" and not a["x"] + a["radius"] < b["x"] - b["radius"]:
                return False
            if rel == "to the right of" and not a["x"] - a["radius"] > b["x"] + b["radius"]:
                return False
            if rel == "above" and not a["y"] + a["radius"] < b["y"] - b["radius"]:
                return False
            if rel == "below" and not a["y"] - a["radius"] > b["y"] + b["radius"]:
                return False
    return True


def diff(a: dict, b: dict) -> set[tuple[str, str]]:
    """The (group, field) pairs in which two parsed captions differ."""
    out = {("relation", "relation")} if a["relation"] != b["relation"] else set()
    for role in ("subject", "reference"):
        out |= {(role, k) for k in a[role] if a[role][k] != b[role][k]}
    return out


@pytest.fixture(scope="module")
def test_items():
    return [make_item(3, "test", i, 64) for i in range(300)]


@pytest.fixture(scope="module", params=["default", "simple", "pair", "pair-relations", "pair-relations-unseen"])
def world_items(request, test_items):
    """300 test items of each world (the default world's are ``test_items``)."""
    if request.param == "default":
        return test_items
    return [make_item(3, "test", i, 64, world=request.param) for i in range(300)]


def test_make_item_is_deterministic_and_seed_dependent():
    a, b = make_item(0, "train", 17), make_item(0, "train", 17)
    assert np.array_equal(a.image, b.image) and a.meta == b.meta
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    others = [make_item(1, "train", 17), make_item(0, "test", 17), make_item(0, "train", 18)]
    assert all(not np.array_equal(a.image, o.image) or a.caption != o.caption for o in others)
    assert make_item(0, "train", 5, image_size=32).image.shape == (32, 32, 3)


def test_true_caption_holds_and_every_hard_caption_is_false(world_items):
    for item in world_items:
        objects = item.meta["scene"]["objects"]
        truth = parse(item.caption)
        assert holds(truth, objects), item.caption
        assert set(item.hard) == set(HARD_KINDS)
        for kind, hard in item.hard.items():
            assert hard["caption"] != item.caption, (kind, item.caption)
            assert not holds(parse(hard["caption"]), objects), (kind, item.caption, hard["caption"])


def test_hard_captions_differ_in_the_stated_way(world_items):
    for item in world_items:
        truth = parse(item.caption)
        for kind, hard in item.hard.items():
            neg = parse(hard["caption"])
            changed = diff(truth, neg)
            attr = hard["attribute"]
            if kind in ("attribute_swap", "object_swap"):
                assert changed == {("subject", attr), ("reference", attr)}, (kind, changed)
                assert neg["subject"][attr] == truth["reference"][attr]
                assert neg["reference"][attr] == truth["subject"][attr]
                assert (kind == "object_swap") == (attr == "shape")
            elif kind == "relation_swap" and hard["new"].endswith("(groups exchanged)"):
                # a world without the converse relation states the converse fact by exchanging the groups
                assert neg["relation"] == truth["relation"]
                assert (neg["subject"], neg["reference"]) == (truth["reference"], truth["subject"])
            elif kind == "relation_swap":
                assert changed == {("relation", "relation")}
                assert neg["relation"] == RELATIONS[truth["relation"]]
            else:
                expected_attr = {"object_replace": "shape", "count_change": "count"}.get(kind)
                assert expected_attr is None or attr == expected_attr, (kind, attr)
                assert kind != "attribute_replace" or attr in ("size", "colour", "material", "texture")
                assert changed == {(hard["group"], attr)}, (kind, changed)
                assert truth[hard["group"]][attr] == hard["old"] and neg[hard["group"]][attr] == hard["new"]


def test_hard_caption_kinds_cover_every_attribute(test_items):
    swapped = {item.hard["attribute_swap"]["attribute"] for item in test_items}
    replaced = {item.hard["attribute_replace"]["attribute"] for item in test_items}
    assert swapped == replaced == {"size", "colour", "material", "texture"}


def test_simple_world_keeps_to_its_values_and_sizes():
    simple = WORLDS["simple"]
    items = [make_item(3, "train", i, 64, world="simple") for i in range(200)]
    assert all(item.meta["world"] == "simple" for item in items)
    assert make_item(3, "train", 0).meta["world"] == "default"
    radii = {"small": 0.11 * 64, "large": 0.17 * 64}
    for item in items:
        scene = item.meta["scene"]
        assert len(scene["distractors"]) <= simple.max_distractors
        assert scene["subject"]["count"] <= 2 and scene["reference"]["count"] <= 2
        for obj in scene["objects"]:
            assert obj["material"] == "matte" and obj["texture"] == "solid"
            assert obj["radius"] == pytest.approx(radii[obj["size"]], abs=0.01)
        # no hard caption names a material or texture the world does not have
        for hard in item.hard.values():
            assert "metallic" not in hard["caption"] and " striped " not in hard["caption"], hard
    swapped = {item.hard["attribute_swap"]["attribute"] for item in items}
    replaced = {item.hard["attribute_replace"]["attribute"] for item in items}
    assert swapped == replaced == {"size", "colour"} == set(simple.attributes)
    assert get_world("default") is WORLDS["default"] and get_world(simple) is simple
    with pytest.raises(
        ValueError,
        match="world must be one of default, simple, pair, pair-relations, pair-relations-unseen, got 'huge'",
    ):
        make_item(0, "train", 0, world="huge")
    with pytest.raises(ValueError, match="world must be one of"):
        write_shards(Path("unused"), 4, world="huge")


def test_unseen_world_is_pair_relations_with_an_age_in_every_caption():
    """``pair-relations-unseen``: the items of ``pair-relations`` (same images, scenes and hard captions), each
    described group given an age the image does not show; worlds without ages state none and store none."""
    ages_seen = set()
    for split in ("train", "test"):
        for i in range(120):
            plain, unseen = (make_item(3, split, i, 64, world=w) for w in ("pair-relations", "pair-relations-unseen"))
            assert np.array_equal(plain.image, unseen.image) and unseen.meta["world"] == "pair-relations-unseen"
            truth = parse(unseen.caption)
            ages = (truth["subject"]["age"], truth["reference"]["age"])
            assert all(age in UNSEEN_AGES for age in ages), unseen.caption
            assert ages == (unseen.meta["scene"]["subject"]["age"], unseen.meta["scene"]["reference"]["age"])
            ages_seen.update(ages)

            def without_ages(text: str) -> str:
                return " ".join(word for word in text.split() if word not in UNSEEN_AGES)

            assert without_ages(unseen.caption) == plain.caption
            for kind, hard in unseen.hard.items():  # the same hard captions, every one keeping the ages
                assert without_ages(hard["caption"]) == plain.hard[kind]["caption"]
                assert (parse(hard["caption"])["subject"]["age"], parse(hard["caption"])["reference"]["age"]) == ages
            assert all("age" not in obj for obj in unseen.meta["scene"]["objects"])  # nothing drawn has an age
            assert "age" not in plain.meta["scene"]["subject"] and "age" not in plain.meta["scene"]["reference"]
    assert ages_seen == set(UNSEEN_AGES) and WORLDS["pair-relations-unseen"].attributes == ("colour",)


@pytest.mark.parametrize("name", ["pair", "pair-relations"])
def test_pair_worlds_are_two_large_objects_in_the_world_relations(name):
    """``pair``, the issue's first calibration check: one object per group, no distractor, one size, always
    "to the left of"; ``pair-relations``: the same with the benchmark's four relations."""
    world = WORLDS[name]
    assert world.attributes == ("colour",)
    relations_seen = set()
    for split in ("train", "test"):
        for i in range(200):
            item = make_item(3, split, i, 64, world=name)
            scene = item.meta["scene"]
            assert scene["relation"] in world.relations and scene["distractors"] == []
            relations_seen.add(scene["relation"])
            assert len(scene["objects"]) == 2 and {o["role"] for o in scene["objects"]} == {"subject", "reference"}
            for obj in scene["objects"]:
                assert (obj["size"], obj["material"], obj["texture"]) == ("large", "matte", "solid")
                assert obj["radius"] == pytest.approx(0.17 * 64, abs=0.01)
            unseen = {"small", "metallic", "striped", "dotted"} | {
                word for relation in set(RELATIONS) - set(world.relations) for word in relation.split()
            } - {word for relation in world.relations for word in relation.split()}
            for hard in item.hard.values():  # every hard caption keeps to the world's words
                assert not set(hard["caption"].split()) & unseen, hard
            exchanged = item.hard["relation_swap"]["new"].endswith("(groups exchanged)")
            assert exchanged == (name == "pair")  # the converse where the world has it, else the groups exchanged
            assert item.hard["attribute_swap"]["attribute"] == item.hard["attribute_replace"]["attribute"] == "colour"
    assert relations_seen == set(world.relations)


def test_heldout_combinations_absent_from_train_and_present_in_test(test_items):
    rule = HeldOut.from_seed(3)
    assert len(rule.colour_shape) == len(SHAPES) and rule.relation_triples
    for i in range(400):
        scene = make_item(3, "train", i).meta["scene"]
        for obj in scene["objects"]:
            assert (obj["colour"], obj["shape"]) not in rule.colour_shape
        triple = (scene["subject"]["shape"], scene["relation"], scene["reference"]["shape"])
        assert triple not in rule.relation_triples
        assert scene["heldout"] == []
    flagged = [item for item in test_items if item.meta["scene"]["heldout"]]
    assert 0.3 < len(flagged) / len(test_items) < 0.7
    kinds = {tag.split(":")[0] for item in flagged for tag in item.meta["scene"]["heldout"]}
    assert kinds == {"colour_shape", "relation"}
    for item in flagged:  # the tags are real: recompute them from the scene
        scene = item.meta["scene"]
        for tag in scene["heldout"]:
            kind, value = tag.split(":")
            if kind == "colour_shape":
                assert tuple(value.split(" ")) in rule.colour_shape
                assert any(f"{o['colour']} {o['shape']}" == value for o in scene["objects"])
            else:
                assert (scene["subject"]["shape"], scene["relation"], scene["reference"]["shape"]) in (
                    rule.relation_triples
                )
    assert HeldOut.from_seed(3) == rule and HeldOut.from_seed(4) != rule


@pytest.mark.parametrize("attribute", ["shape", "colour", "size", "material", "texture"])
def test_every_attribute_is_visible_in_the_image(attribute):
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "material": MATERIALS, "texture": TEXTURES}
    item = make_item(0, "train", 2)
    obj = item.scene.objects[0]
    for value in values[attribute]:
        if value == getattr(obj, attribute):
            continue
        new_obj = replace(obj, **{attribute: value})
        if attribute == "size":  # the layout turns size into a radius (7.5% or 12.5% of the side)
            new_obj = replace(new_obj, radius={"small": 0.075, "large": 0.125}[value] * 64)
        changed = replace(item.scene, objects=(new_obj, *item.scene.objects[1:]))
        before, after = render_array(item.scene, 64), render_array(changed, 64)
        ys, xs = np.nonzero(np.any(before != after, axis=-1))
        assert len(ys) >= 4, (attribute, value)
        # only the changed object's neighbourhood is touched (the large size reaches 12.5% of 64 px)
        reach = max(obj.radius, 0.125 * 64) + 3
        assert np.all(np.abs(xs - obj.x) <= reach) and np.all(np.abs(ys - obj.y) <= reach)


def test_shards_are_deterministic_and_readable_by_webdataset(tmp_path, capsys):
    import webdataset as wds

    rc = make_shards_main([str(tmp_path / "a"), "--num", "45", "--shard-size", "20", "--seed", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    pattern = str((tmp_path / "a").absolute() / "shard-{00000..00002}.tar")
    assert f"--train-data '{pattern}' --train-num-samples 45" in printed
    summary = write_shards(tmp_path / "b", 45, seed=2, shard_size=20, workers=2)
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list(tmp_path.glob("*/*.tmp"))
    samples = list(wds.WebDataset(summary.pattern, shardshuffle=False).decode("pil"))
    assert len(samples) == 45 and len({s["__key__"] for s in samples}) == 45
    for index, sample in enumerate(samples):
        assert sample["png"].size == (64, 64) and sample["png"].mode == "RGB"
        meta = sample["json"]
        assert meta["index"] == index and meta["split"] == "train" and meta["seed"] == 2
        assert sample["txt"] == meta["caption"] == make_item(2, "train", index).caption
        assert np.array_equal(np.asarray(sample["png"]), make_item(2, "train", index).image)  # PNG is lossless
    info = json.loads((tmp_path / "a" / "slipform-synthetic.json").read_text())
    assert info["num_samples"] == 45 and info["pattern"] == pattern


def test_shards_jpg_and_test_split(tmp_path, capsys):
    import webdataset as wds

    assert (
        make_shards_main([str(tmp_path), "--num", "5", "--split", "test", "--format", "jpg", "--image-size", "48"]) == 0
    )
    assert "--val-data" in capsys.readouterr().out
    samples = list(wds.WebDataset(str(tmp_path / "shard-00000.tar"), shardshuffle=False).decode("pil"))
    assert [s["jpg"].size for s in samples] == [(48, 48)] * 5
    assert all(set(s["json"]["hard"]) == set(HARD_KINDS) for s in samples)


def test_make_shards_world_flag(tmp_path, capsys):
    import webdataset as wds

    assert make_shards_main([str(tmp_path), "--num", "6", "--seed", "1", "--world", "simple"]) == 0
    info = json.loads((tmp_path / "slipform-synthetic.json").read_text())
    assert info["world"] == "simple"
    samples = list(wds.WebDataset(str(tmp_path / "shard-00000.tar"), shardshuffle=False).decode("pil"))
    for index, sample in enumerate(samples):
        assert sample["json"]["world"] == "simple"
        assert sample["txt"] == make_item(1, "train", index, world="simple").caption


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num", "0"], "--num: expected a positive integer, got 0"),
        (["--num", "x"], "--num: expected a positive integer, got 'x'"),
        (["--num", "3", "--split", "val"], "--split: invalid choice"),
        (["--num", "3", "--shard-size", "-1"], "--shard-size: expected a positive integer"),
        (["--num", "3", "--image-size", "8"], "image_size must be an integer in [24, 1024], got 8"),
        (["--num", "3", "--world", "huge"], "--world: invalid choice: 'huge'"),
        (["--num", "3", "--single-group-fraction", "1"], "single_group_fraction must be a number in [0, 1), got 1.0"),
        (["--num", "3", "--split", "test", "--single-group-fraction", "0.5"], "applies to the train split only"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, capsys, argv, message):
    try:
        rc = make_shards_main([str(tmp_path / "out"), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_write_shards_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="num must be a positive integer"):
        write_shards(tmp_path, 0)
    with pytest.raises(ValueError, match="split must be one of"):
        write_shards(tmp_path, 1, split="validation")
    with pytest.raises(ValueError, match="image_format must be one of"):
        write_shards(tmp_path, 1, image_format="gif")
    assert not list(Path(tmp_path).iterdir())


def test_single_group_items_show_and_caption_only_their_subject(tmp_path, capsys):
    from slipform_plugin.synthetic.render import render_objects
    from slipform_plugin.synthetic.scene import Placed

    items = [make_item(2, "train", index, single_group_fraction=0.5) for index in range(120)]
    single = [item for item in items if item.meta.get("single_group")]
    assert 40 <= len(single) <= 80
    for item in single:
        assert item.caption == item.scene.subject.phrase() and item.meta["hard"] == {} and not item.hard
        scene = item.meta["scene"]
        assert scene["reference"] is None and scene["relation"] is None and scene["distractors"] == []
        assert {o["role"] for o in scene["objects"]} == {"subject"}
        assert len(scene["objects"]) == item.scene.subject.count
        # the image is the subject's objects alone, where the two-group scene had them
        objects = [Placed(**o) for o in scene["objects"]]
        background = int(item.image[0, 0, 0])
        assert (item.image == render_objects(objects, 64, background=background)).all()
        assert not (item.image == make_item(2, "train", item.meta["index"]).image).all()
    # every other item is exactly the item of the plain training split
    for item in items:
        if not item.meta.get("single_group"):
            plain = make_item(2, "train", item.meta["index"])
            assert item.caption == plain.caption and (item.image == plain.image).all() and item.meta == plain.meta
    assert make_shards_main([str(tmp_path), "--num", "8", "--seed", "2", "--single-group-fraction", "0.5"]) == 0
    info = json.loads((tmp_path / "slipform-synthetic.json").read_text())
    assert info["single_group_fraction"] == 0.5
    with pytest.raises(ValueError, match="train split only"):
        make_item(2, "test", 0, single_group_fraction=0.25)
