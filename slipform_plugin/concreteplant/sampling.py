"""Seeding and sampling: which K candidates become the caption's negatives.

The random stream of a caption depends only on ``(seed, key)`` through a stable hash (never Python's salted
``hash``), so a sample gets the same negatives whatever the batch it is parsed in, the worker that parses it
or the number of workers.

Sampling, without replacement and up to K distinct texts: a kind is drawn among the kinds the caption still
has candidates of, in proportion to its weight (uniform by default, so no kind dominates because it is
common); within the kind, a candidate is drawn with weight ``floor + score ** power``, rising steeply with the
concreteness percentile of what it changes. Candidates whose percentile is under :data:`PREFERRED_MIN_SCORE`
(changes of rather abstract words: "area", "made") are drawn only when the caption has fewer than K others,
unless ``first_tier`` says otherwise (``ConcretePlant(first_tier_rating=...)``: a change whose every side is
rated concrete in absolute terms stays first-tier whatever its rank within its part of speech).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence

from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS

#: Within-kind weight = SCORE_FLOOR + score ** SCORE_POWER.
SCORE_POWER = 6.0
SCORE_FLOOR = 0.005
#: Candidates under this within-POS percentile are a second tier, used only to reach K.
PREFERRED_MIN_SCORE = 0.4


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text (identical across processes and Python versions)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8", "replace"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def caption_rng(seed: int, key: str, purpose: str) -> random.Random:
    return random.Random(stable_seed(seed, key, purpose))


def default_kind_weights() -> dict[str, float]:
    return {kind: 1.0 for kind in HARD_NEGATIVE_KINDS}


def sample(
    candidates: Sequence,
    k: int,
    rng: random.Random,
    kind_weights: Mapping[str, float],
    caption: str = "",
    first_tier: Callable[[object], bool] | None = None,
) -> list:
    """Up to ``k`` candidates with distinct texts, none equal to ``caption`` (ignoring case and outer spaces).

    Candidates are objects with ``kind``, ``score`` and ``text`` (read only for the drawn ones).
    ``first_tier``, if given, marks candidates that are first-tier even with a score under
    :data:`PREFERRED_MIN_SCORE`; the within-kind weights still come from the scores.
    """
    usable = [c for c in candidates if getattr(c, "primary", True) and kind_weights.get(c.kind, 0.0) > 0.0]
    chosen: list = []
    texts: set[str] = {caption.strip().lower()}
    preferred, rest = [], []
    for candidate in usable:
        is_preferred = candidate.score >= PREFERRED_MIN_SCORE or (first_tier is not None and first_tier(candidate))
        (preferred if is_preferred else rest).append(candidate)
    _sample_into(chosen, texts, preferred, k, rng, kind_weights)
    if len(chosen) < k:
        _sample_into(chosen, texts, rest, k, rng, kind_weights)
    return chosen


def _sample_into(chosen: list, texts: set, candidates: list, k: int, rng: random.Random, kind_weights) -> None:
    by_kind: dict[str, list] = {}
    for candidate in candidates:
        by_kind.setdefault(candidate.kind, []).append(candidate)
    while len(chosen) < k and by_kind:
        kinds = sorted(by_kind)
        kind = rng.choices(kinds, weights=[kind_weights[name] for name in kinds])[0]
        pool = by_kind[kind]
        weights = [SCORE_FLOOR + float(c.score) ** SCORE_POWER for c in pool]
        index = rng.choices(range(len(pool)), weights=weights)[0]
        candidate = pool.pop(index)
        if not pool:
            del by_kind[kind]
        key = candidate.text.strip().lower()
        if not key or key in texts:
            continue
        texts.add(key)
        chosen.append(candidate)
