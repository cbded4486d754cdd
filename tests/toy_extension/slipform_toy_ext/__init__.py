"""A third-party Slipform extension: a loss and a hard-negative generator registered by entry points."""

from __future__ import annotations

from slipform_plugin.hard_negatives import HardNegative
from slipform_plugin.losses import InfoNCELoss


class ToyLoss(InfoNCELoss):
    """InfoNCE under another name: proves a registered loss is the one that runs."""

    accepts_hard_negatives = True


def create_toy_loss(args):
    return ToyLoss(rank=args.rank, world_size=args.world_size, impl="reference")


class WordSwap:
    """Negatives made by swapping adjacent words (deterministic, no model)."""

    def __init__(self, num_negatives: int) -> None:
        self.num_negatives = num_negatives

    def plant(self, captions, keys):
        out = []
        for caption in captions:
            words = caption.split()
            negatives = []
            for i in range(len(words) - 1):
                swapped = [*words[:i], words[i + 1], words[i], *words[i + 2 :]]
                text = " ".join(swapped)
                if text != caption:
                    negatives.append(HardNegative(text, "other", 0.5, (0, 0)))
                if len(negatives) == self.num_negatives:
                    break
            out.append(negatives)
        return out


def create_word_swap(args):
    return WordSwap(args.hn_num)
