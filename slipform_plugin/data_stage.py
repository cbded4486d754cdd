"""The ``--hn`` WebDataset stage: raw captions in, captions with up to K hard negatives out.

Inside OpenCLIP's training pipeline the stage sits right before tokenisation (after ``rename(text="txt")``,
where the caption is still a ``str``). It buffers a few samples so the generator can batch its parsing,
replaces each sample's ``text`` with a :class:`CaptionWithNegatives`, and the tokenizer wrapper
(:class:`TokenizerWithNegatives`) turns that into the packed ``[1 + K, L + 3]`` tensor of
:mod:`slipform_plugin.packing`. Samples that carry precomputed negatives (``hn.json``, written by
``slipform plant``) use them instead of running the generator.

A caption the generator cannot handle gets fewer or no negatives (masked in the loss) and is counted;
the stage never raises on a sample, so a long training run never dies on one bad caption.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from slipform_plugin.hard_negatives import HardNegative

logger = logging.getLogger("slipform")


def no_hard_negatives(args: Any) -> None:
    """The ``none`` generator: no stage is added."""
    return None


@dataclass
class CaptionWithNegatives:
    """A caption on its way to the tokenizer, with its (already filtered) hard negatives."""

    caption: str
    negatives: list[HardNegative] = field(default_factory=list)


def clean_negatives(caption: str, negatives: Iterable[Any], limit: int) -> list[HardNegative]:
    """Keep at most ``limit`` valid, distinct negatives that differ from ``caption``.

    Anything that is not a :class:`HardNegative` (or its JSON form) with a non-empty text different from the
    caption is dropped, so a faulty generator cannot smuggle a copy of the positive in as a negative.
    """
    kept: list[HardNegative] = []
    seen = {caption.strip()}
    for negative in negatives:
        try:
            if isinstance(negative, dict):
                negative = HardNegative.from_json(negative)
            if not isinstance(negative, HardNegative) or not isinstance(negative.text, str):
                continue
        except (KeyError, TypeError, ValueError):
            continue
        text = negative.text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        kept.append(negative)
        if len(kept) >= limit:
            break
    return kept


def _precomputed(sample: dict) -> list | None:
    value = sample.get("hn.json")
    if value is None:
        return None
    if isinstance(value, bytes | str):
        value = json.loads(value)
    if isinstance(value, dict):  # tolerate {"negatives": [...]} as well as a bare list
        value = value.get("negatives", [])
    return value if isinstance(value, list) else None


class HardNegativeStage:
    """WebDataset stage (iterator of sample dicts -> iterator of sample dicts) adding hard negatives.

    Picklable: the generator is pickled without any loaded model (ConcretePlant loads spaCy lazily in each
    DataLoader worker).

    Args:
        generator: object with ``plant(captions: list[str], keys: list[str]) -> list[list[HardNegative]]``.
        num_negatives: ``K``, the most negatives kept per caption.
        batch_size: samples buffered per ``plant`` call.
        text_key: the sample key holding the caption.
    """

    def __init__(self, generator: Any, num_negatives: int, batch_size: int = 64, text_key: str = "text") -> None:
        if num_negatives < 0:
            raise ValueError(f"HardNegativeStage: num_negatives must be >= 0, got {num_negatives}")
        if batch_size < 1:
            raise ValueError(f"HardNegativeStage: batch_size must be >= 1, got {batch_size}")
        self.generator = generator
        self.num_negatives = num_negatives
        self.batch_size = batch_size
        self.text_key = text_key
        self.stats: Counter = Counter()  # cumulative counts of this process
        self._logged: Counter = Counter()

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        buffer: list[dict] = []
        try:
            for sample in samples:
                buffer.append(sample)
                if len(buffer) >= self.batch_size:
                    yield from self._process(buffer)
                    buffer = []
            yield from self._process(buffer)
        finally:
            # Runs when the epoch's iterator is exhausted or closed: once per epoch and DataLoader worker.
            self.log_stats()

    def _process(self, buffer: list[dict]) -> Iterator[dict]:
        captions: list[str] = []
        keys: list[str] = []
        to_generate: list[int] = []
        negatives: list[list[Any]] = [[] for _ in buffer]
        for index, sample in enumerate(buffer):
            caption = sample.get(self.text_key)
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", errors="replace")
            if not isinstance(caption, str):
                caption = "" if caption is None else str(caption)
            sample[self.text_key] = caption
            try:
                stored = _precomputed(sample)
            except (ValueError, TypeError):
                stored = None
                self.stats["bad_precomputed"] += 1
            if stored is not None:
                negatives[index] = stored
                self.stats["precomputed"] += 1
            else:
                captions.append(caption)
                keys.append(str(sample.get("__key__", index)))
                to_generate.append(index)
        if to_generate and self.num_negatives > 0:
            for index, planted in zip(to_generate, self._plant(captions, keys)):
                negatives[index] = planted
        for index, sample in enumerate(buffer):
            caption = sample[self.text_key]
            kept = clean_negatives(caption, negatives[index], self.num_negatives)
            self.stats["samples"] += 1
            self.stats["negatives"] += len(kept)
            if len(kept) < self.num_negatives:
                self.stats["samples_short"] += 1
            if not kept:
                self.stats["samples_without_negatives"] += 1
            sample[self.text_key] = CaptionWithNegatives(caption, kept)
            yield sample

    def _plant(self, captions: list[str], keys: list[str]) -> list[list[Any]]:
        try:
            planted = self.generator.plant(captions, keys)
            if len(planted) == len(captions):
                return planted
            self.stats["generator_errors"] += 1
        except Exception:  # a generator failure must not end a training run: retry one caption at a time
            self.stats["generator_errors"] += 1
        results: list[list[Any]] = []
        for caption, key in zip(captions, keys):
            try:
                results.append(self.generator.plant([caption], [key])[0])
            except Exception:
                self.stats["caption_errors"] += 1
                results.append([])
        return results

    def log_stats(self) -> None:
        """Log this worker's counts since the last log (once per epoch: the stage's iterator ends each epoch)."""
        delta = self.stats - self._logged
        if not delta.get("samples"):
            return
        logger.info("Slipform hard negatives (pid %d): %s", os.getpid(), dict(sorted(delta.items())))
        self._logged = self.stats.copy()


class TokenizerWithNegatives:
    """Wraps OpenCLIP's tokenizer so ``tokenizer(CaptionWithNegatives)[0]`` is the packed ``[1 + K, L + 3]``.

    Plain strings (and lists of them) are passed to the wrapped tokenizer unchanged.
    """

    _slipform_wrapped = True  # tells a patched get_wds_dataset that the --hn stage is already being added

    def __init__(self, tokenizer: Any, num_negatives: int) -> None:
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(texts, CaptionWithNegatives):
            from slipform_plugin.packing import pack_caption_tokens

            tokens = self.tokenizer([texts.caption] + [n.text for n in texts.negatives], *args, **kwargs)
            return pack_caption_tokens(tokens, texts.negatives, self.num_negatives)[None]
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        tokenizer = self.__dict__.get("tokenizer")  # absent while unpickling
        if tokenizer is None:
            raise AttributeError(name)
        return getattr(tokenizer, name)


def insert_before_tokenization(pipeline: list, stage: Any, text_key: str = "text") -> int:
    """Insert ``stage`` into a WebDataset pipeline right before the ``map_dict`` that tokenises captions.

    Returns the index of the inserted stage. Raises ``RuntimeError`` when no such ``map_dict`` exists (an
    OpenCLIP whose data pipeline changed shape: the version guard and a test catch this).
    """
    for index, existing in enumerate(pipeline):
        function = getattr(existing, "f", None)
        keywords = getattr(existing, "kw", {}) or {}
        if getattr(function, "__name__", "") == "_map_dict" and text_key in keywords:
            pipeline.insert(index, stage)
            return index
    raise RuntimeError(
        "Slipform: could not find the caption-tokenising map_dict stage in OpenCLIP's WebDataset pipeline; "
        "this OpenCLIP version is not supported by the --hn data path"
    )


def describe_negatives(negatives: Sequence[HardNegative]) -> str:
    """Short human-readable form, for logs and debugging."""
    return "; ".join(f"{n.kind}({n.score:.2f}): {n.text}" for n in negatives)


class SeededSampleShuffle:
    """WebDataset's sample shuffle buffer with a reproducible generator (``--seed-sample-shuffle``).

    OpenCLIP's training pipeline shuffles samples with ``wds.shuffle``, whose generator is seeded from the process
    id and the clock, so two runs of one command see their samples in different orders (the shard order is
    seeded). This stage keeps the same buffer (``bufsize``, ``initial``) and seeds it from the run's seed, the
    epoch, the rank and the DataLoader worker, so every run of a command, and every configuration of an ablation
    run with one seed, sees the same sample order.

    Args:
        bufsize: shuffle buffer size; initial: samples buffered before the first is yielded (OpenCLIP's values).
        seed: the run's ``--seed``; rank: this process's rank.
        epoch: OpenCLIP's ``SharedEpoch`` (anything with ``get_value()``) or a fixed int.
    """

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int, epoch: Any) -> None:
        self.bufsize, self.initial, self.seed, self.rank, self.epoch = bufsize, initial, seed, rank, epoch

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        import random

        import torch.utils.data
        from webdataset.filters import _shuffle

        epoch = self.epoch.get_value() if hasattr(self.epoch, "get_value") else int(self.epoch)
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and Python runs.
        rng = random.Random(f"slipform-sample-shuffle/{self.seed}/{epoch}/{self.rank}/{worker_id}")
        return _shuffle(source, self.bufsize, self.initial, rng)


def seed_sample_shuffle(pipeline: list, seed: int, rank: int, epoch: Any) -> int:
    """Replace the unseeded ``wds.shuffle`` stage of an OpenCLIP training pipeline by :class:`SeededSampleShuffle`.

    Returns the index of the replaced stage; a pipeline already seeded (the explicit patch, then the ``--hn``
    wrapper) is left as it is. Raises ``RuntimeError`` when the pipeline has no such stage (an OpenCLIP whose data
    pipeline changed shape).
    """
    for index, existing in enumerate(pipeline):
        if isinstance(existing, SeededSampleShuffle):
            return index
    for index, existing in enumerate(pipeline):
        function = getattr(existing, "f", None)
        if getattr(function, "__name__", "") == "_shuffle" and getattr(function, "__module__", "").startswith(
            "webdataset"
        ):
            keywords = getattr(existing, "kw", {}) or {}
            pipeline[index] = SeededSampleShuffle(
                int(keywords.get("bufsize", 1000)), int(keywords.get("initial", 100)), seed, rank, epoch
            )
            return index
    raise RuntimeError(
        "Slipform: --seed-sample-shuffle could not find the sample shuffle stage in OpenCLIP's WebDataset "
        "pipeline; this OpenCLIP version is not supported by it"
    )
