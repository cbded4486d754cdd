"""Deterministic synthetic items: scene, rendered image, true caption, hard captions and metadata.

Item ``index`` of ``(seed, split)`` depends on nothing else, so any item can be regenerated alone and shards
can be written in any order or in parallel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from slipform_plugin.synthetic.render import render_array, render_objects
from slipform_plugin.synthetic.scene import (
    SPLITS,
    HeldOut,
    LayoutError,
    Scene,
    World,
    get_world,
    hard_captions,
    layout_scene,
    sample_scene,
    with_ages,
)

MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class SyntheticItem:
    """One sample: ``image`` is ``uint8 [S, S, 3]``; ``meta`` is the JSON stored beside the caption.

    ``scene`` is the sampled scene; for a single-group item it is the scene whose subject the image shows.
    """

    key: str
    image: np.ndarray
    caption: str
    hard: dict[str, dict[str, Any]]
    scene: Scene
    meta: dict[str, Any]


@lru_cache(maxsize=64)
def heldout_for_seed(seed: int) -> HeldOut:
    """The held-out rule of ``seed`` (cached)."""
    return HeldOut.from_seed(seed)


def check_args(seed: int, split: str, image_size: int) -> None:
    """Raise ``ValueError`` naming the argument when one is out of range."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, 1024], got {image_size!r}")


def check_single_group_fraction(fraction: float, split: str) -> None:
    """Raise ``ValueError`` unless ``fraction`` is in [0, 1) and, when positive, ``split`` is ``train``."""
    if not isinstance(fraction, int | float) or not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"single_group_fraction must be a number in [0, 1), got {fraction!r}")
    if fraction > 0 and split != "train":
        raise ValueError(f"single_group_fraction applies to the train split only, got split {split!r}")


def is_single_group(seed: int, split: str, index: int, fraction: float) -> bool:
    """Whether training item ``index`` is a single-group item (its own random stream, so the other items are the
    same as with ``fraction = 0``)."""
    return fraction > 0 and random.Random(f"slipform-{seed}-{split}-{index}-single").random() < fraction


def make_item(
    seed: int,
    split: str,
    index: int,
    image_size: int = 64,
    world: str | World = "default",
    single_group_fraction: float = 0.0,
) -> SyntheticItem:
    """Item ``index`` of the ``split`` split of ``world`` (a name in ``WORLDS``) generated from ``seed``
    (held-out rule included).

    With ``single_group_fraction`` (train split only), that share of the items shows only the subject group of
    its scene, at the same place, captioned by the group's noun phrase alone ("two small red matte striped
    circles"): object-level captions of the kind real corpora mix with relational ones. Such an item has no
    hard captions (``meta["hard"]`` is empty), ``meta["single_group"]`` is true and its scene has no reference.
    """
    check_args(seed, split, image_size)
    check_single_group_fraction(single_group_fraction, split)
    world = get_world(world)
    rng = random.Random(f"slipform-{seed}-{split}-{index}")
    heldout = heldout_for_seed(seed)
    for _ in range(50):
        try:
            scene = layout_scene(sample_scene(rng, split, heldout, world), rng, image_size, world)
            break
        except LayoutError:
            continue
    else:
        raise LayoutError(f"no scene fitted a {image_size}px canvas in 50 tries; use a larger image_size")
    scene = with_ages(scene, random.Random(f"slipform-{seed}-{split}-{index}-ages"), world)  # own stream
    hard = hard_captions(scene, rng, world)  # drawn for every item, so the rng stream stays the same
    background = rng.randint(20, 45)
    key = f"{split}{index:09d}"
    single_group = is_single_group(seed, split, index, single_group_fraction)
    scene_json = scene.to_json()
    if single_group:
        image = render_objects([o for o in scene.objects if o.role == "subject"], image_size, background=background)
        caption = scene.subject.phrase()
        hard = {}
        own_tag = f"colour_shape:{scene.subject.colour} {scene.subject.shape}"
        scene_json.update(
            relation=None,
            reference=None,
            distractors=[],
            heldout=[tag for tag in scene_json["heldout"] if tag == own_tag],
            objects=[o for o in scene_json["objects"] if o["role"] == "subject"],
        )
    else:
        image = render_array(scene, image_size, background=background)
        caption = scene.caption()
    meta = {
        "key": key,
        "seed": seed,
        "split": split,
        "world": world.name,
        "index": index,
        "caption": caption,
        "hard": hard,
        "scene": scene_json,
    }
    if single_group:
        meta["single_group"] = True
    return SyntheticItem(key, image, caption, hard, scene, meta)
