"""How a caption and its K hard negatives travel through OpenCLIP's batches as one integer tensor.

OpenCLIP's training loop unpacks exactly ``images, texts = batch`` and moves ``texts`` to the device, so the
negatives ride inside ``texts``: each sample's text becomes ``[1 + K, L + 3]`` int64, row 0 the caption's
tokens and rows 1..K the negatives', with three metadata columns appended to every row:

    column L     : 1 where the row is real, 0 for a padding row (a missing negative, masked in the loss)
    column L + 1 : the negative's kind id (index into HARD_NEGATIVE_KINDS; -1 on row 0 and padding)
    column L + 2 : the negative's score, quantised as round(score * 2**20)

A batch is then ``[B, 1 + K, L + 3]``; a plain caption batch stays ``[B, L]``, which is how the patched model
tells the two apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slipform_plugin.hard_negatives import KIND_TO_ID, HardNegative

META_COLUMNS = 3
SCORE_QUANTUM = 2**20


def pack_caption_tokens(tokens: Tensor, negatives: Sequence[HardNegative], num_negatives: int) -> Tensor:
    """Pack the tokens of a caption and its negatives into ``[1 + K, L + 3]``.

    Args:
        tokens: ``[1 + n, L]`` int64 tokens, row 0 the caption, rows 1..n the ``n <= K`` negatives.
        negatives: the ``n`` negatives, in the same order as ``tokens[1:]``.
        num_negatives: ``K``; rows ``n + 1 .. K`` are zero padding with their mask column at 0.
    """
    count = len(negatives)
    if tokens.shape[0] != count + 1:
        raise ValueError(f"pack_caption_tokens: expected {count + 1} token rows, got {tokens.shape[0]}")
    if count > num_negatives:
        raise ValueError(f"pack_caption_tokens: expected at most {num_negatives} negatives, got {count}")
    length = tokens.shape[1]
    packed = torch.zeros(1 + num_negatives, length + META_COLUMNS, dtype=torch.long)
    packed[: count + 1, :length] = tokens
    packed[: count + 1, length] = 1
    packed[:, length + 1] = -1
    for row, negative in enumerate(negatives, start=1):
        packed[row, length + 1] = KIND_TO_ID[negative.kind]
        packed[row, length + 2] = round(float(negative.score) * SCORE_QUANTUM)
    return packed


def is_packed(texts: Tensor | None) -> bool:
    """True when ``texts`` is a packed ``[B, 1 + K, L + 3]`` batch rather than plain ``[B, L]`` tokens."""
    return isinstance(texts, Tensor) and texts.ndim == 3


def unpack_batch(packed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a packed batch.

    Args:
        packed: ``[B, 1 + K, L + 3]`` int64.
    Returns:
        ``tokens [B, 1 + K, L]``, ``hn_mask [B, K]`` bool, ``hn_kinds [B, K]`` int64, ``hn_scores [B, K]`` fp32.
    """
    if packed.ndim != 3 or packed.shape[2] <= META_COLUMNS:
        raise ValueError(f"unpack_batch: expected a [B, 1 + K, L + {META_COLUMNS}] tensor, got {tuple(packed.shape)}")
    length = packed.shape[2] - META_COLUMNS
    tokens = packed[:, :, :length]
    mask = packed[:, 1:, length] > 0
    kinds = packed[:, 1:, length + 1]
    scores = packed[:, 1:, length + 2].float() / SCORE_QUANTUM
    return tokens, mask, kinds, scores
