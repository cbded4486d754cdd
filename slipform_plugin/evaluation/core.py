"""Shared machinery: batched, cached feature extraction and multiple-choice scoring.

An evaluation item is an image and a list of captions, the first of which is the true one
(:class:`ChoiceItem`). The model is right when the true caption's cosine similarity with the image is
strictly higher than every other option's; options whose text equals the true caption are dropped first
(a perturbation that happens to change nothing would otherwise count as a tie).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: an image: a file path, a ``(path, (left, top, right, bottom))`` crop, or a key with a loader
ImageRef = Any


@dataclass(frozen=True)
class LazyImage:
    """An image identified by ``key`` and produced by ``load()`` (e.g. an in-memory render)."""

    key: Hashable
    load: Callable[[], Any] = field(compare=False, hash=False)


@dataclass
class ChoiceItem:
    """One test: ``options[0]`` is the true caption of ``image``; ``group`` is the reporting category."""

    image: ImageRef
    options: list[str]
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def open_image(ref: ImageRef):
    """PIL RGB image of an :data:`ImageRef`; ``FileNotFoundError`` names the missing file."""
    from PIL import Image

    if isinstance(ref, LazyImage):
        return ref.load().convert("RGB")
    if isinstance(ref, tuple):
        path, box = ref
        with Image.open(path) as img:
            return img.convert("RGB").crop(tuple(box))
    with Image.open(ref) as img:
        return img.convert("RGB")


def _image_key(ref: ImageRef) -> Hashable:
    if isinstance(ref, LazyImage):
        return ("lazy", ref.key)
    if isinstance(ref, tuple):
        return (str(ref[0]), tuple(float(v) for v in ref[1]))
    return str(ref)


class Encoder:
    """Encodes images and texts with a loaded OpenCLIP model, in batches, each distinct input once.

    Features are L2-normalised ``float32`` tensors ``[N, D]`` on the CPU.
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str = "cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.batch_size = device, batch_size
        self._images: dict[Hashable, Any] = {}
        self._texts: dict[str, Any] = {}

    def images(self, refs: Sequence[ImageRef]):
        """``[len(refs), D]`` normalised image features."""
        import torch

        keys = [_image_key(r) for r in refs]
        todo = list(dict.fromkeys(k for k in keys if k not in self._images))
        by_key = dict(zip(keys, refs))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(open_image(by_key[k])) for k in chunk]).to(self.device)
            with torch.no_grad():
                feats = self.model.encode_image(batch, normalize=True).float().cpu()
            self._images.update(zip(chunk, feats))
        return torch.stack([self._images[k] for k in keys]) if keys else torch.zeros(0)

    def texts(self, texts: Sequence[str]):
        """``[len(texts), D]`` normalised text features."""
        import torch

        todo = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            with torch.no_grad():
                feats = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._texts.update(zip(chunk, feats))
        return torch.stack([self._texts[t] for t in texts]) if texts else torch.zeros(0)


def choice_correct(encoder: Encoder, items: Sequence[ChoiceItem]) -> np.ndarray:
    """Boolean ``[len(items)]``: whether the true caption strictly beats every distinct other option."""
    if not items:
        return np.zeros(0, dtype=bool)
    image_feats = encoder.images([it.image for it in items])
    encoder.texts(list(dict.fromkeys(o for it in items for o in it.options)))  # one batched pass, then cached
    correct = np.zeros(len(items), dtype=bool)
    for i, item in enumerate(items):
        others = [o for o in item.options[1:] if o != item.options[0]]
        if not others:
            raise ValueError(f"item {i} ({item.group}) has no option that differs from its true caption")
        sims = (encoder.texts([item.options[0], *others]) @ image_feats[i]).numpy()
        correct[i] = bool(np.all(sims[0] > sims[1:]))
    return correct


def accuracy_by_group(correct: np.ndarray, groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """``{group: {"accuracy": a, "n": n}}`` in first-seen order of the groups."""
    out: dict[str, dict[str, float | int]] = {}
    groups_arr = np.asarray(groups)
    for g in dict.fromkeys(groups):
        mask = groups_arr == g
        out[g] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return out


def require_file(path: str | Path, what: str) -> Path:
    """``Path(path)`` if it is a file; ``FileNotFoundError`` naming ``what`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: expected a file, got {str(p)!r} (not found)")
    return p


def require_dir(path: str | Path, what: str) -> Path:
    """``Path(path)`` if it is a directory; ``FileNotFoundError`` naming ``what`` otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: expected a directory, got {str(p)!r} (not found)")
    return p


def check_images_exist(refs: Sequence[ImageRef], what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and the first missing files, before any model work."""
    paths = {str(r[0] if isinstance(r, tuple) else r) for r in refs if not isinstance(r, LazyImage)}
    missing = sorted(p for p in paths if not Path(p).is_file())
    if missing:
        shown = ", ".join(missing[:3])
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(paths)} images not found (e.g. {shown})")
