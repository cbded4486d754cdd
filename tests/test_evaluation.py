"""``slipform eval``: every benchmark format on small files written here, with rendered images and a tiny
randomly initialised model. Scores are checked against a direct, unbatched computation with OpenCLIP, and
the checkpoint checks against real mismatches (keys, shapes, QuickGELU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from slipform_plugin.evaluation import benchmarks as bm  # noqa: E402
from slipform_plugin.evaluation.cli import main as eval_main  # noqa: E402
from slipform_plugin.evaluation.core import ChoiceItem, Encoder, choice_correct, open_image  # noqa: E402
from slipform_plugin.evaluation.model import CheckpointMismatchError, load_model  # noqa: E402
from slipform_plugin.synthetic import HARD_KINDS, make_item, write_shards  # noqa: E402

TINY = "slipform-evaltest-tiny"
TINY_QG = "slipform-evaltest-tiny-quickgelu"
TINY_WIDE = "slipform-evaltest-tiny-wide"


def _config(width: int = 64, quick_gelu: bool = False) -> dict:
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_configs")
    for name, cfg in ((TINY, _config()), (TINY_QG, _config(quick_gelu=True)), (TINY_WIDE, _config(width=96))):
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    return root


def _save_train_checkpoint(model, path: Path, trained_as: str, force_quick_gelu: bool = False) -> Path:
    """An ``open_clip_train``-style checkpoint: ``state_dict`` key, DDP ``module.`` prefixes, params.txt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    (path.parent.parent / "params.txt").write_text(f"force_quick_gelu: {force_quick_gelu}\nmodel: {trained_as}\n")
    return path


