"""ConcretePlant: concreteness-ranked hard negatives for image captions.

``ConcretePlant(num_negatives=3, seed=0, kinds=None, spacy_model=None).plant(captions, keys)`` returns up to K
:class:`~slipform_plugin.hard_negatives.HardNegative` per caption. Importing this package loads neither spaCy
nor the norms; both load on first use, once per process. ``ConcretePlant(..., vocabulary=corpus_vocabulary(captions))``
draws every replacement word from a training corpus.
"""

from __future__ import annotations

from slipform_plugin.concreteplant.corpus import corpus_vocabulary, read_vocabulary_file, write_vocabulary_file
from slipform_plugin.concreteplant.plant import (
    ConcretePlant,
    check_kind_weights,
    create_from_args,
    parse_kind_weights,
    parse_kinds,
)
from slipform_plugin.hard_negatives import HardNegative

__all__ = [
    "ConcretePlant",
    "HardNegative",
    "check_kind_weights",
    "corpus_vocabulary",
    "create_from_args",
    "parse_kind_weights",
    "parse_kinds",
    "read_vocabulary_file",
    "write_vocabulary_file",
]
