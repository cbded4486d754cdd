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

from slipform_plugin.synthetic.render import render_array
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
)

MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class SyntheticItem:
    """One sample: ``image`` is ``uint8 [S, S, 3]``; ``meta`` is the JSON stored beside the caption."""

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


def make_item(seed: int, split: str, index: int, image_size: int = 64, world: str | World = "default") -> SyntheticItem:
    """Item ``index`` of the ``split`` split of ``world`` (a name in ``WORLDS``) generated from ``seed``
    (held-out rule included)."""
    check_args(seed, split, image_size)
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
    hard = hard_captions(scene, rng, world)
    image = render_array(scene, image_size, background=rng.randint(20, 45))
    key = f"{split}{index:09d}"
    caption = scene.caption()
    meta = {
        "key": key,
        "seed": seed,
        "split": split,
        "world": world.name,
        "index": index,
        "caption": caption,
        "hard": hard,
        "scene": scene.to_json(),
    }
    return SyntheticItem(key, image, caption, hard, scene, meta)