@pytest.fixture(scope="session")
def checkpoint(tiny_models, tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    return _save_train_checkpoint(model, tmp_path_factory.mktemp("logs") / "run" / "checkpoints" / "epoch_1.pt", TINY)


@pytest.fixture(scope="session")
def direct(checkpoint):
    """Unbatched reference scores computed straight with OpenCLIP (no Slipform code)."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    open_clip.load_checkpoint(model, str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    images, texts = {}, {}

    def image_feature(image: Image.Image) -> torch.Tensor:
        key = image.convert("RGB").tobytes()
        if key not in images:
            with torch.no_grad():
                images[key] = model.encode_image(preprocess(image.convert("RGB"))[None], normalize=True)[0]
        return images[key]

    def text_feature(text: str) -> torch.Tensor:
        if text not in texts:
            with torch.no_grad():
                texts[text] = model.encode_text(tokenizer([text]), normalize=True)[0]
        return texts[text]

    def score(image: Image.Image, text: str) -> float:
        return float(image_feature(image) @ text_feature(text))

    score.image_feature, score.text_feature = image_feature, text_feature
    return score


def _agree(report_correct: list[bool], margins: list[float]) -> None:
    """Direct margins (true minus best other) must agree in sign with the evaluator, except for near-ties."""
    clear = [(c, m) for c, m in zip(report_correct, margins) if abs(m) > 1e-5]
    assert len(clear) >= 0.9 * len(margins)
    assert all(c == (m > 0) for c, m in clear)


def _render(path: Path, index: int, size: int = 64) -> tuple[str, str]:
    """Render synthetic test item ``index`` to ``path``; return its true caption and one hard caption."""
    item = make_item(7, "test", index, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(item.image).save(path)
    kind = HARD_KINDS[index % len(HARD_KINDS)]
    return item.caption, item.hard[kind]["caption"]


def _run(argv: list[str], out: Path) -> tuple[int, dict | None]:
    rc = eval_main([*argv, "--out", str(out)])
    report = json.loads((out / "eval.json").read_text()) if rc == 0 else None
    return rc, report


# ---------------------------------------------------------------------------------------------- SugarCrepe
@pytest.fixture(scope="session")
def sugarcrepe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sugarcrepe")
    images, ann = root / "val2017", root / "ann"
    ann.mkdir()
    expected = {}
    index = 0
    for name in ("replace_att", "swap_obj", "add_obj"):
        entries = {}
        for j in range(6):
            filename = f"{index:012d}.jpg"
            pos, neg = _render(images / filename, index)
            entries[str(j)] = {"filename": filename, "caption": pos, "negative_caption": neg}
            index += 1
        (ann / f"{name}.json").write_text(json.dumps(entries))
        expected[name] = entries
    return ann, images, expected


def test_sugarcrepe_matches_direct_scores(sugarcrepe, checkpoint, direct, tmp_path, capsys):
    ann, images, expected = sugarcrepe
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--sugarcrepe", str(ann),
                       "--coco-images", str(images)], tmp_path)  # fmt: skip
    assert rc == 0
    res = report["results"]["sugarcrepe"]
    assert list(res["categories"]) == ["replace_att", "swap_obj", "add_obj"] and res["n"] == 18
    all_correct, margins = [], []
    for name, entries in expected.items():
        correct = []
        for entry in entries.values():
            img = Image.open(images / entry["filename"])
            m = direct(img, entry["caption"]) - direct(img, entry["negative_caption"])
            correct.append(m > 0)
            margins.append(m)
        all_correct += correct
        assert res["categories"][name]["accuracy"] == pytest.approx(np.mean(correct))
    assert res["average"] == pytest.approx(np.mean([np.mean(c) for c in np.split(np.array(all_correct), 3)]))
    _agree(all_correct, margins)
    assert set(res["families"]) == {"replace", "swap", "add"}
    md = (tmp_path / "eval.md").read_text()
    assert "## SugarCrepe" in md and "| swap_obj |" in md and md in capsys.readouterr().out


def test_swapping_true_and_false_caption_flips_every_answer(tiny_models, sugarcrepe):
    ann, images, _ = sugarcrepe
    items = bm.load_sugarcrepe(ann, images)
    loaded = load_model(TINY, None)
    enc = Encoder(loaded.model, loaded.preprocess, loaded.tokenizer, batch_size=5)
    flipped = [ChoiceItem(it.image, it.options[::-1], it.group) for it in items]
    a, b = choice_correct(enc, items), choice_correct(enc, flipped)
    assert np.array_equal(a, ~b)
    assert 0 < a.sum() < len(a)  # a random model is neither always right nor always wrong here


def test_sugarcrepe_errors_name_the_argument(sugarcrepe, tmp_path, tiny_models, capsys):
    ann, images, _ = sugarcrepe
    rc, _ = _run(["--model", TINY, "--sugarcrepe", str(ann)], tmp_path)
    assert rc == 2 and "--sugarcrepe and --coco-images go together" in capsys.readouterr().err
    rc, _ = _run(["--model", TINY, "--sugarcrepe", str(ann), "--coco-images", str(tmp_path)], tmp_path)
    assert rc == 2 and "--coco-images: 18 of 18 images not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "swap_att.json").write_text(json.dumps({"0": {"filename": "x.jpg", "caption": "a"}}))
    rc, _ = _run(["--model", TINY, "--sugarcrepe", str(bad), "--coco-images", str(images)], tmp_path)
    assert rc == 2 and "entry '0' has no 'negative_caption' field" in capsys.readouterr().err
    rc, _ = _run(["--model", TINY], tmp_path)
    assert rc == 2 and "no benchmark given" in capsys.readouterr().err
    rc, _ = _run(["--model", "no-such-model", "--sugarcrepe", str(ann), "--coco-images", str(images)], tmp_path)
    assert rc == 2 and "--model: unknown OpenCLIP model 'no-such-model'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- VALSE
def test_valse_filters_unvalidated_foils_and_finds_nested_images(tmp_path, checkpoint, direct):
    images, ann = tmp_path / "images", tmp_path / "valse"
    ann.mkdir()
    entries = {}
    for i in range(8):
        dataset = "SWiG" if i % 2 else "visual7w"
        path = images / dataset / f"{i}.jpg" if i < 6 else images / f"{i}.jpg"  # nested and flat layouts
        pos, neg = _render(path, 100 + i)
        votes = {"caption": 1 if i == 3 else 3, "foil": 0, "other": 0}
        entries[f"relations_{i}"] = {"dataset": dataset, "image_file": f"{i}.jpg", "caption": pos, "foil": neg,
                                     "mturk": votes, "linguistic_phenomena": "relations"}  # fmt: skip
    (ann / "relations.json").write_text(json.dumps(entries))
    (ann / "existence.json").write_text(json.dumps(dict(list(entries.items())[:2])))
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--valse", str(ann),
                       "--valse-images", str(images)], tmp_path / "o1")  # fmt: skip
    assert rc == 0
    pieces = report["results"]["valse"]["pieces"]
    assert pieces["relations"]["n"] == 7 and pieces["existence"]["n"] == 2  # the 1-vote foil is dropped
    correct, margins = [], []
    for i, e in enumerate(entries.values()):
        if i == 3:
            continue
        img = Image.open(images / e["dataset"] / e["image_file"] if i < 6 else images / e["image_file"])
        margins.append(direct(img, e["caption"]) - direct(img, e["foil"]))
        correct.append(margins[-1] > 0)
    assert pieces["relations"]["accuracy"] == pytest.approx(np.mean(correct))
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--valse", str(ann),
                       "--valse-images", str(images), "--valse-all"], tmp_path / "o2")  # fmt: skip
    assert rc == 0 and report["results"]["valse"]["pieces"]["relations"]["n"] == 8


# ----------------------------------------------------------------------------------------------------- ARO
def _aro_files(root: Path) -> None:
    images = root / "images"
    relation, attribution = [], []
    for i in range(6):
        # a 96x64 image: the rendered scene on the left, noise on the right; the box selects the scene
        pos, neg = _render(root / "tmp.png", 200 + i)
        canvas = np.random.default_rng(i).integers(0, 255, (64, 96, 3), dtype=np.uint8)
        canvas[:, :64] = np.asarray(Image.open(root / "tmp.png"))
        images.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(images / f"{i}.jpg")
        box = {"bbox_x": 0, "bbox_y": 0, "bbox_w": 64, "bbox_h": 64}
        relation.append({"image_path": f"{i}.jpg", **box, "true_caption": pos, "false_caption": neg,
                         "relation_name": "on" if i < 4 else "near"})  # fmt: skip
        attribution.append({"image_path": f"{i}.jpg", **box, "true_caption": pos, "false_caption": neg,
                            "attributes": ["red", "large"] if i < 4 else ["blue", "small"]})  # fmt: skip
    (root / "visual_genome_relation.json").write_text(json.dumps(relation))
    (root / "visual_genome_attribution.json").write_text(json.dumps(attribution))


def test_aro_vg_crops_boxes_and_computes_macro_accuracy(tmp_path, checkpoint, direct):
    _aro_files(tmp_path)
    assert open_image((tmp_path / "images" / "0.jpg", (0, 0, 64, 64))).size == (64, 64)
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--aro", str(tmp_path),
                       "--aro-min-count", "2"], tmp_path / "out")  # fmt: skip
    assert rc == 0
    rel, att = report["results"]["vg_relation"], report["results"]["vg_attribution"]
    assert rel["n"] == att["n"] == 6
    cases = json.loads((tmp_path / "visual_genome_relation.json").read_text())
    correct = []
    for c in cases:
        img = Image.open(tmp_path / "images" / c["image_path"]).crop((0, 0, 64, 64))
        correct.append(direct(img, c["true_caption"]) > direct(img, c["false_caption"]))
    # "near" is one of the relations ARO's macro average leaves out; "on" stays
    assert rel["macro_groups"] == 1 and rel["macro_accuracy"] == pytest.approx(np.mean(correct[:4]))
    assert rel["accuracy"] == pytest.approx(np.mean(correct))
    # attribute pairs: both have >= 2 items with --aro-min-count 2
    assert att["macro_groups"] == 2
    assert att["macro_accuracy"] == pytest.approx((np.mean(correct[:4]) + np.mean(correct[4:])) / 2)


def test_aro_order_perturbations_and_precision(tmp_path, checkpoint, direct):
    root = tmp_path / "coco"
    captions = ["A large red dog is sitting on the small blue couch.", "Two young men ride old bikes down a hill."]
    ann = []
    for i in range(2):
        _render(root / "val2014" / f"{i}.jpg", 300 + i)
        ann.append({"image": f"val2014/{i}.jpg", "caption": captions})
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(ann))
    items = bm.load_aro_order(tmp_path / "coco_karpathy_test.json", root, "--aro-coco-order", seed=1)
    again = bm.load_aro_order(tmp_path / "coco_karpathy_test.json", root, "--aro-coco-order", seed=1)
    assert [it.options for it in items] == [it.options for it in again]
    assert len(items) == 4 and all(len(it.options) == 5 for it in items)
    for it in items:
        truth = it.options[0]
        assert truth == bm.pre_caption(captions[0]) or truth == bm.pre_caption(captions[1])
        assert "." not in truth and truth == truth.lower()
        for option in it.options[1:]:  # every perturbation is a permutation of the same words
            assert sorted(option.split()) == sorted(truth.split())
        nouns_adjs = it.options[1].split()
        assert nouns_adjs != truth.split()
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--aro-coco-order",
                       str(tmp_path / "coco_karpathy_test.json"), "--aro-coco-order-root", str(root)],
                      tmp_path / "out")  # fmt: skip
    assert rc == 0
    res = report["results"]["coco_order"]
    expected = []
    for it in items:
        img = Image.open(it.image)
        scores = [direct(img, option) for option in it.options]
        expected.append(all(scores[0] > s for o, s in zip(it.options[1:], scores[1:]) if o != it.options[0]))
    assert res["n"] == 4 and res["precision_at_1"] == pytest.approx(np.mean(expected))


def test_aro_perturbations_keep_tokens_in_their_classes():
    import random

    tokens = ["a", "large", "red", "dog", "on", "the", "blue", "couch"]
    tags = ["DT", "JJ", "JJ", "NN", "IN", "DT", "JJ", "NN"]
    nouns_adjs, others, within, _across = aro_out = bm.aro_perturbations(tokens, tags, random.Random(3))
    assert all(sorted(o.split()) == sorted(tokens) for o in aro_out)
    words = nouns_adjs.split()
    assert [words[i] for i in (0, 4, 5)] == ["a", "on", "the"]  # determiners and prepositions stay
    assert sorted(words[i] for i in (3, 7)) == ["couch", "dog"]
    words = others.split()
    assert [words[i] for i in (1, 2, 3, 6, 7)] == ["large", "red", "dog", "blue", "couch"]
    assert sorted(within.split()[:3]) == sorted(tokens[:3])


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_benchmark_metrics(tmp_path, checkpoint, direct):
    write_shards(tmp_path / "test", 24, seed=5, shard_size=10, split="test")
    rc, report = _run(["--model", TINY, "--pretrained", str(checkpoint), "--synthetic",
                       str(tmp_path / "test" / "shard-{00000..00002}.tar")], tmp_path / "out")  # fmt: skip
    assert rc == 0
    res = report["results"]["synthetic"]
    items = [make_item(5, "test", i) for i in range(24)]
    assert res["n"] == 24 and res["n_heldout"] == sum(bool(it.meta["scene"]["heldout"]) for it in items)
    assert set(res["hard"]) == {*HARD_KINDS, "all_kinds"}
    images = [Image.fromarray(it.image) for it in items]
    for kind in ("attribute_swap", "count_change"):
        margins = [direct(img, it.caption) - direct(img, it.hard[kind]["caption"]) for img, it in zip(images, items)]
        correct = [m > 0 for m in margins]
        _agree(correct, margins)
        assert res["hard"][kind]["accuracy"] == pytest.approx(np.mean(correct))
        held = [c for c, it in zip(correct, items) if it.meta["scene"]["heldout"]]
        assert res["hard"][kind]["accuracy_heldout"] == pytest.approx(np.mean(held))
        assert res["hard"][kind]["image_gap"] == pytest.approx(np.mean(margins), abs=1e-5)
        cosines = [
            float(direct.text_feature(it.caption) @ direct.text_feature(it.hard[kind]["caption"])) for it in items
        ]
        assert res["hard"][kind]["text_cosine"] == pytest.approx(np.mean(cosines), abs=1e-5)
    by_attr = res["hard"]["attribute_swap"]["by_attribute"]
    assert sum(v["n"] for v in by_attr.values()) == 24
    assert set(by_attr) <= {"size", "colour", "material", "texture"}
    assert res["hard"]["all_kinds"]["accuracy"] <= min(res["hard"][k]["accuracy"] for k in HARD_KINDS)
    # retrieval, recomputed directly (a hit is any item with the same caption text)
    sims = (torch.stack([direct.image_feature(img) for img in images])
            @ torch.stack([direct.text_feature(it.caption) for it in items]).T).numpy()  # fmt: skip
    captions = np.array([it.caption for it in items])
    for name, matrix in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranked = captions[np.argsort(-matrix, axis=1)] == captions[:, None]
        for k in (1, 5):
            assert res["retrieval"][name][f"R@{k}"] == pytest.approx(ranked[:, :k].any(1).mean())
    assert res["zero_shot"]["shape"]["classes"] == 6 and res["zero_shot"]["colour"]["classes"] == 8
    # the layout probe reads the whole images' features: recomputed from them directly
    from slipform_plugin.evaluation.synthetic import layout_probe

    scene_feats = torch.stack([direct.image_feature(img) for img in images]).numpy()
    expected = layout_probe(scene_feats, [it.meta["scene"] for it in items])
    assert res["layout"]["n"] == 24 and set(res["layout"]) == set(expected)
    for name in set(expected) - {"n"}:
        assert res["layout"][name]["accuracy"] == pytest.approx(expected[name]["accuracy"], abs=1e-6)
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "attribute_swap" in md and "R@5" in md and "zero-shot" in md
    assert "| relation_axis (scene) |" in md and "| shape (subject) |" in md


@pytest.mark.parametrize("world", ["default", "simple", "pair"])
def test_synthetic_retrieval_is_perfect_for_an_oracle_encoder(tmp_path, world):
    """The retrieval and zero-shot code, with features that encode the caption exactly, must score 100%."""
    from slipform_plugin.evaluation.synthetic import evaluate_synthetic, read_samples

    write_shards(tmp_path / world, 12, seed=2, split="test", world=world)
    samples = read_samples(tmp_path / world)
    by_key = {s["key"]: s for s in samples}
    from slipform_plugin.synthetic import COLOURS, MATERIALS, SHAPES, SIZES, TEXTURES

    words = {
        w for s in samples for h in s["meta"]["hard"].values() for w in (s["caption"] + " " + h["caption"]).split()
    }
    vocab = sorted(words | {"a", "an", *SHAPES, *COLOURS, *SIZES, *MATERIALS, *TEXTURES})

    class Oracle(Encoder):
        def __init__(self):
            super().__init__(None, None, None)

        def images(self, refs):
            # an image "is" its true caption (or, for subject renders, the subject's phrase)
            out = []
            for ref in refs:
                kind, key = ref.key
                s = by_key[key]
                subj = s["meta"]["scene"]["subject"]
                text = s["caption"] if kind == "synthetic" else f"{subj['colour']} {subj['shape']}"
                out.append(self._bag(text, weight_order=kind == "synthetic"))
            return torch.stack(out)

        def texts(self, texts):
            return torch.stack([self._bag(t, weight_order=True) for t in texts])

        def _bag(self, text, weight_order):
            v = torch.zeros(len(vocab) * 40)
            for pos, w in enumerate(text.split()):
                if w in vocab:
                    v[vocab.index(w) * 40 + (pos if weight_order else 0) % 40] += 1.0
                    v[vocab.index(w) * 40] += 1.0
            return v / v.norm()

    res = evaluate_synthetic(Oracle(), samples)
    assert all(res["hard"][k]["accuracy"] == 1.0 for k in HARD_KINDS)
    assert res["retrieval"]["image_to_text"]["R@1"] == 1.0 and res["retrieval"]["text_to_image"]["R@1"] == 1.0
    assert all(res["hard"][k]["outcomes"] == "1" * len(samples) for k in HARD_KINDS)  # per item, in sample order
    assert res["retrieval"]["image_to_text"]["outcomes@1"] == "1" * len(samples)

    class BagOfWords(Oracle):  # a text tower blind to word order: most swaps tie with their caption
        def texts(self, texts):
            return torch.stack([self._bag(t, weight_order=False) for t in texts])

    blind = evaluate_synthetic(BagOfWords(), samples)
    for kind in HARD_KINDS:
        outcomes = blind["hard"][kind]["outcomes"]
        assert len(outcomes) == len(samples) and set(outcomes) <= {"0", "1"}
        assert outcomes.count("1") / len(samples) == pytest.approx(blind["hard"][kind]["accuracy"])
    assert (
        blind["hard"]["attribute_swap"]["outcomes"].count("0") > 0
    )  # swaps it cannot tell apart (or only by "a"/"an")
    assert res["zero_shot"]["shape"]["accuracy"] == 1.0 and res["zero_shot"]["colour"]["accuracy"] == 1.0
    other = "simple" if world == "default" else "default"
    write_shards(tmp_path / other, 2, seed=2, split="test", world=other)
    with pytest.raises(ValueError, match="the samples must come from one world"):
        evaluate_synthetic(Oracle(), samples + read_samples(tmp_path / other))


# -------------------------------------------------------------------------------------- checkpoint checks
def test_loads_training_checkpoint_with_module_prefix(checkpoint, tiny_models):
    loaded = load_model(TINY, str(checkpoint))
    reference = open_clip.create_model(TINY)
    open_clip.load_checkpoint(reference, str(checkpoint))
    for (k, v), (k2, v2) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert any("params.txt" in n for n in loaded.notes)


def test_refuses_missing_unexpected_and_misshapen_keys(tmp_path, tiny_models, capsys, sugarcrepe):
    model = open_clip.create_model(TINY)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "text_projection"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys 1 \(text_projection\)"):
        load_model(TINY, str(tmp_path / "missing.pt"))
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys 1 \(extra.weight\)"):
        load_model(TINY, str(tmp_path / "extra.pt"))
    wide = open_clip.create_model(TINY_WIDE)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointMismatchError, match="does not fit --model"):
        load_model(TINY, str(tmp_path / "wide.pt"))
    ann, images, _ = sugarcrepe
    rc, _ = _run(["--model", TINY, "--pretrained", str(tmp_path / "wide.pt"), "--sugarcrepe", str(ann),
                  "--coco-images", str(images)], tmp_path / "out")  # fmt: skip
    assert rc == 3 and "refusing the checkpoint" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"--pretrained: expected a checkpoint file or a pretrained tag, got .* \(not a file\)"
    ):
        load_model(TINY, str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_model(TINY, "laion2b")


def test_refuses_quick_gelu_mismatch(tmp_path, tiny_models):
    torch.manual_seed(1)
    qg = open_clip.create_model(TINY_QG)
    ckpt = _save_train_checkpoint(qg, tmp_path / "logs" / "qg" / "checkpoints" / "epoch_2.pt", TINY_QG)
    # same parameter names and shapes: a strict load succeeds, only the activation differs
    plain = open_clip.create_model(TINY)
    assert set(plain.state_dict()) == set(qg.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"trained with QuickGELU but --model .* uses GELU"):
        load_model(TINY, str(ckpt))
    assert load_model(TINY_QG, str(ckpt)).quick_gelu is True
    assert load_model(TINY, str(ckpt), force_quick_gelu=True).quick_gelu is True
    # a GELU run loaded as the QuickGELU config
    gelu = _save_train_checkpoint(plain, tmp_path / "logs" / "g" / "checkpoints" / "epoch_1.pt", TINY)
    with pytest.raises(CheckpointMismatchError, match=r"trained with GELU but --model .* uses QuickGELU"):
        load_model(TINY_QG, str(gelu))
    # an OpenAI-format state dict (carries input_resolution etc.) is QuickGELU
    openai_state = {**plain.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                    "vocab_size": torch.tensor(49408)}  # fmt: skip
    torch.save(openai_state, tmp_path / "openai.pt")
    with pytest.raises(CheckpointMismatchError, match="QuickGELU"):
        load_model(TINY, str(tmp_path / "openai.pt"))
    loaded = load_model(TINY_QG, str(tmp_path / "openai.pt"))  # the matching config loads it
    assert torch.equal(loaded.model.text_projection, plain.text_projection)


def test_layout_labels_depend_on_the_image_not_on_which_group_the_caption_names_first():
    from slipform_plugin.evaluation.synthetic import layout_labels

    red, blue = {"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}  # red precedes blue
    left = layout_labels({"subject": red, "relation": "to the left of", "reference": blue})
    right = layout_labels({"subject": blue, "relation": "to the right of", "reference": red})  # the same image
    assert left == right == {"relation_axis": "horizontal", "relation_by_colour": "to the left of"}
    below = layout_labels({"subject": blue, "relation": "above", "reference": red})
    assert below == {"relation_axis": "vertical", "relation_by_colour": "below"}


def test_layout_probe_decodes_the_axis_when_only_the_axis_is_encoded():
    """Features that encode the axis and not which colour is where: axis 100%, relation by colour near half."""
    from slipform_plugin.evaluation.synthetic import layout_labels, layout_probe

    rng = np.random.default_rng(1)
    relations = ["to the left of", "to the right of", "above", "below"]
    colours = ["red", "green", "blue", "white"]
    scenes = []
    for i in range(240):
        first, second = rng.choice(colours, size=2, replace=False)
        scenes.append(
            {"subject": {"colour": str(first)}, "relation": relations[i % 4], "reference": {"colour": str(second)}}
        )
    axis = np.array([[1.0, 0.0] if layout_labels(s)["relation_axis"] == "horizontal" else [0.0, 1.0] for s in scenes])
    features = np.concatenate([3.0 * axis, rng.normal(size=(240, 12))], axis=1)
    result = layout_probe(features, scenes)
    assert result["n"] == 240 and result["relation_axis"]["accuracy"] == 1.0
    assert result["relation_by_colour"]["classes"] == 4
    assert 0.3 < result["relation_by_colour"]["accuracy"] < 0.7  # the axis halves the four classes, no more


def test_perception_probe_decodes_what_the_features_encode_and_nothing_else():
    """Shape is written into the features, colour is not: the held-out fold must tell them apart."""
    from slipform_plugin.evaluation.synthetic import perception_probe

    rng = np.random.default_rng(0)
    shapes, colours = ["circle", "square", "star"], ["red", "green", "blue", "white"]
    subjects = [
        {"shape": shapes[i % 3], "colour": colours[int(rng.integers(4))], "size": ["small", "large"][i % 2],
         "material": "matte", "texture": "solid"}
        for i in range(200)
    ]  # fmt: skip
    noise = rng.normal(size=(200, 16))
    features = np.concatenate([np.eye(3)[[shapes.index(s["shape"]) for s in subjects]] * 3.0, noise], axis=1)
    result = perception_probe(features, subjects)
    assert result["n"] == 200 and result["shape"]["classes"] == 3
    assert result["shape"]["accuracy"] == 1.0
    assert result["colour"]["accuracy"] < 0.45 and result["colour"]["classes"] == 4
    # size alternates with the index, and the folds split by index parity: the probe must not see the test fold
    assert result["size"]["accuracy"] <= 0.5
    assert "material" not in result and "texture" not in result  # one value only: nothing to decode
