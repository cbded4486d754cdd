"""The operations: every hard negative a tagged caption can yield, each a named kind.

Input is a caption and its :class:`~slipform_plugin.concreteplant.parsing.Tok` list; output is a list of
:class:`Candidate`. Texts are built by character-span edits on the *original* caption, so whitespace,
punctuation and anything beyond the parsed prefix of a long caption survive unchanged.

Noun phrases are chunked from the tags (no dependency parser): a run of determiners, numerals, adjectives,
attributive participles and nouns, whose head is its last noun.

Targets:
- ``replace_object``: a noun (or a two-word noun of the norms, "fire hydrant") with a concreteness rating,
  replaced by another lemma of its category (``vocabulary.NOUN_CATEGORIES``), number kept, article fixed.
- ``replace_attribute``: an adjective, an attributive participle ("parked car"), a noun used as a modifier
  ("metal rail", "vegetable soup"), a colour or material noun, or an intransitive verb describing the
  subject's state ("a dog sitting on ..."), replaced within its category (colour, material, size, ...).
- ``change_count``: a numeral ("two" -> "four"), or "a"/"an"/"one" before a singular noun ("a dog" ->
  "three dogs"), the noun and a directly following "is"/"was"/"has"/verb made to agree.
- ``replace_relation``: a preposition (also "next to", "in front of", "on top of", "to the left of", always
  replaced as a whole phrase) or a verb, replaced within its category and inflected to the same tense and
  person. A spatial relation with a converse becomes its converse ("to the left of" -> "to the right of",
  "above" -> "below", "in front of" -> "behind": ``vocabulary.CONVERSE_RELATIONS``); the random relation of
  its category is then only a variant.
- ``swap_attributes``: the modifiers of two different noun phrases exchanged (single adjectives, or the
  whole pre-head modifier span: "black and white cat ... dead leaves" -> "dead cat ... black and white leaves").
  Same-role swaps first: when the phrases have attributes of the same role (``vocabulary.ATTRIBUTE_ROLES``:
  colour, size, material, pattern ...), only those are sampled ("two small red circles ... a large blue
  square" -> "two small blue circles ... a large red square", the binding swap).
- ``swap_objects``: two different noun phrases exchanged (heads, compounds, nominals without or with their
  determiners, "a slice of pizza"), never two phrases joined only by "and"/"," (a symmetric swap). Heads swap
  alone when the phrases have no modifiers or only attributes of known role (the shape binding swap).

With a corpus vocabulary (``allowed``), every replacement word (object, attribute, relation, number) is drawn
from it. Before chunking, :func:`retag` corrects the tags of stacked modifiers from the lexicon.

Scores are within-POS concreteness percentiles of what changed (the mean over both sides of a swap; the
counted noun for a count change). Variants kept only for completeness of the candidate list (``primary``
False) are never sampled.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from slipform_plugin.concreteplant import corpus
from slipform_plugin.concreteplant import lexicon as L
from slipform_plugin.concreteplant import vocabulary as V
from slipform_plugin.concreteplant.parsing import Tok

_CHUNK_POS = frozenset({"DET", "NUM", "ADJ", "NOUN", "PROPN"})
_NOUN_POS = frozenset({"NOUN", "PROPN"})
_DETERMINERS = frozenset(
    [
        "another",
        "both",
        "all",
        "no",
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "some",
        "any",
        "every",
        "each",
        "his",
        "her",
        "its",
        "their",
        "my",
        "our",
        "your",
    ]
)
_DIGIT_NUMBERS = {str(n): n for n in range(1, 11)}
_PLURAL_FORMS_OF_BE = {"is": "are", "was": "were", "has": "have"}
_SINGULAR_FORMS_OF_BE = {v: k for k, v in _PLURAL_FORMS_OF_BE.items()}
_COORDINATION = frozenset({"and", "or", ",", "&", "as", "well"})
_OBJECT_START = frozenset({"DET", "NOUN", "PROPN", "PRON", "NUM", "ADJ"})
#: Most chunks considered for swaps, and most candidates of each swap kind.
MAX_SWAP_CHUNKS = 7
MAX_SWAP_CANDIDATES = 40
#: Minimum concreteness (1..5) of a rated word to be changed at all.
MIN_CONCRETENESS = 2.0
#: Percentile given to an attribute with no rating of its own ("decorated", "glazed").
UNRATED_PERCENTILE = 0.25
#: In a caption with no same-role attribute pair, whether attributes of different roles may swap ("a wooden
#: table and a red vase" -> "a red table and a wooden vase"). Kept: SugarCrepe's own swap_att pairs include such
#: swaps (61 cross-role against 130 same-role two-word swaps), and on its 4,345 captions turning it off only cut
#: the sampled swap_attributes share from 4.0% to 3.6%, every other figure equal.
CROSS_ROLE_FALLBACK = True


#: Kinds whose candidate ``target`` is the two exchanged pieces, ``"first|second"``.
SWAP_KINDS = frozenset({"swap_attributes", "swap_objects"})


class Candidate:
    """A negative before sampling; ``span`` is in the positive caption, ``target`` is its changed text.

    ``text`` may be given as a zero-argument callable: it is then built on first access, so ``plant`` only
    pays for rendering the few candidates it samples.
    """

    __slots__ = ("_render", "_text", "kind", "primary", "score", "span", "target")

    def __init__(
        self,
        text: str | Callable[[], str],
        kind: str,
        score: float,
        span: tuple[int, int],
        target: str,
        primary: bool = True,
    ) -> None:
        self._text, self._render = (None, text) if callable(text) else (text, None)
        self.kind, self.score, self.span, self.target = kind, score, span, target
        #: False for variants kept only as candidates (a swap as a pure word permutation when the inflected
        #: one reads better, swaps of whole phrases); sampling skips them.
        self.primary = primary

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._render()
            self._render = None
        return self._text

    def changed_texts(self, caption: str) -> list[str]:
        """What the negative changes in ``caption`` (its positive): the two exchanged pieces of a swap (its
        ``target``, ``"first|second"``), else the text of its ``span``."""
        if self.kind in SWAP_KINDS:
            return self.target.split("|")
        return [caption[self.span[0] : self.span[1]]]

    def __repr__(self) -> str:
        return f"Candidate({self.text!r}, {self.kind!r}, {self.score:.3f}, {self.span}, primary={self.primary})"


def _lazy(eager: bool, function: Callable[..., str], *args, **kwargs) -> str | Callable[[], str]:
    """``function(*args)`` now, or a callable that computes it later."""
    return function(*args, **kwargs) if eager else functools.partial(function, *args, **kwargs)


@dataclass
class Unit:
    """A changeable word or multiword expression of the caption."""

    kind: str  # the HardNegative kind a replacement of it makes
    first: int  # token indices [first, last]
    last: int
    start: int  # character offsets in the caption
    end: int
    text: str
    lemma: str
    tag: str
    pool: tuple[str, str | None]  # (POS, category) replacements are drawn from
    percentile: float
    plural: bool = False
    chunk: int = -1


@dataclass
class Chunk:
    """A noun phrase: token range, determiner end, head unit and the start of its noun compound."""

    first: int
    last: int  # last token of the head
    det_end: int  # first token after leading determiners / numerals-free prefix
    head: Unit
    compound_first: int
    attributes: list[Unit] = field(default_factory=list)


_SYNONYMS: dict[str, frozenset[str]] = {word: group for group in V.SYNONYM_GROUPS for word in group}
#: Random draws before falling back to filtering the whole pool.
_PICK_TRIES = 8


def _synonyms(word: str) -> frozenset[str]:
    return _SYNONYMS.get(word) or frozenset((word,))


def _pick(
    rng: random.Random,
    pool: tuple[str, str | None],
    lemma: str,
    caption_words: set[str],
    accept: Callable[[str], bool] | None = None,
) -> str | None:
    """A random lemma of the pool (its category, else its whole POS): not ``lemma``, a synonym of it, or a word
    already in the caption; with ``accept``, only a lemma it accepts (a corpus vocabulary)."""
    lemmas = L.pool_lemmas(*pool)
    if not lemmas:
        return None
    synonyms = _synonyms(lemma)
    for _ in range(_PICK_TRIES):
        choice = lemmas[rng.randrange(len(lemmas))]
        usable = choice != lemma and choice not in synonyms and choice not in caption_words
        if usable and (accept is None or accept(choice)):
            return choice
    choices = [
        c
        for c in lemmas
        if c != lemma and c not in synonyms and c not in caption_words and (accept is None or accept(c))
    ]
    return choices[rng.randrange(len(choices))] if choices else None


_STACKED_BEFORE = frozenset({"DET", "NUM", "ADJ"})
_MISTAGGED_ATTRIBUTE_POS = frozenset({"VERB", "ADV", "PROPN", "AUX", "INTJ", "X"})
_ATTRIBUTE_AFTER = frozenset({"DET", "NUM", "ADJ", "ADV", "PUNCT", "ADP", "CCONJ"})


_ATTRIBUTE_WORDS: dict[int, frozenset[str]] = {}


def _attribute_words(vocabulary: L.Vocabulary) -> frozenset[str]:
    """The attribute words of the replacement vocabulary (built once per vocabulary object)."""
    found = _ATTRIBUTE_WORDS.get(id(vocabulary))
    if found is None:
        found = frozenset(lemma for pos, lemma in vocabulary.by_lemma if pos == "ADJ")
        _ATTRIBUTE_WORDS.clear()
        _ATTRIBUTE_WORDS[id(vocabulary)] = found
    return found


def retag(toks: list[Tok], vocabulary: L.Vocabulary) -> list[Tok]:
    """Correct the tags the tagger gets wrong in stacked modifiers, from the lexicon.

    spaCy's small tagger reads "a large blue metallic solid square" with "square" as JJ (no head noun) and
    "two small red matte striped circles" with "matte" as NNP and "striped" as VBD (the phrase falls apart).
    Two rules, each confined to a run of modifiers: a vocabulary noun tagged as an adjective, adverb, verb or
    proper noun that ends such a run (after a determiner, numeral, adjective or attribute word, before no noun
    or adjective) becomes a noun; an attribute word tagged as a verb, adverb or proper noun becomes an adjective
    when a modifier or noun follows it.
    """
    n = len(toks)
    pos = [t.pos for t in toks]
    lower = [t.text.lower() for t in toks]
    words = _attribute_words(vocabulary)
    attribute = [word in words for word in lower]
    changed: dict[int, tuple[str, str, str]] = {}
    for i in range(1, n):
        if pos[i] not in {"ADJ", "ADV", "VERB", "PROPN"} or lower[i] not in vocabulary.noun_forms:
            continue
        if not (pos[i - 1] in _STACKED_BEFORE or attribute[i - 1]):
            continue
        if i + 1 < n and (pos[i + 1] in {"NOUN", "PROPN", "ADJ"} or attribute[i + 1]):
            continue
        lemma, plural = vocabulary.noun_forms[lower[i]]
        pos[i] = "NOUN"
        changed[i] = ("NOUN", "NNS" if plural else "NN", lemma)
    for i in range(n - 2, -1, -1):
        if pos[i] not in _MISTAGGED_ATTRIBUTE_POS or not attribute[i]:
            continue
        if not (pos[i + 1] in {"ADJ", "NOUN", "PROPN"} or attribute[i + 1]):
            continue
        if i > 0 and not (pos[i - 1] in _ATTRIBUTE_AFTER or attribute[i - 1]):
            continue
        pos[i] = "ADJ"
        changed[i] = ("ADJ", "JJ", lower[i])
    if not changed:
        return toks
    out = list(toks)
    for i, (new_pos, tag, lemma) in changed.items():
        out[i] = toks[i]._replace(pos=new_pos, tag=tag, lemma=lemma)
    return out


def _apply(caption: str, edits: list[tuple[int, int, str]]) -> str:
    out = caption
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out


class CaptionAnalysis:
    """Units and chunks of one tagged caption (built once, shared by the operations)."""

    def __init__(self, caption: str, toks: list[Tok], allowed: frozenset[str] | None = None) -> None:
        self.caption = caption
        self.vocabulary = L.load_vocabulary()
        self.toks = retag(toks, self.vocabulary)
        self.lower = [t.text.lower() for t in self.toks]
        #: the corpus vocabulary replacements are drawn from (None: no restriction)
        self.allowed = allowed
        self.units: list[Unit] = []
        self.head_units: dict[int, Unit] = {}  # last token index -> object unit
        self._find_units()
        self.multiword_nouns = {
            i for u in self.head_units.values() if u.last > u.first for i in range(u.first, u.last + 1)
        }
        self.chunks = self._find_chunks()
        self.lemmas = {u.lemma for u in self.units} | set(self.lower)

    # -- units ----------------------------------------------------------------------------------------------
    def _span(self, first: int, last: int) -> tuple[int, int]:
        return self.toks[first].idx, self.toks[last].idx + len(self.toks[last].text)

    def _make(self, kind, first, last, lemma, pool, percentile, plural=False) -> Unit:
        start, end = self._span(first, last)
        return Unit(
            kind, first, last, start, end, self.caption[start:end], lemma, self.toks[last].tag, pool, percentile, plural
        )

    def _multiword(self, i: int) -> tuple[int, str, str] | None:
        """The longest vocabulary multiword starting at token i: (last token index, pos, lemma)."""
        options = self.vocabulary.multiword.get(self.lower[i])
        best = None
        for words, (pos, lemma) in (options or {}).items():
            n = len(words)
            if tuple(self.lower[i : i + n]) == words and (best is None or n > best[0] - i + 1):
                best = (i + n - 1, pos, lemma)
        return best

    def _next_pos(self, i: int) -> str:
        return self.toks[i + 1].pos if i + 1 < len(self.toks) else "END"

    def _find_units(self) -> None:
        i, n = 0, len(self.toks)
        while i < n:
            multi = self._multiword(i)
            if multi is not None:
                last, pos, lemma = multi
                entry = self.vocabulary.by_lemma[(pos, lemma)]
                kind = {"NOUN": "replace_object", "ADP": "replace_relation"}.get(pos, "replace_attribute")
                unit = self._make(
                    kind,
                    i,
                    last,
                    lemma,
                    (pos, entry.category),
                    entry.percentile,
                    plural=self.toks[last].tag in {"NNS", "NNPS"},
                )
                self.units.append(unit)
                if pos == "NOUN":
                    self.head_units[last] = unit
                i = last + 1
                continue
            self._single(i)
            i += 1

    def _rated(self, low: str, lemma: str, pos: str) -> float | None:
        rating = L.lookup(low, lemma)
        if rating is None or rating < MIN_CONCRETENESS:
            return None
        return L.percentile(rating, pos)

    def _single(self, i: int) -> None:
        tok, low = self.toks[i], self.lower[i]
        if not low.isalpha() and low not in _DIGIT_NUMBERS:
            return
        pos, vocabulary = tok.pos, self.vocabulary
        next_pos = self._next_pos(i)
        attribute_entry = vocabulary.by_lemma.get(("ADJ", low))
        before_noun = next_pos in _NOUN_POS or (next_pos == "ADJ" and pos != "ADJ")

        # Attributes: adjectives, colour/material words however tagged, attributive participles, noun modifiers.
        if attribute_entry is not None and pos in {"ADJ", "NOUN", "PROPN", "VERB"}:
            # Heading its phrase, only a colour or material is also an attribute ("dressed in red"), not a shape
            # noun ("a solid square" never becomes "a solid flat").
            if before_noun or attribute_entry.category in {"colour", "material"} or pos == "ADJ":
                self.units.append(
                    self._make(
                        "replace_attribute", i, i, low, ("ADJ", attribute_entry.category), attribute_entry.percentile
                    )
                )
                if pos in {"ADJ", "VERB"} or before_noun:
                    return  # a colour or material noun heading its phrase ("made of wood") is an object too
        elif pos == "ADJ" and low not in V.ADJ_STOPLIST:
            percentile = self._rated(low, tok.lemma, "ADJ")
            if percentile is None and L.lookup(low) is None:
                percentile = UNRATED_PERCENTILE  # no rating at all ("decorated"): keep, but rank low
            if percentile is not None:
                self.units.append(self._make("replace_attribute", i, i, low, ("ADJ", None), percentile))
            return
        elif (
            pos == "VERB"
            and tok.tag in {"VBN", "VBD", "VBG"}
            and before_noun
            and i > 0
            and (self.toks[i - 1].pos in {"DET", "ADJ", "NUM", "ADV", "PRON"})
        ):
            percentile = self._rated(low, tok.lemma, "ADJ") or UNRATED_PERCENTILE
            self.units.append(self._make("replace_attribute", i, i, low, ("ADJ", None), percentile))
            return

        if pos == "NOUN":
            lemma, plural = vocabulary.noun_forms.get(low, (tok.lemma.lower(), tok.tag == "NNS"))
            if lemma in V.CONTAINER_NOUNS:
                # "a slice of pizza", "a group of people": never replaced, but it heads a phrase that can move.
                unit = self._make(
                    "container",
                    i,
                    i,
                    lemma,
                    ("NOUN", None),
                    self._rated(low, lemma, "NOUN") or 0.5,
                    plural=tok.tag == "NNS",
                )
                self.units.append(unit)
                self.head_units[i] = unit
                return
            if lemma in V.NOUN_STOPLIST or low in V.NOUN_STOPLIST:
                return
            percentile = self._rated(low, lemma, "NOUN")
            if percentile is None:
                return
            entry = vocabulary.by_lemma.get(("NOUN", lemma))
            category = entry.category if entry else None
            unit = self._make(
                "replace_object", i, i, lemma, ("NOUN", category), percentile, plural=plural or tok.tag == "NNS"
            )
            self.units.append(unit)
            self.head_units[i] = unit
            if next_pos == "NOUN" and attribute_entry is None:
                # A noun modifier ("vegetable soup", "city street") is also an attribute of the head.
                pool = ("NOUN", category) if category else ("ADJ", "material")
                self.units.append(self._make("replace_attribute", i, i, lemma, pool, percentile))
            return
        if pos == "ADP":
            entry = vocabulary.by_lemma.get(("ADP", low))
            if entry is not None:
                self.units.append(self._make("replace_relation", i, i, low, ("ADP", entry.category), entry.percentile))
            return
        if pos == "VERB":
            base = vocabulary.verb_forms.get(low) or tok.lemma.lower()
            if base in V.VERB_STOPLIST or not base.isalpha():
                return
            percentile = self._rated(low, base, "VERB")
            if percentile is None:
                return
            entry = vocabulary.by_lemma.get(("VERB", base))
            pool = ("VERB", entry.category if entry else None)
            self.units.append(self._make("replace_relation", i, i, base, pool, percentile))
            if next_pos not in _OBJECT_START and tok.tag in {"VBG", "VBZ", "VBP", "VBD"}:
                # Intransitive ("a dog sitting on a couch", "sheep grazing"): a state of the subject too.
                self.units.append(self._make("replace_attribute", i, i, base, pool, percentile))
            return

    # -- chunks ---------------------------------------------------------------------------------------------
    def _in_chunk(self, i: int) -> bool:
        tok = self.toks[i]
        if tok.pos in _CHUNK_POS or i in self.multiword_nouns:
            return True
        following = self._next_pos(i)
        previous = self.toks[i - 1].pos if i > 0 else "START"
        if (
            tok.pos == "VERB"
            and tok.tag in {"VBN", "VBG"}
            and following in {"NOUN", "ADJ"}
            and previous in {"DET", "ADJ", "NUM", "PRON", "ADV", "START", "PUNCT", "ADP", "CCONJ"}
        ):
            return True  # "parked motorcycle", "cutting board"
        if tok.pos in {"CCONJ", "PUNCT"} and self.lower[i] in {"and", "-", "/", ","} and i > 0:
            return self.toks[i - 1].pos == "ADJ" and following == "ADJ"  # "black and white cat"
        return tok.pos == "ADV" and following == "ADJ" and i + 2 < len(self.toks)

    def _find_chunks(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        attributes = [u for u in self.units if u.kind == "replace_attribute"]
        i, n = 0, len(self.toks)
        while i < n:
            if not self._in_chunk(i):
                i += 1
                continue
            j = i
            while j + 1 < n and self._in_chunk(j + 1):
                j += 1
            heads = [last for last in self.head_units if i <= last <= j]
            if heads:
                head = self.head_units[max(heads)]
                det_end = i
                while det_end < head.first and self.lower[det_end] in _DETERMINERS:
                    det_end += 1
                compound_first = head.first
                while compound_first - 1 >= det_end and self.toks[compound_first - 1].pos in _NOUN_POS:
                    compound_first -= 1
                chunk = Chunk(i, head.last, det_end, head, compound_first)
                chunk.attributes = [u for u in attributes if det_end <= u.first and u.last < head.first]
                index = len(chunks)
                for unit in self.units:
                    if i <= unit.first and unit.last <= head.last:
                        unit.chunk = index
                chunks.append(chunk)
            i = j + 1
        return chunks

    # -- rendering ------------------------------------------------------------------------------------------
    def article_edit(self, first: int, new_word: str) -> tuple[int, int, str] | None:
        """Fix "a"/"an" directly before token ``first`` for its new first word."""
        j = first - 1
        if j < 0 or self.lower[j] not in {"a", "an"}:
            return None
        wanted = L.article_for(new_word)
        if wanted == self.lower[j]:
            return None
        tok = self.toks[j]
        return (tok.idx, tok.idx + len(tok.text), L.match_case(tok.text, wanted))

    def agreement_edit(self, after: int, plural: bool) -> tuple[int, int, str] | None:
        """Make "is"/"was"/"has" or a present-tense verb right after token ``after`` agree with a new number."""
        j = after + 1
        if j >= len(self.toks):
            return None
        low, tok = self.lower[j], self.toks[j]
        table = _PLURAL_FORMS_OF_BE if plural else _SINGULAR_FORMS_OF_BE
        if low in table:
            return (tok.idx, tok.idx + len(tok.text), L.match_case(tok.text, table[low]))
        if tok.pos == "VERB" and low.isalpha() and (tok.tag == "VBZ" if plural else tok.tag == "VBP"):
            base = self.vocabulary.verb_forms.get(low) or tok.lemma.lower()
            return (
                tok.idx,
                tok.idx + len(tok.text),
                L.match_case(tok.text, L.verb_form(base, "VB" if plural else "VBZ")),
            )
        return None

    def text_of(self, first: int, last: int) -> str:
        start, end = self._span(first, last)
        return self.caption[start:end]

    def allows(self, text: str) -> bool:
        """Whether every word of a replacement is in the corpus vocabulary (always, without one)."""
        return corpus.allows(self.allowed, text)


def _inflect(pos: str, kind: str, plural: bool, tag: str, lemma: str) -> str:
    """The lowercase word a replacement ``lemma`` becomes in a unit of this POS, kind, number and tag."""
    if pos == "NOUN" and kind == "replace_object":
        return L.pluralize(lemma) if plural else lemma
    if pos == "VERB":
        return L.verb_form(lemma, tag)
    return lemma


def _render(unit: Unit, lemma: str) -> str:
    return L.match_case(unit.text, _inflect(unit.pool[0], unit.kind, unit.plural, unit.tag, lemma))


def _case_template(text: str) -> str:
    """A stand-in for ``text`` with its casing pattern (lower, Title or UPPER), as :func:`L.match_case` reads it."""
    if len(text) > 1 and text.isupper():
        return "AA"
    return "Aa" if text[:1].isupper() else "aa"


@functools.lru_cache(maxsize=4096)
def _allowed_lemmas(
    pool: tuple[str, str | None], kind: str, plural: bool, tag: str, case: str, allowed: frozenset[str]
) -> frozenset[str]:
    """The lemmas of ``pool`` whose rendered form the corpus vocabulary ``allowed`` accepts.

    This is what ``a.allows(_render(unit, lemma))`` says for every lemma of the pool, computed once per kind of
    unit (its pool, kind, number, tag and casing) instead of once per caption: with a closed vocabulary most
    random draws fail and :func:`_pick` falls back to filtering the whole pool.
    """
    return frozenset(
        lemma
        for lemma in L.pool_lemmas(*pool)
        if corpus.allows(allowed, L.match_case(case, _inflect(pool[0], kind, plural, tag, lemma)))
    )


def _converse(a: CaptionAnalysis, unit: Unit) -> str | None:
    """The first converse of a spatial relation unit ("above" -> "below") the corpus vocabulary allows, or None."""
    if unit.kind != "replace_relation" or unit.pool[0] != "ADP":
        return None
    for converse in V.CONVERSE_RELATIONS.get(unit.lemma, ()):
        if a.allows(converse):
            return converse
    return None


def _replace_candidates(a: CaptionAnalysis, rng: random.Random, variants: bool = True) -> list[Candidate]:
    out: list[Candidate] = []

    def add(unit: Unit, new: str, primary: bool = True) -> None:
        text = _render(unit, new)
        if text.lower() == unit.text.lower():
            return
        edits = [(unit.start, unit.end, text)]
        article = a.article_edit(unit.first, text)
        if article:
            edits.append(article)
        text = _lazy(variants, _apply, a.caption, edits)
        out.append(Candidate(text, unit.kind, unit.percentile, (unit.start, unit.end), unit.text, primary))

    for unit in a.units:
        if unit.kind == "container":
            continue
        accept = (
            None
            if a.allowed is None
            else _allowed_lemmas(
                unit.pool, unit.kind, unit.plural, unit.tag, _case_template(unit.text), a.allowed
            ).__contains__
        )
        new = _pick(rng, unit.pool, unit.lemma, a.lemmas, accept)
        converse = _converse(a, unit)
        if converse is not None:
            # A spatial relation becomes its converse ("to the left of" -> "to the right of"), always the whole
            # phrase; the random relation of its category stays a variant of the candidate list only.
            add(unit, converse)
            if variants and new is not None and new != converse:
                add(unit, new, primary=False)
        elif new is not None:
            add(unit, new)
    return out


def _count_candidates(a: CaptionAnalysis, rng: random.Random, variants: bool = True) -> list[Candidate]:
    out: list[Candidate] = []
    numbers = ["two", "three", "four", "five", "six"]
    for chunk in a.chunks:
        head = chunk.head
        for i in range(chunk.first, head.first):
            low, tok = a.lower[i], a.toks[i]
            if i > 0 and a.lower[i - 1] in {"a", "an"}:
                continue  # "a few", "a couple"
            value = V.NUMBER_WORDS.get(low) or _DIGIT_NUMBERS.get(low)
            if head.kind != "replace_object":
                break
            if low in {"a", "an", "one"} and not head.plural and head.pool[0] == "NOUN":
                options = [w for w in numbers if a.allows(w)]
                if not options or not a.allows(L.pluralize(head.lemma)):
                    break
                new_number = options[rng.randrange(len(options))]
                edits = [
                    (tok.idx, tok.idx + len(tok.text), L.match_case(tok.text, new_number)),
                    (head.start, head.end, L.match_case(head.text, L.pluralize(head.lemma))),
                ]
                agreement = a.agreement_edit(head.last, plural=True)
                if agreement:
                    edits.append(agreement)
            elif value is not None and value >= 2 and head.plural:
                options = [
                    w
                    for w in numbers
                    if V.NUMBER_WORDS[w] != value and a.allows(str(V.NUMBER_WORDS[w]) if low.isdigit() else w)
                ]
                if not options:
                    break
                new_number = options[rng.randrange(len(options))]
                if low.isdigit():
                    new_number = str(V.NUMBER_WORDS[new_number])
                edits = [(tok.idx, tok.idx + len(tok.text), L.match_case(tok.text, new_number))]
            else:
                continue
            out.append(
                Candidate(
                    _lazy(variants, _apply, a.caption, edits),
                    "change_count",
                    head.percentile,
                    (tok.idx, head.end),
                    tok.text,
                )
            )
            break
    return out


def _swap(
    a: CaptionAnalysis,
    one: tuple[int, int],
    two: tuple[int, int],
    texts: tuple[str, str] | None = None,
    agree: tuple[bool, bool] | None = None,
) -> str:
    """Exchange token ranges ``one`` and ``two`` (or put ``texts`` there), each slot keeping its casing."""
    text_one = a.text_of(*one) if texts is None else texts[0]
    text_two = a.text_of(*two) if texts is None else texts[1]
    start_one, end_one = a._span(*one)
    start_two, end_two = a._span(*two)
    slot_one, slot_two = a.caption[start_one:end_one], a.caption[start_two:end_two]

    def fit(slot: str, new: str) -> str:
        if new[:1].isupper() and not (new.isupper() and len(new) > 1) and not slot[:1].isupper():
            first_word = new.split(" ", 1)[0]
            if first_word.lower() in L.load_norms() or first_word.lower() in _DETERMINERS:
                new = new[:1].lower() + new[1:]  # a sentence-initial capital moving inside
        return L.match_case(slot, new) if slot[:1].isupper() else new

    edits = [(start_one, end_one, fit(slot_one, text_two)), (start_two, end_two, fit(slot_two, text_one))]
    for (first, _last), new in ((one, text_two), (two, text_one)):
        article = a.article_edit(first, new)
        if article:
            edits.append(article)
    if agree is not None:
        for (_first, last), plural in zip((one, two), agree, strict=True):
            edit = a.agreement_edit(last, plural)
            if edit:
                edits.append(edit)
    return _apply(a.caption, edits)


def _coordinated(a: CaptionAnalysis, x: Chunk, y: Chunk) -> bool:
    between = a.lower[x.last + 1 : y.first]
    return all(word in _COORDINATION for word in between)


def _span_score(units: list[Unit], a: CaptionAnalysis, first: int, last: int) -> float:
    inside = [u.percentile for u in units if first <= u.first and u.last <= last]
    return max(inside) if inside else UNRATED_PERCENTILE


def _of_extension(a: CaptionAnalysis, index: int) -> int | None:
    """Last token of "<chunk> of <next chunk>" ("a slice of pizza"), or None."""
    chunk = a.chunks[index]
    if index + 1 < len(a.chunks) and chunk.last + 1 < len(a.toks) and a.lower[chunk.last + 1] == "of":
        following = a.chunks[index + 1]
        if following.first == chunk.last + 2:
            return following.last
    return None


def _swap_object_candidates(a: CaptionAnalysis, variants: bool) -> list[Candidate]:
    out: list[Candidate] = []
    chunks = a.chunks[:MAX_SWAP_CHUNKS]
    for xi, x in enumerate(chunks):
        for yi in range(xi + 1, len(chunks)):
            y = chunks[yi]
            if x.head.lemma == y.head.lemma or _coordinated(a, x, y):
                continue
            x_ext, y_ext = _of_extension(a, xi), _of_extension(a, yi)
            if x.head.kind == "container" or y.head.kind == "container":
                out.extend(_container_swaps(a, x, y, x_ext, y_ext, variants))
                continue
            score = (x.head.percentile + y.head.percentile) / 2.0
            span = (x.head.start, y.head.end)
            target = f"{x.head.text}|{y.head.text}"

            def add(primary: bool, *swap_args, score=score, span=span, target=target, **swap_kwargs) -> None:
                if primary or variants:  # variants are built only for the full candidate list
                    text = _lazy(variants, _swap, a, *swap_args, **swap_kwargs)
                    out.append(Candidate(text, "swap_objects", score, span, target, primary))

            same_number = x.head.plural == y.head.plural
            # Without modifiers the heads swap alone; with them, the phrases move with their modifiers
            # ("a prop plane at an airport" -> "an airport at a prop plane", not "a prop airport at a plane"),
            # unless every modifier is an attribute of known role (colour, size, material ...): then the heads
            # swap alone too ("a red circle above a blue square" -> "a red square above a blue circle"), the
            # shape binding swap.
            bare = x.det_end == x.head.first and y.det_end == y.head.first
            attributive = not bare and _attributes_only(a, x) and _attributes_only(a, y)
            heads_alone = bare or attributive
            heads = ((x.head.first, x.head.last), (y.head.first, y.head.last))
            if not same_number:
                inflected = (
                    L.match_case(x.head.text, L.pluralize(x.head.lemma) if y.head.plural else x.head.lemma),
                    L.match_case(y.head.text, L.pluralize(y.head.lemma) if x.head.plural else y.head.lemma),
                )
                add(heads_alone, *heads, texts=inflected)
            add(same_number and heads_alone, *heads)
            add(same_number and not heads_alone, (x.det_end, x.last), (y.det_end, y.last))
            add(False, (x.compound_first, x.last), (y.compound_first, y.last))
            full = ((x.first, x.last), (y.first, y.last))
            add(not same_number and not attributive, *full, agree=(y.head.plural, x.head.plural))
            add(False, *full)
            if variants:
                out.extend(_container_swaps(a, x, y, x_ext, y_ext, variants, primary=False))
    return out[: MAX_SWAP_CANDIDATES * 2]


def _attributes_only(a: CaptionAnalysis, chunk: Chunk) -> bool:
    """Whether every modifier between a phrase's determiners and its head is a numeral or an attribute of known
    role ("two small red matte striped circles"), with no noun compound ("a prop plane", "a fire hydrant")."""
    if chunk.compound_first != chunk.head.first or chunk.head.last != chunk.head.first:
        return False
    return all(
        a.toks[i].pos == "NUM" or attribute_role(a.lower[i]) is not None for i in range(chunk.det_end, chunk.head.first)
    )


def _container_swaps(
    a: CaptionAnalysis, x: Chunk, y: Chunk, x_ext: int | None, y_ext: int | None, variants: bool, primary: bool = True
) -> list[Candidate]:
    """Swaps of "<phrase> of <phrase>" units ("a slice of pizza" <-> "a fork"); a bare container never moves."""
    x_ends = ([x.last] if x.head.kind != "container" else []) + (
        [x_ext] if x_ext is not None and x_ext < y.first else []
    )
    y_ends = ([y.last] if y.head.kind != "container" else []) + ([y_ext] if y_ext is not None else [])
    out = []
    for x_end in x_ends:
        for y_end in y_ends:
            if x_end == x.last and y_end == y.last:
                continue  # the plain phrase swap, made by the caller
            score = (x.head.percentile + y.head.percentile) / 2.0
            full = ((x.first, x_end), (y.first, y_end))
            span = a._span(x.first, y_end)
            target = f"{a.text_of(*full[0])}|{a.text_of(*full[1])}"
            out.append(Candidate(_lazy(variants, _swap, a, *full), "swap_objects", score, span, target, primary))
            if variants:
                nominal = ((x.det_end, x_end), (y.det_end, y_end))
                out.append(Candidate(_swap(a, *nominal), "swap_objects", score, span, target, False))
    return out


def _attribute_spans(a: CaptionAnalysis, chunk: Chunk) -> list[tuple[tuple[int, int], bool]]:
    """(token range, primary) of the modifiers that can move: single attributes and pre-head spans."""
    spans: list[tuple[tuple[int, int], bool]] = [((u.first, u.last), True) for u in chunk.attributes]
    if chunk.det_end < chunk.compound_first:
        spans.append(((chunk.det_end, chunk.compound_first - 1), len(chunk.attributes) > 1))
        first = chunk.det_end
        while first < chunk.compound_first - 1 and a.toks[first].pos == "NUM":
            first += 1
        spans.append(((first, chunk.compound_first - 1), False))
    if chunk.det_end < chunk.head.first:
        spans.append(((chunk.det_end, chunk.head.first - 1), False))
    # Noun modifiers of any kind ("Windows laptop") and the first word of a two-word head ("fire hydrant").
    spans += [((i, i), False) for i in range(max(chunk.det_end, chunk.compound_first), chunk.head.first)]
    if chunk.head.last > chunk.head.first:
        spans.append(((chunk.head.first, chunk.head.last - 1), False))
    unique: dict[tuple[int, int], bool] = {}
    for span, primary in spans:
        unique[span] = unique.get(span, False) or primary
    return list(unique.items())


def _predicate_groups(a: CaptionAnalysis) -> list[list[tuple[tuple[int, int], bool]]]:
    """Attributes outside every noun phrase ("painted blue"), one group per run of adjacent ones."""
    inside = {i for chunk in a.chunks for i in range(chunk.first, chunk.last + 1)}
    loose = [u for u in a.units if u.kind == "replace_attribute" and u.pool[0] == "ADJ" and u.first not in inside]
    groups: list[list[tuple[tuple[int, int], bool]]] = []
    previous_last = -2
    for unit in loose:
        if unit.first == previous_last + 1 and groups:
            groups[-1].append(((unit.first, unit.last), False))
            start = groups[-1][0][0][0]
            groups[-1].append(((start, unit.last), False))
        else:
            groups.append([((unit.first, unit.last), True)])
        previous_last = unit.last
    return groups


def _move_attribute(a: CaptionAnalysis, span: tuple[int, int], target: Chunk) -> str | None:
    """Move modifiers to a noun phrase that has none ("white birds in a puddle" -> "birds in a white puddle")."""
    first, last = span
    if first == 0 or target.det_end >= len(a.toks) or last + 1 >= len(a.toks):
        return None
    start, end = a._span(first, last)
    moved = a.caption[start:end]
    moved = moved if moved.isupper() else moved[:1].lower() + moved[1:]
    at = a.toks[target.det_end].idx
    edits = [(start, end + len(a.toks[last].ws), ""), (at, at, moved + " ")]
    for edit in (a.article_edit(target.det_end, moved), a.article_edit(first, a.toks[last + 1].text)):
        if edit:
            edits.append(edit)
    return _apply(a.caption, edits)


def attribute_role(word: str) -> str | None:
    """The role of an attribute word ("colour", "size", "material", "pattern", ...), None when unknown."""
    return V.ATTRIBUTE_ROLES.get(word.lower())


def _span_role(a: CaptionAnalysis, span: tuple[int, int]) -> str | None:
    """The role of a one-word attribute span, None for longer spans and words outside the role lexicon."""
    return attribute_role(a.lower[span[0]]) if span[0] == span[1] else None


def _swap_attribute_candidates(a: CaptionAnalysis, variants: bool) -> list[Candidate]:
    """Attribute swaps between noun phrases (and loose predicate attributes).

    Same-role swaps first: when two phrases have attributes of the same role ("two small *red* circles left of a
    large *blue* square"), exchanging those ("two small blue circles left of a large red square") is the binding
    swap, and only such swaps are sampled; swaps of words of different roles ("a texture word in the colour
    slot") and of whole modifier spans stay in the candidate list as variants. A caption with no same-role pair
    keeps the role-blind swaps (``CROSS_ROLE_FALLBACK``).
    """
    out: list[Candidate] = []
    chunks = a.chunks[:MAX_SWAP_CHUNKS]
    groups = [_attribute_spans(a, chunk) for chunk in chunks] + _predicate_groups(a)[:3]
    units = [u for u in a.units if u.kind == "replace_attribute"]
    pairs: list[tuple[tuple[int, int], tuple[int, int], bool, str]] = []  # (one, two, primary, role relation)
    for xi in range(len(groups)):
        for yi in range(xi + 1, len(groups)):
            for one, primary_one in groups[xi]:
                for two, primary_two in groups[yi]:
                    primary = primary_one and primary_two
                    if not (variants or primary):
                        continue
                    if one[0] > two[0]:
                        one, two = two, one
                    if one[1] >= two[0] or a.text_of(*one).lower() == a.text_of(*two).lower():
                        continue
                    role_one, role_two = _span_role(a, one), _span_role(a, two)
                    if role_one is None or role_two is None:
                        relation = "unknown"
                    elif role_one != role_two:
                        relation = "cross"
                    elif a.lower[two[0]] in _synonyms(a.lower[one[0]]):
                        relation = "synonym"  # "big" <-> "large" changes nothing that is seen
                    else:
                        relation = "same"
                    pairs.append((one, two, primary, relation))
    same_role = any(primary and relation == "same" for _, _, primary, relation in pairs)
    for one, two, primary, relation in pairs:
        if same_role:
            primary = primary and relation == "same"
        elif relation == "synonym" or (relation == "cross" and not CROSS_ROLE_FALLBACK):
            primary = False
        if not (variants or primary):
            continue
        score = (_span_score(units, a, *one) + _span_score(units, a, *two)) / 2.0
        start, end = a._span(one[0], two[1])
        text = _lazy(variants, _swap, a, one, two)
        target = f"{a.text_of(*one)}|{a.text_of(*two)}"
        out.append(Candidate(text, "swap_attributes", score, (start, end), target, primary))
    if variants:
        for chunk, spans in zip(chunks, groups, strict=False):
            for span, _primary in spans:
                if span[1] >= chunk.head.first:
                    continue
                for other in chunks:
                    if other is chunk or other.attributes or other.det_end != other.compound_first:
                        continue
                    text = _move_attribute(a, span, other)
                    if text:
                        start, end = a._span(*span)
                        score = (_span_score(units, a, *span) + other.head.percentile) / 2.0
                        bounds = (min(start, other.head.start), max(end, other.head.end))
                        out.append(Candidate(text, "swap_attributes", score, bounds, a.caption[start:end], False))
    return out[: MAX_SWAP_CANDIDATES * 2]


def candidates(
    caption: str,
    toks: list[Tok],
    rng: random.Random,
    kinds: frozenset[str] | None = None,
    variants: bool = True,
    allowed: frozenset[str] | None = None,
) -> list[Candidate]:
    """Every negative of ``caption`` (tagged as ``toks``), deduplicated, none equal to the caption.

    With ``variants=False`` only the candidates sampling may pick (``primary``) are built: what ``plant`` needs.
    With ``allowed`` (a corpus vocabulary), replacement words are drawn from it only.
    """
    analysis = CaptionAnalysis(caption, toks, allowed)
    found = (
        _replace_candidates(analysis, rng, variants)
        + _count_candidates(analysis, rng, variants)
        + _swap_object_candidates(analysis, variants)
        + _swap_attribute_candidates(analysis, variants)
    )
    if kinds is not None:
        found = [candidate for candidate in found if candidate.kind in kinds]
    if not variants:
        # Texts are not rendered yet: sampling renders what it draws and drops duplicates and copies of the caption.
        return [candidate for candidate in found if candidate.primary]
    seen = {caption.strip().lower()}
    out: dict[str, Candidate] = {}
    for candidate in found:
        key = candidate.text.strip().lower()
        if not key or key in seen:
            if key in out and candidate.primary and not out[key].primary:
                out[key] = candidate  # the same text reached as a primary variant
            continue
        seen.add(key)
        out[key] = candidate
    return list(out.values())
