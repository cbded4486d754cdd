"""Ablation generators for the synthetic experiment (``--hn concreteplant-uniform``).

:class:`UniformConcretePlant` makes exactly ConcretePlant's candidates (same parser, same operations, same
kinds, each negative keeping its own concreteness score for the loss) but draws the K negatives *without*
looking at concreteness: a kind is drawn as ConcretePlant draws it (uniformly among the kinds the caption
has candidates of, by default), then a candidate uniformly within that kind. ConcretePlant instead weights
candidates within a kind by ``floor + score ** 6`` and keeps low-concreteness candidates as a second tier.
Both draw a kind by the same rule, but ConcretePlant's tiers change which kinds it ends up with, so the two
mixes of kinds differ (in ``pair-relations`` the uniform draw plants three times as many shape changes).
This is the concreteness ablation (d) of ``slipform experiment``. :class:`KindMatchedUniformConcretePlant`
(``--hn concreteplant-uniform-kinds``, the experiment's dk) keeps ConcretePlant's kinds caption by caption
and draws only the word within each kind uniformly.

Like ConcretePlant it is deterministic for ``(seed, sample key)``, pickles without its spaCy pipeline and
never raises on a bad caption. :func:`plant_shards` plants it (or any generator) into shards offline.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slipform_plugin.concreteplant import ConcretePlant, sampling
from slipform_plugin.concreteplant.plant import generator_kwargs
from slipform_plugin.hard_negatives import HardNegative

logger = logging.getLogger("slipform")


def sample_uniform(candidates: Sequence[Any], k: int, rng: random.Random, kind_weights: Mapping[str, float]) -> list:
    """Up to ``k`` candidates with distinct texts: kind by ``kind_weights``, then uniform within the kind.

    ``candidates`` are objects with ``kind``, ``text`` and optionally ``primary`` (non-primary variants are
    skipped, as ConcretePlant's sampler does). Scores are ignored.
    """
    usable = [c for c in candidates if getattr(c, "primary", True) and kind_weights.get(c.kind, 0.0) > 0.0]
    by_kind: dict[str, list] = {}
    for candidate in usable:
        by_kind.setdefault(candidate.kind, []).append(candidate)
    chosen: list = []
    texts: set[str] = set()
    while len(chosen) < k and by_kind:
        kinds = sorted(by_kind)
        kind = rng.choices(kinds, weights=[kind_weights[name] for name in kinds])[0]
        pool = by_kind[kind]
        candidate = pool.pop(rng.randrange(len(pool)))
        if not pool:
            del by_kind[kind]
        if candidate.text in texts:
            continue
        texts.add(candidate.text)
        chosen.append(candidate)
    return chosen


class UniformConcretePlant(ConcretePlant):
    """ConcretePlant's candidates, K of them drawn uniformly within each kind (no concreteness weighting).

    Same arguments as :class:`~slipform_plugin.concreteplant.ConcretePlant`. ``stats`` counts as there. Only the
    selection hook :meth:`_select` differs; everything else is ConcretePlant's own code.
    """

    def __repr__(self) -> str:
        return super().__repr__().replace("ConcretePlant(", "UniformConcretePlant(", 1)

    def _select(self, found: list, key: str, caption: str) -> list:
        """Up to ``num_negatives`` candidates: kind by ``kind_weights``, then uniform within the kind."""
        rng = sampling.caption_rng(self.seed, key, "sample-uniform")
        return sample_uniform(found, self.num_negatives, rng, self.kind_weights)


def sample_uniform_of_kinds(
    candidates: Sequence[Any], kinds: Sequence[str], rng: random.Random, caption: str = ""
) -> list:
    """One candidate per entry of ``kinds``, drawn uniformly among that kind's candidates (distinct texts, none
    equal to ``caption``); a kind with no candidate left gives none. Scores are ignored.

    ``candidates`` are objects with ``kind``, ``text`` and optionally ``primary`` (non-primary variants are
    skipped, as both samplers do).
    """
    by_kind: dict[str, list] = {}
    for candidate in candidates:
        if getattr(candidate, "primary", True):
            by_kind.setdefault(candidate.kind, []).append(candidate)
    chosen: list = []
    texts: set[str] = {caption.strip().lower()}
    for kind in kinds:
        pool = by_kind.get(kind, [])
        while pool:
            candidate = pool.pop(rng.randrange(len(pool)))
            key = candidate.text.strip().lower()
            if key and key not in texts:
                texts.add(key)
                chosen.append(candidate)
                break
    return chosen


class KindMatchedUniformConcretePlant(ConcretePlant):
    """ConcretePlant's kinds, a uniform word within each: the concreteness ablation without its change of kinds.

    For every caption it first makes ConcretePlant's own draw (same seed, so the same kinds, in the same
    number), then replaces each drawn negative by a candidate of the same kind drawn uniformly, ignoring
    concreteness. :class:`UniformConcretePlant` also draws the kinds without ConcretePlant's preference for
    concrete candidates, which changes the mix of kinds (in ``pair-relations`` it plants three times as many
    shape changes); this generator keeps the mix, so that only *which word* a negative changes differs.
    """

    def __repr__(self) -> str:
        return super().__repr__().replace("ConcretePlant(", "KindMatchedUniformConcretePlant(", 1)

    def _select(self, found: list, key: str, caption: str) -> list:
        """ConcretePlant's kinds for this caption, then a uniform candidate of each."""
        kinds = [candidate.kind for candidate in super()._select(found, key, caption)]
        rng = sampling.caption_rng(self.seed, key, "sample-uniform-kinds")
        return sample_uniform_of_kinds(found, kinds, rng, caption)


