"""The synthetic compositional benchmark: test shards from ``slipform make-shards --split test``.

Metrics (all from the test split's stored metadata):

- ``hard``: image-to-text accuracy per hard-caption kind (the true caption scored strictly above that kind's
  hard caption), on all items and separately on items with and without a held-out combination; ``all_kinds``
  is the fraction of items whose true caption beats all six hard captions at once; attribute swap and replace
  are also broken down by the attribute that changed (``by_attribute``). Attribute swap against
  attribute replace is the bag-of-words test: a model that ignores binding does well on replace only.
  Each kind also reports ``text_cosine``, the mean cosine of the true and the hard caption in the text
  tower's own space (near 1 when the text tower cannot tell them apart, whatever the image tower sees), and
  ``image_gap``, the mean of ``x.y - x.h`` over the items (how far, in cosine, the image prefers its caption),
  and ``outcomes``, each item's result in sample order as a string of ``1`` and ``0`` (so two checkpoints
  scored on one split can be compared item by item: ``slipform compare``'s test-split sd).
- ``retrieval``: image-to-text and text-to-image R@1 and R@5 over the test images and their true captions
  (a retrieved caption or image counts when its caption text equals the query's, so duplicates are fair),
  with each query's rank-1 hit as ``outcomes@1``.
- ``zero_shot``: shape and colour classification of the subject alone (its objects re-rendered from the stored
  layout without the reference and distractors), with one class embedding per value: the mean embedding of
  the noun phrases "a <size> <colour> <material> <texture> <shape>" over all values of the other attributes
  in the samples' world.
- ``perception``: a linear probe of the same subject features (ridge classifier, two folds) for shape, colour,
  size, material and texture: whether the image tower encodes an attribute at all, with no text involved.
- ``layout``: the same probe on the whole scene's image features for where the two groups are: the relation's
  axis, and the relation of the group with the first colour to the other (:func:`layout_labels`): whether the
  tower encodes what a relation swap asks about.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from slipform_plugin.evaluation.core import ChoiceItem, Encoder, LazyImage, accuracy_by_group, choice_correct
from slipform_plugin.synthetic.scene import (
    COLOURS,
    HARD_KINDS,
    RELATIONS,
    SHAPES,
    Placed,
    World,
    get_world,
    rel_is_horizontal,
)

_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def shard_paths(source: str | Path) -> list[Path]:
    """The tar files named by ``source``: a directory (its ``*.tar``), one tar, a brace pattern or a glob."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
    elif path.is_file():
        paths = [path]
    else:
        import braceexpand

        paths = sorted({Path(p) for pattern in braceexpand.braceexpand(text) for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"--synthetic: no shards found at {text!r} (expected a directory, tar or pattern)")
    return paths


def read_samples(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Samples ``{"key", "image_bytes", "caption", "meta"}`` from test shards, in shard order."""
    samples: list[dict[str, Any]] = []
    for path in shard_paths(source):
        grouped: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member)
                    grouped.setdefault(key, {})[ext.lower()] = data.read() if data else b""
        except tarfile.TarError as err:
            raise ValueError(f"--synthetic: {path} is not a readable tar file ({err})") from err
        for key, parts in grouped.items():
            image_ext = next((e for e in _IMAGE_EXTS if e in parts), None)
            if image_ext is None or "json" not in parts:
                raise ValueError(f"--synthetic: sample {key!r} in {path.name} lacks an image or its .json metadata")
            meta = json.loads(parts["json"])
            if "hard" not in meta or "scene" not in meta:
                raise ValueError(
                    f"--synthetic: sample {key!r} in {path.name} has no hard captions; "
                    "write the benchmark with `slipform make-shards OUT --split test`"
                )
            samples.append({"key": key, "image_bytes": parts[image_ext], "caption": meta["caption"], "meta": meta})
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def _decoder(data: bytes):
    def load():
        from PIL import Image

        return Image.open(io.BytesIO(data))

    return load


def _subject_render(meta: dict[str, Any], image_size: int):
    def load():
        from PIL import Image

        from slipform_plugin.synthetic.render import render_objects

        objects = [Placed(**o) for o in meta["scene"]["objects"] if o["role"] == "subject"]
        return Image.fromarray(render_objects(objects, image_size), "RGB")

    return load


def _class_embeddings(encoder: Encoder, attribute: str, world: World) -> tuple[list[str], Any]:
    """``(values, [len(values), D])``: per value, the normalised mean embedding of its noun phrases in ``world``."""
    import torch

    values = {"shape": SHAPES, "colour": tuple(COLOURS)}[attribute]
    embeddings = []
    for value in values:
        phrases = []
        for size, colour, material, texture, shape in itertools.product(
            world.sizes, COLOURS if attribute != "colour" else (value,), world.materials, world.textures,
            SHAPES if attribute != "shape" else (value,),
        ):  # fmt: skip
            article = "an" if size[0] in "aeiou" else "a"
            phrases.append(f"{article} {size} {colour} {material} {texture} {shape}")
        mean = encoder.texts(phrases).mean(0)
        embeddings.append(mean / mean.norm())
    return list(values), torch.stack(embeddings)


#: the attributes the perception probe decodes from the subject's image features
PROBED_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "material", "texture")
#: ridge penalty of the probe (features are L2-normalised, so X^T X has trace n)
PROBE_RIDGE = 0.1


def linear_probe(features: np.ndarray, labels: list[str]) -> dict[str, Any] | None:
    """Two-fold ridge-regression classifier of ``labels`` from ``features [N, D]`` (one-hot targets, bias,
    penalty :data:`PROBE_RIDGE`; fitted on the even positions and scored on the odd ones, then the other way
    round). Returns ``{"accuracy", "majority", "classes"}``, or None when there is one label value or fewer
    than 4 items."""
    values = sorted(set(labels))
    if len(values) < 2 or len(features) < 4:
        return None
    features = np.asarray(features, dtype=np.float64)
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    folds = (np.arange(len(features)) % 2 == 0, np.arange(len(features)) % 2 == 1)
    index = np.array([values.index(label) for label in labels])
    targets = np.eye(len(values))[index]
    correct = []
    for train, test in (folds, folds[::-1]):
        x = design[train]
        weights = np.linalg.solve(x.T @ x + PROBE_RIDGE * np.eye(x.shape[1]), x.T @ targets[train])
        correct.append(float((np.argmax(design[test] @ weights, axis=1) == index[test]).mean()))
    return {
        "accuracy": float(np.mean(correct)),
        "majority": float(np.bincount(index).max() / len(index)),
        "classes": len(values),
    }


def layout_labels(scene: dict[str, Any]) -> dict[str, str]:
    """What a scene's image alone says about where its two groups are, as probe labels.

    ``relation_axis``: ``horizontal`` (left/right) or ``vertical`` (above/below). ``relation_by_colour``: the
    relation of the group whose colour comes first in :data:`~slipform_plugin.synthetic.scene.COLOURS` to the
    other group; unlike the caption's relation it does not depend on which group the caption names first,
    so it is a function of the image, and decoding it takes binding each colour to its position.
    """
    relation = scene["relation"]
    colours = list(COLOURS)
    subject_first = colours.index(scene["subject"]["colour"]) < colours.index(scene["reference"]["colour"])
    return {
        "relation_axis": "horizontal" if rel_is_horizontal(relation) else "vertical",
        "relation_by_colour": relation if subject_first else RELATIONS[relation],
    }


def layout_probe(features: np.ndarray, scenes: list[dict[str, Any]]) -> dict[str, Any]:
    """Linear decodability of the scene layout (:func:`layout_labels`) from whole-image features ``[N, D]``.

    Returns ``{label: {"accuracy", "majority", "classes"}, "n": N}`` (labels with a single value left out)."""
    labels = [layout_labels(scene) for scene in scenes]
    result: dict[str, Any] = {}
    for name in ("relation_axis", "relation_by_colour"):
        probed = linear_probe(features, [item[name] for item in labels])
        if probed is not None:
            result[name] = probed
    result["n"] = len(features)
    return result


def perception_probe(features: np.ndarray, subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """Linear decodability of each attribute from image features alone: what the image tower perceives.

    A ridge-regression classifier (one-hot targets, bias, penalty :data:`PROBE_RIDGE`) is fitted on one half of
    the items (even positions) and scored on the other (odd), then the other way round; the accuracy is the
    mean of both folds. No text is involved, so a low probe accuracy means the tower does not encode the
    attribute, and no caption, negative or loss can bind it. Attributes with a single value in the samples (the
    simple world's material and texture) are left out.

    Args:
        features: ``[N, D]`` image features of the subject rendered alone.
        subjects: per item, the subject group's attributes (``shape``, ``colour``, ``size``, ...).
    Returns:
        ``{attribute: {"accuracy", "majority", "classes"}, "n": N}``; ``majority`` is the share of the most common
        value, the accuracy of a probe that ignores the image.
    """
    result: dict[str, Any] = {}
    for attribute in PROBED_ATTRIBUTES:
        probed = linear_probe(features, [str(subject[attribute]) for subject in subjects])
        if probed is not None:
            result[attribute] = probed
    result["n"] = len(features)
    return result


def outcome_bits(correct: np.ndarray) -> str:
    """Per-item outcomes ``[N]`` (bool) as a string of ``"1"`` and ``"0"`` in sample order (for eval.json)."""
    return "".join("1" if value else "0" for value in np.asarray(correct, dtype=bool).tolist())


def _recall(sims: np.ndarray, query_labels: list[str], target_labels: list[str], ks: Iterable[int]) -> dict:
    """R@k of ``sims`` ``[Q, T]``, and each query's hit at rank 1 as ``"outcomes@1"`` (:func:`outcome_bits`)."""
    order = np.argsort(-sims, axis=1)
    targets = np.asarray(target_labels)
    hits = targets[order] == np.asarray(query_labels)[:, None]
    return {**{f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}, "outcomes@1": outcome_bits(hits[:, 0])}


def evaluate_synthetic(encoder: Encoder, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """All synthetic metrics (see the module docstring) for samples from :func:`read_samples`."""
    if not samples:
        raise ValueError("--synthetic: no samples to evaluate")
    images = [LazyImage(("synthetic", s["key"]), _decoder(s["image_bytes"])) for s in samples]
    heldout = np.array([bool(s["meta"]["scene"]["heldout"]) for s in samples])
    captions = [s["caption"] for s in samples]
    image_feats = encoder.images(images).numpy()  # [N, D], encoded once (the encoder caches them for the items)
    text_feats = encoder.texts(captions).numpy()  # [N, D]

    hard: dict[str, Any] = {}
    all_correct = np.ones(len(samples), dtype=bool)
    for kind in HARD_KINDS:
        items = [
            ChoiceItem(img, [s["caption"], s["meta"]["hard"][kind]["caption"]], kind) for img, s in zip(images, samples)
        ]
        correct = choice_correct(encoder, items)
        all_correct &= correct
        hard_feats = encoder.texts([s["meta"]["hard"][kind]["caption"] for s in samples]).numpy()
        hard[kind] = {
            "accuracy": float(correct.mean()),
            "text_cosine": float((text_feats * hard_feats).sum(1).mean()),
            "image_gap": float((image_feats * (text_feats - hard_feats)).sum(1).mean()),
            "accuracy_seen": float(correct[~heldout].mean()) if (~heldout).any() else None,
            "accuracy_heldout": float(correct[heldout].mean()) if heldout.any() else None,
            "n": len(items),
            "outcomes": outcome_bits(correct),
        }
        if kind in ("attribute_swap", "attribute_replace"):  # which attribute changed: colour, size, ...
            changed = [s["meta"]["hard"][kind]["attribute"] for s in samples]
            hard[kind]["by_attribute"] = accuracy_by_group(correct, changed)
    hard["all_kinds"] = {
        "accuracy": float(all_correct.mean()),
        "accuracy_seen": float(all_correct[~heldout].mean()) if (~heldout).any() else None,
        "accuracy_heldout": float(all_correct[heldout].mean()) if heldout.any() else None,
        "n": len(samples),
    }

    sims = image_feats @ text_feats.T
    retrieval = {
        "image_to_text": _recall(sims, captions, captions, (1, 5)),
        "text_to_image": _recall(sims.T, captions, captions, (1, 5)),
        "n": len(samples),
    }

    zero_shot = {}
    size = _image_size(samples[0])
    subject_images = [LazyImage(("subject", s["key"]), _subject_render(s["meta"], size)) for s in samples]
    subject_feats = encoder.images(subject_images).numpy()
    worlds = sorted({s["meta"].get("world", "default") for s in samples})
    if len(worlds) != 1:
        raise ValueError(f"--synthetic: the samples must come from one world, got {', '.join(worlds)}")
    world = get_world(worlds[0])
    for attribute in ("shape", "colour"):
        values, class_feats = _class_embeddings(encoder, attribute, world)
        predicted = np.argmax(subject_feats @ class_feats.numpy().T, axis=1)
        truth = np.array([values.index(s["meta"]["scene"]["subject"][attribute]) for s in samples])
        zero_shot[attribute] = {"accuracy": float((predicted == truth).mean()), "classes": len(values)}
    zero_shot["n"] = len(samples)
    perception = perception_probe(subject_feats, [s["meta"]["scene"]["subject"] for s in samples])
    layout = layout_probe(image_feats, [s["meta"]["scene"] for s in samples])
    return {
        "hard": hard,
        "retrieval": retrieval,
        "zero_shot": zero_shot,
        "perception": perception,
        "layout": layout,
        "n": len(samples),
        "n_heldout": int(heldout.sum()),
    }


def _image_size(sample: dict[str, Any]) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(sample["image_bytes"])) as img:
        return int(img.size[0])
