"""ConcretePlant: concreteness-ranked hard negatives for image captions.

``ConcretePlant(num_negatives=3, seed=0, kinds=None, spacy_model=None).plant(captions, keys)`` returns up to K
:class:`~slipform_plugin.hard_negatives.HardNegative` per caption. Importing this package loads neither spaCy
nor the norms; both load on first use, once per process.
"""

from __future__ import annotations

from slipform_plugin.concreteplant.plant import ConcretePlant, create_from_args, parse_kind_weights, parse_kinds
from slipform_plugin.hard_negatives import HardNegative

__all__ = ["ConcretePlant", "HardNegative", "create_from_args", "parse_kind_weights", "parse_kinds"]