def create_kind_matched_uniform_concreteplant(args: Any) -> KindMatchedUniformConcretePlant:
    """Entry point ``slipform.hard_negatives: concreteplant-uniform-kinds``, built from OpenCLIP's ``--hn-*`` flags."""
    return KindMatchedUniformConcretePlant(**generator_kwargs(args))


def create_uniform_concreteplant(args: Any) -> UniformConcretePlant:
    """Entry point ``slipform.hard_negatives: concreteplant-uniform``, built from OpenCLIP's ``--hn-*`` flags."""
    return UniformConcretePlant(**generator_kwargs(args))


def plant_shards(generator: Any, shards: Sequence[Path], out_dir: Path, batch_size: int = 256) -> dict[str, int]:
    """Write ``out_dir/<shard>`` with ``<key>.hn.json`` from ``generator`` for every shard; returns summed counts.

    One process, shards in order (``slipform plant``'s writer, so the files are what ``slipform plant`` writes).
    """
    from slipform_plugin.concreteplant.offline import plant_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    totals: dict[str, int] = {}
    for shard in shards:
        record = plant_shard(generator, Path(shard), out_dir, batch_size=batch_size)
        for name, value in record["counts"].items():
            totals[name] = totals.get(name, 0) + int(value)
    return totals


#: the synthetic benchmark's hard-caption kinds -> the hard-negative kinds the data path knows
SYNTHETIC_TO_HN_KIND: dict[str, str] = {
    "attribute_swap": "swap_attributes",
    "object_swap": "swap_objects",
    "relation_swap": "replace_relation",
    "attribute_replace": "replace_attribute",
    "object_replace": "replace_object",
    "count_change": "change_count",
}


class SyntheticOracleNegatives:
    """A diagnostic, not a method: the synthetic generator's own hard captions of each *training* item.

    For a training key, K of the six in-domain hard captions stored in its metadata (one per kind, drawn
    uniformly, deterministic for ``(seed, key)``), each with the fixed ``score``. It shows what the losses can
    learn at the experiment's budget when the negatives match the test's kinds exactly (an upper bound for any
    caption-only generator); the held-out combinations still never occur in training.

    Args:
        hard_by_key: sample key -> the ``hard`` mapping of its ``.json`` metadata.
        num_negatives: K.
        seed: with the key, fixes the draw.
        score: the concreteness score given to every negative (Cement's ``c_ik``).
    """

    def __init__(
        self, hard_by_key: Mapping[str, Mapping[str, Any]], num_negatives: int = 3, seed: int = 0, score: float = 0.5
    ) -> None:
        self.hard_by_key = dict(hard_by_key)
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.score = float(score)

    @classmethod
    def from_shards(cls, shards: Sequence[Path], num_negatives: int = 3, seed: int = 0) -> SyntheticOracleNegatives:
        """Read the hard captions of every sample of ``shards`` (written by ``slipform make-shards``)."""
        import json
        import tarfile

        hard: dict[str, Mapping[str, Any]] = {}
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if member.isfile() and ext == "json":
                        hard[key] = json.loads(tar.extractfile(member).read())["hard"]  # type: ignore[union-attr]
        return cls(hard, num_negatives, seed)

    def plant(self, captions: Sequence[Any], keys: Sequence[Any]) -> list[list[HardNegative]]:
        """Up to K stored hard captions per key (none for an unknown key)."""
        results = []
        for caption, key in zip(captions, keys, strict=True):
            stored = self.hard_by_key.get(str(key), {})
            kinds = sorted(kind for kind in stored if kind in SYNTHETIC_TO_HN_KIND)
            rng = sampling.caption_rng(self.seed, str(key), "oracle")
            chosen = rng.sample(kinds, min(self.num_negatives, len(kinds)))
            results.append(
                [
                    HardNegative(stored[kind]["caption"], SYNTHETIC_TO_HN_KIND[kind], self.score)
                    for kind in chosen
                    if stored[kind]["caption"] != caption
                ]
            )
        return results
