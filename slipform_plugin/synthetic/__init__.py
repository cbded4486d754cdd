"""Synthetic compositional scenes: rendered images with captions, hard captions and held-out combinations.

A caption names two groups of identical objects and their relation, every attribute stated::

    two small red matte striped circles to the left of a large blue metallic solid square

(shapes: circle, square, triangle, diamond, star, cross; 8 colours; small/large; matte/metallic;
solid/striped/dotted; left of, right of, above, below; counts 1 to 3), with zero to two undescribed
distractors in the image. Shards for training and the test split of the benchmark::

    slipform make-shards data/train --num 20000                # prints --train-data '...' --train-num-samples
    slipform make-shards data/test --num 1000 --split test     # same seed: same held-out rule
    slipform eval --model slipform-tiny --pretrained CKPT --synthetic data/test --out results

Public API:

- :func:`make_item` -- item ``index`` of a ``(seed, split)``: image, caption, hard captions, metadata;
- :func:`write_shards` -- WebDataset shards of items (``slipform make-shards``);
- :class:`HeldOut` -- the combinations the ``train`` split never contains;
- the vocabulary: :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`MATERIALS`, :data:`TEXTURES`,
  :data:`RELATIONS` and :data:`HARD_KINDS`.
"""

from slipform_plugin.synthetic.dataset import SyntheticItem, make_item
from slipform_plugin.synthetic.scene import (
    COLOURS,
    HARD_KINDS,
    MATERIALS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    HeldOut,
    Scene,
)
from slipform_plugin.synthetic.shards import ShardSummary, write_shards

__all__ = [
    "COLOURS",
    "HARD_KINDS",
    "MATERIALS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "HeldOut",
    "Scene",
    "ShardSummary",
    "SyntheticItem",
    "make_item",
    "write_shards",
]
