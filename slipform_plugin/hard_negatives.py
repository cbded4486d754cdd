"""The hard-negative record shared by every generator, the data stage and the loss.

A generator (ConcretePlant, or a third-party one registered under the ``slipform.hard_negatives`` entry
point group) turns a caption into a list of :class:`HardNegative`. The data stage packs up to ``K`` of them
per sample next to the caption's tokens; the loss sees their features, their ``score`` and a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every kind of change a hard negative can carry, in a fixed order: the index is the id packed into batches.
HARD_NEGATIVE_KINDS: tuple[str, ...] = (
    "replace_object",
    "replace_attribute",
    "change_count",
    "replace_relation",
    "swap_attributes",
    "swap_objects",
    "other",
)
KIND_TO_ID: dict[str, int] = {kind: index for index, kind in enumerate(HARD_NEGATIVE_KINDS)}
#: Scales of a negative's concreteness ``score``: within its part of speech, or among all caption words
#: (``ConcretePlant(score_scale=...)``, ``--hn-score-scale``).
SCORE_SCALES: tuple[str, ...] = ("pos", "all")
DEFAULT_SCORE_SCALE = "pos"


@dataclass(frozen=True)
class HardNegative:
    """One negative caption made from a positive one.

    Attributes:
        text: the negative caption, never equal to the positive.
        kind: what was changed, one of :data:`HARD_NEGATIVE_KINDS`.
        score: the concreteness of the changed concept, in [0, 1]: its within-part-of-speech percentile, or
            with ``ConcretePlant(score_scale="all")`` its percentile among all caption words.
        span: ``(start, end)`` character offsets of the changed words in the *positive* caption.
    """

    text: str
    kind: str
    score: float
    span: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in KIND_TO_ID:
            raise ValueError(f"HardNegative.kind must be one of {HARD_NEGATIVE_KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"HardNegative.score must be in [0, 1], got {self.score!r}")

    def to_json(self) -> dict:
        """A JSON-ready dict (the form stored in ``hn.json`` beside a sample)."""
        return {"text": self.text, "kind": self.kind, "score": float(self.score), "span": list(self.span)}

    @classmethod
    def from_json(cls, record: dict) -> HardNegative:
        """Inverse of :meth:`to_json`."""
        span = record.get("span") or (0, 0)
        return cls(str(record["text"]), str(record["kind"]), float(record["score"]), (int(span[0]), int(span[1])))
