"""Replacement vocabulary restricted to a training corpus: only words the images' captions ever use.

A hard negative that brings a word the corpus never uses ("parrots", "bronze" in captions of coloured shapes)
can be rejected by a text encoder from that word alone, without looking at the image. With a corpus vocabulary,
ConcretePlant draws every replacement (objects, attributes, relations, counts) from words of the corpus and
drops any negative with a word that is neither in the corpus nor in its own caption.

Words are lowercased runs of letters and digits (an apostrophe inside a word is kept: "man's"); the same
tokenizer reads the corpus, the vocabulary file and the negatives.

Python::

    from slipform_plugin.concreteplant import ConcretePlant, corpus_vocabulary
    vocabulary = corpus_vocabulary(train_captions, min_count=2)   # frozenset of words
    plant = ConcretePlant(num_negatives=3, vocabulary=vocabulary)  # or vocabulary="vocab.txt"
    write_vocabulary_file(vocabulary, "vocab.txt")                  # one word per line, for --hn-vocab / --vocab
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

#: What a ``vocabulary`` argument may be: a set (any iterable) of words, or a path to a one-word-per-line file.
VocabularyLike = str | os.PathLike | Iterable[str]


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` as the corpus vocabulary counts them."""
    return _WORD.findall(text.lower())


def corpus_vocabulary(captions: Iterable[object], min_count: int = 1) -> frozenset[str]:
    """The words occurring at least ``min_count`` times in ``captions`` (an iterable of strings or bytes).

    Args:
        captions: the training corpus' captions, ``N`` strings (bytes are decoded as UTF-8; None is skipped).
        min_count: a word must occur this many times (>= 1) to be allowed.

    Returns:
        A frozenset of lowercased words.
    """
    if int(min_count) < 1:
        raise ValueError(f"corpus_vocabulary: min_count must be >= 1, got {min_count}")
    counts: Counter = Counter()
    for caption in captions:
        if caption is None:
            continue
        if isinstance(caption, bytes | bytearray):
            caption = bytes(caption).decode("utf-8", errors="replace")
        counts.update(words(str(caption)))
    return frozenset(word for word, count in counts.items() if count >= min_count)


def read_vocabulary_file(path: str | os.PathLike, flag: str = "vocabulary") -> frozenset[str]:
    """The words of a text file, one per line (blank lines and lines starting with ``#`` skipped).

    A line holding several words ("to the left of") allows each of them. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for one without words, both naming ``flag``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: expected a text file with one word per line, got {str(path)!r} (not found)")
    found: set[str] = set()
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                found.update(words(line))
    if not found:
        raise ValueError(f"{flag}: expected a text file with one word per line, got {str(path)!r} (no words)")
    return frozenset(found)


def write_vocabulary_file(vocabulary: Iterable[str], path: str | os.PathLike) -> Path:
    """Write ``vocabulary`` sorted, one word per line (the format of ``--hn-vocab`` and ``slipform plant --vocab``)."""
    path = Path(path)
    path.write_text("".join(f"{word}\n" for word in sorted(set(vocabulary))), encoding="utf-8")
    return path


def as_vocabulary(vocabulary: VocabularyLike | None, flag: str = "vocabulary") -> frozenset[str] | None:
    """Normalise a ``vocabulary`` argument: None stays None (no restriction); a path is read; words are lowercased.

    Raises ``ValueError`` for an empty vocabulary (it would allow no negative at all).
    """
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str | os.PathLike):
        return read_vocabulary_file(vocabulary, flag)
    allowed = frozenset(word for item in vocabulary for word in words(str(item)))
    if not allowed:
        raise ValueError(f"{flag}: expected a non-empty set of words, got none")
    return allowed


def allows(allowed: frozenset[str] | None, text: str, also: frozenset[str] = frozenset()) -> bool:
    """Whether every word of ``text`` is in ``allowed`` or ``also`` (always True without a vocabulary)."""
    return allowed is None or all(word in allowed or word in also for word in words(text))
