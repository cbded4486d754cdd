"""Plain PyTorch reference of the Cement loss (and of InfoNCE, its zero-margin case).

It builds the full similarity matrix: it is the ground truth that the chunked and Triton paths in
``slipform_plugin.kernels`` are tested against, not the path to train with at large batch.

Definition (README, section "The Cement loss"). For L2-normalised image features ``x_i``, caption features
``y_j``, hard-negative caption features ``h_ik`` with scores ``c_ik`` in [0, 1] and mask ``v_ik``, scale
``s`` and bias ``b``:

    row i (image -> text), over the M captions and image i's own K hard negatives:
        z_ij  = s * x_i.y_j + b + [j != i] * s * mu_b * sigmoid((x_i.y_j - x_i.y_i + delta) / gamma)
        z_ik' = s * x_i.h_ik + b + s * mu_h * c_ik * [d_ik]       (-inf where v_ik is False)
        with hard_margin_difficulty, d_ik = sigmoid((x_i.h_ik - x_i.y_i + delta) / gamma), else 1
        L_i^row = logsumexp_j,k(z) - z_ii
    column j (text -> image), over the M images, no hard negatives:
        w_ij  = s * x_i.y_j + b + [i != j] * s * mu_b * sigmoid((x_i.y_j - x_j.y_j + delta) / gamma)
        L_j^col = logsumexp_i(w_.j) - w_jj
    hard-negative term of row i, the caption against its own hard negatives only (its own softmax):
        H_i = logsumexp(s * x_i.y_i, z_i1', ..., z_iK') - s * x_i.y_i      (0 for a row without real negatives)
    loss = (sum_{i local} L_i^row + sum_{j local} L_j^col + lambda * sum_{i local} H_i) / (2 * B)

The margins are constants in the gradient (computed from detached similarities and a detached scale).
With ``mu_b = mu_h = lambda = 0`` this is InfoNCE with the hard negatives as extra columns of the image-to-text
rows, and with ``K = 0`` as well it is OpenCLIP's ``ClipLoss``.

``local_start`` / ``local_size`` select the rows and columns this process owns inside gathered features
(OpenCLIP's ``--local-loss``); the defaults take all of them (the global loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def difficulty_margin(
    similarity: Tensor,
    positive_similarity: Tensor,
    scale: Tensor,
    margin_batch: float,
    offset: float,
    temperature: float,
) -> Tensor:
    """In-batch difficulty margin ``s * mu_b * sigmoid((sim - sim_pos + delta) / gamma)``, detached.

    Args:
        similarity: ``[..., M]`` cosine similarities of a row (or column) to every candidate.
        positive_similarity: ``[..., 1]`` the same row's positive similarity, broadcast against ``similarity``.
        scale: the (exponentiated) logit scale, a scalar tensor.
    Returns:
        ``[..., M]`` margins in logit units, without gradient.
    """
    with torch.no_grad():
        gap = (similarity.float() - positive_similarity.float() + offset) / temperature
        return scale.detach().float() * margin_batch * torch.sigmoid(gap)


def hard_pair_difficulty(
    hard_similarity: Tensor, positive_similarity: Tensor, offset: float, temperature: float
) -> Tensor:
    """Difficulty of each (image, hard negative) pair, ``sigmoid((x_i.h_ik - x_i.y_i + delta) / gamma)``, detached.

    With ``hard_margin_difficulty`` Cement multiplies each concreteness margin by it: a hard negative the model
    already places well below the caption keeps almost no margin, one it cannot yet tell apart keeps about
    half, one it prefers to the caption keeps all of it.

    Args:
        hard_similarity: ``[B, K]`` cosine similarities of each image to its own hard negatives.
        positive_similarity: ``[B, 1]`` each image's similarity to its own caption.
    Returns:
        ``[B, K]`` fp32 weights in (0, 1), without gradient.
    """
    with torch.no_grad():
        return torch.sigmoid((hard_similarity.float() - positive_similarity.float() + offset) / temperature)


def cement_loss_reference(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    hn_text_features: Tensor | None = None,
    hn_scores: Tensor | None = None,
    hn_mask: Tensor | None = None,
    *,
    margin_hard: float = 0.0,
    margin_batch: float = 0.0,
    difficulty_offset: float = 0.0,
    difficulty_temperature: float = 0.05,
    hard_weight: float = 0.0,
    hard_margin_difficulty: bool = False,
    hard_difficulty_offset: float | None = None,
    logit_bias: Tensor | float | None = None,
    local_start: int = 0,
    local_size: int | None = None,
) -> Tensor:
    """Symmetric Cement loss with the full similarity matrix, computed in fp32.

    Args:
        image_features: ``[M, D]`` normalised image features (all ranks' when gathered).
        text_features: ``[M, D]`` normalised caption features; caption ``j`` is image ``j``'s positive.
        logit_scale: exponentiated scale ``s`` (scalar tensor or float).
        hn_text_features: ``[B, K, D]`` hard-negative caption features of the ``B`` local rows, or None.
        hn_scores: ``[B, K]`` concreteness scores in [0, 1] (None means all zero).
        hn_mask: ``[B, K]`` bool, True where the negative is real (None means all real).
        margin_hard: ``mu_h``, the concreteness margin in cosine units.
        margin_batch: ``mu_b``, the largest difficulty margin in cosine units.
        difficulty_offset: ``delta`` of the difficulty sigmoid.
        difficulty_temperature: ``gamma`` (> 0) of the difficulty sigmoid.
        hard_weight: ``lambda``, the weight of the hard-negative term ``H_i``.
        hard_margin_difficulty: multiply each concreteness margin by its pair's difficulty
            (:func:`hard_pair_difficulty`, with ``delta`` and ``gamma``).
        hard_difficulty_offset: ``delta_h``, that sigmoid's offset if not ``delta`` (None: ``delta``).
        logit_bias: optional scalar added to every logit (SigLIP-style models).
        local_start: index of the first local row/column inside the ``M`` gathered ones.
        local_size: number ``B`` of local rows/columns (default: all ``M - local_start``).
    Returns:
        Scalar fp32 loss.
    """
    num_total = image_features.shape[0]
    size = num_total - local_start if local_size is None else local_size
    image = image_features.float()
    text = text_features.float()
    scale = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale), device=image.device)
    scale = scale.float()
    bias = 0.0 if logit_bias is None else logit_bias
    rows = slice(local_start, local_start + size)
    targets = torch.arange(local_start, local_start + size, device=image.device)

    # Image -> text rows: local images against every caption.
    row_similarity = image[rows] @ text.T  # [B, M]
    row_positive = row_similarity.gather(1, targets[:, None])  # [B, 1]
    row_logits = scale * row_similarity + bias
    if margin_batch != 0.0:
        margin = difficulty_margin(
            row_similarity, row_positive, scale, margin_batch, difficulty_offset, difficulty_temperature
        )
        margin = margin.scatter(1, targets[:, None], 0.0)
        row_logits = row_logits + margin
    if hn_text_features is not None and hn_text_features.shape[1] > 0:
        hard = hn_text_features.float()
        hard_similarity = torch.einsum("bd,bkd->bk", image[rows], hard)  # [B, K]
        hard_logits = scale * hard_similarity + bias
        if hn_scores is not None and margin_hard != 0.0:
            scores = hn_scores.float()
            if hard_margin_difficulty:
                hard_offset = difficulty_offset if hard_difficulty_offset is None else hard_difficulty_offset
                scores = scores * hard_pair_difficulty(
                    hard_similarity, row_positive, hard_offset, difficulty_temperature
                )
            hard_logits = hard_logits + scale.detach() * margin_hard * scores
        if hn_mask is not None:
            hard_logits = hard_logits.masked_fill(~hn_mask.bool(), float("-inf"))
        row_logits = torch.cat([row_logits, hard_logits], dim=1)
    row_loss = F.cross_entropy(row_logits, targets, reduction="sum")
    if hard_weight != 0.0 and row_logits.shape[1] > num_total:
        # H_i: the positive's logit (no margin on it) against the row's hard-negative columns only.
        positive_logit = row_logits.gather(1, targets[:, None])
        hard_term = torch.logsumexp(torch.cat([positive_logit, row_logits[:, num_total:]], dim=1), dim=1)
        row_loss = row_loss + hard_weight * (hard_term - positive_logit[:, 0]).sum()

    # Text -> image columns: local captions against every image.
    col_similarity = text[rows] @ image.T  # [B, M]
    col_positive = col_similarity.gather(1, targets[:, None])
    col_logits = scale * col_similarity + bias
    if margin_batch != 0.0:
        margin = difficulty_margin(
            col_similarity, col_positive, scale, margin_batch, difficulty_offset, difficulty_temperature
        )
        margin = margin.scatter(1, targets[:, None], 0.0)
        col_logits = col_logits + margin
    col_loss = F.cross_entropy(col_logits, targets, reduction="sum")
    return (row_loss + col_loss) / (2 * size)


def hard_negative_accuracy(
    image_features: Tensor, text_features: Tensor, hn_text_features: Tensor, hn_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """How often an image's caption beats all of that image's own real hard negatives.

    Args:
        image_features: ``[B, D]``; text_features: ``[B, D]``; hn_text_features: ``[B, K, D]``; hn_mask ``[B, K]``.
    Returns:
        ``(correct, counted)``: number of rows whose positive wins and number of rows with a real negative.
    """
    wins, has_negative = hard_negative_wins(image_features, text_features, hn_text_features, hn_mask)
    return wins.sum(), has_negative.sum()


def hard_negative_pair_wins(
    image_features: Tensor, text_features: Tensor, hn_text_features: Tensor, hn_mask: Tensor | None = None
) -> Tensor:
    """Per negative: whether the caption beats that one hard negative of its image (raw cosine, no margins).

    Args:
        image_features: ``[B, D]``; text_features: ``[B, D]``; hn_text_features: ``[B, K, D]``; hn_mask ``[B, K]``.
    Returns:
        bool ``[B, K]``, False where a negative is not real.
    """
    with torch.no_grad():
        positive = (image_features.float() * text_features.float()).sum(-1, keepdim=True)  # [B, 1]
        hard = torch.einsum("bd,bkd->bk", image_features.float(), hn_text_features.float())  # [B, K]
        wins = positive > hard
        if hn_mask is not None:
            wins = wins & hn_mask.bool()
        return wins


def hard_negative_wins(
    image_features: Tensor, text_features: Tensor, hn_text_features: Tensor, hn_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per row: whether the caption beats all of its image's real hard negatives (raw cosine, no margins).

    Args:
        image_features: ``[B, D]``; text_features: ``[B, D]``; hn_text_features: ``[B, K, D]``; hn_mask ``[B, K]``.
    Returns:
        ``(wins, has_negative)``, both bool ``[B]``; ``wins`` is False where a row has no real negative.
    """
    pair_wins = hard_negative_pair_wins(image_features, text_features, hn_text_features, hn_mask)
    return hard_negative_row_wins(pair_wins, hn_mask)


def hard_negative_row_wins(pair_wins: Tensor, hn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows whose caption beats all of its real hard negatives, from :func:`hard_negative_pair_wins`.

    Args:
        pair_wins: bool ``[B, K]``; hn_mask: ``[B, K]`` or None (all real).
    Returns:
        ``(wins, has_negative)``, both bool ``[B]``; ``wins`` is False where a row has no real negative.
    """
    if hn_mask is None:
        hn_mask = torch.ones(pair_wins.shape, dtype=torch.bool, device=pair_wins.device)
    real = hn_mask.bool()
    has_negative = real.any(dim=1)
    return (pair_wins | ~real).all(dim=1) & has_negative, has_negative


def hard_negative_term(
    image_rows: Tensor,
    text_rows: Tensor,
    scale: Tensor,
    hn_text_features: Tensor,
    hn_scores: Tensor | None,
    hn_mask: Tensor | None,
    margin_hard: float,
    unit_difference_floor: float | None = None,
) -> Tensor:
    """Sum over rows of Cement's hard-negative term ``H_i`` (README, "The Cement loss"), by autograd.

    ``H_i = logsumexp(s x_i.y_i, s x_i.h_i1 + s mu_h c_i1, ...) - s x_i.y_i``: each caption against its own
    image's real hard negatives only, in a softmax of its own, so that the K fine-grained comparisons of a row
    are not diluted by the row's M in-batch columns. It costs O(B K D), so every implementation computes it
    here with autograd rather than inside the tiled kernels. The margin is a constant (detached scale).

    Args:
        image_rows: ``[B, D]`` the local rows' image features; text_rows: ``[B, D]`` their captions' features.
        scale: the exponentiated logit scale ``s`` (0-dim tensor; gradient flows).
        hn_text_features: ``[B, K, D]``; hn_scores: ``[B, K]`` in [0, 1] or None (0); hn_mask: ``[B, K]`` or None.
        margin_hard: ``mu_h`` (already gated by the caller).
        unit_difference_floor: None (the default) for ``H_i`` as above. A number ``eps > 0`` divides each
            hard pair's cosine gap by the (detached) distance of the two captions in text space,
            ``x_i.(h_ik - y_i) / max(|h_ik - y_i|, eps)``: the image is asked to prefer its caption along the
            unit direction that tells the two apart, so that a swap the text tower maps close to its caption
            still gives the image tower a full-size gradient.
    Returns:
        Scalar fp32 ``sum_i H_i`` (rows without a real negative contribute 0).
    """
    image = image_rows.float()
    scale = scale.float()
    positive = scale * (image * text_rows.float()).sum(-1, keepdim=True)  # [B, 1]
    hard = scale * torch.einsum("bd,bkd->bk", image, hn_text_features.float())  # [B, K]
    if unit_difference_floor is not None:
        with torch.no_grad():
            distance = (hn_text_features.float() - text_rows.float()[:, None]).norm(dim=-1)  # [B, K]
            distance = distance.clamp_min(unit_difference_floor)
        hard = positive + (hard - positive) / distance
    if hn_scores is not None and margin_hard != 0.0:
        hard = hard + scale.detach() * margin_hard * hn_scores.float()
    if hn_mask is not None:
        hard = hard.masked_fill(~hn_mask.bool(), float("-inf"))
    return (torch.logsumexp(torch.cat([positive, hard], dim=1), dim=1) - positive[:, 0]).sum()


def caption_separation_term(
    text_rows: Tensor,
    hn_text_features: Tensor,
    hn_scores: Tensor | None,
    hn_mask: Tensor | None,
    margin_text: float,
) -> Tensor:
    """Sum over rows of Cement's caption-separation term ``S_i`` (README, "The Cement loss"), by autograd.

    ``S_i = sum_k v_ik max(0, y_i.h_ik - (1 - mu_t c_ik))``: a caption and its own hard negative may be at most
    ``1 - mu_t c_ik`` alike in the text tower's own space, so that captions with the same words in another
    order (swaps, which a bag-of-words text tower maps to almost the same vector) are pulled apart even before
    the image tower can tell them apart. Negatives that change a word are usually far below the threshold and
    cost nothing. It needs no image features and costs O(B K D).

    Args:
        text_rows: ``[B, D]`` the local rows' normalised caption features.
        hn_text_features: ``[B, K, D]`` normalised hard-negative caption features.
        hn_scores: ``[B, K]`` concreteness scores ``c_ik`` in [0, 1], or None (0: every threshold is 1).
        hn_mask: ``[B, K]`` bool, True where a negative is real, or None (all real).
        margin_text: ``mu_t`` in [0, 2], the separation asked of a negative with score 1.
    Returns:
        Scalar fp32 ``sum_i S_i``.
    """
    similarity = torch.einsum("bd,bkd->bk", text_rows.float(), hn_text_features.float())  # [B, K]
    threshold = 1.0 - margin_text * (hn_scores.float() if hn_scores is not None else torch.zeros_like(similarity))
    excess = torch.relu(similarity - threshold)
    if hn_mask is not None:
        excess = excess.masked_fill(~hn_mask.bool(), 0.0)
    return excess.sum()
