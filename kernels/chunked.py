"""Chunked PyTorch path of the Cement loss: tiles as matmuls, online log-sum-exp, O(M D) memory.

The loss (see ``slipform_plugin.losses.reference`` for the definition) splits into

    loss = ( sum_{i local} (LSE_i^row - z_ii) + sum_{j local} (LSE_j^col - w_jj) ) / (2B)

The K hard-negative logits of each local row are O(B K D) and left to autograd. The expensive part, the
log-sum-exps over the M x M (or B x M) similarity matrix with the in-tile difficulty margins, and the
positive logits ``z_ii = w_ii = s x_i.y_i`` (no margin on the positive) are :class:`TiledLSE`, one
``torch.autograd.Function`` whose backward writes each input's gradient into a single buffer:

forward, for a row block I (``block_rows`` rows) and every column chunk J (``block_cols`` columns):

    T0 = (s * a_I) @ b_J^T                                       one matmul, 2 |I| |J| D FLOPs
    T^r = T0 + s mu_b sigmoid(T0 / (s gamma) + (delta - p_i) / gamma),  diagonal (positive) entries = T0
    T^c = T0 + s mu_b sigmoid(T0 / (s gamma) + (delta - p_j) / gamma),  idem
    row (max, sum exp) updated online along J; column (max, sum exp) updated online along I

    where p_i = a_i . b_{i + offset} is the row's positive similarity (detached: margins carry no gradient).
    Rows and columns come out of the SAME tile in the global case, so the forward pass costs 2 M^2 D FLOPs.

backward, given g^r = dL/dLSE^row and g^c = dL/dLSE^col, recompute each tile once:

    G = g^r_i softmax_row(T^r)_ij + g^c_j softmax_col(T^c)_ij = exp(T^r - (LSE^r_i - log g^r_i))
                                                                  + exp(T^c - (LSE^c_j - log g^c_j))
    dL/da_I += s * G @ b_J,   dL/db_J += G^T @ (s a_I),   dL/ds = sum_i a_i . (G b)_i
    plus the positive term: dL/da_p += g^pos_p s b_{p+off},  dL/db_{p+off} += g^pos_p s a_p

    (margins are constants, so dT/dS = s and dT/ds = S). That is 3 matmuls per tile, 6 M^2 D FLOPs: with the
    forward, 8 M^2 D for the symmetric loss, the floor for O(M D) memory.

For ``--local-loss`` (B < M local rows/columns) the rows are ``x_local`` against every caption and the
columns ``y_local`` against every image: two row-only calls of the same Function (16 B M D FLOPs in all).
All arithmetic is fp32 whatever the input dtype; the largest temporaries are at most four ``block_rows x
block_cols`` fp32 tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Default tile: rows per block and columns per chunk (4 M floats = 16 MiB per tile buffer; fewer, larger ops
#: keep both cores busy when the machine is shared, and the buffers stay O(1) in N).
DEFAULT_BLOCK_ROWS = 2048
DEFAULT_BLOCK_COLS = 2048


@dataclass(frozen=True)
class TileConfig:
    """Static settings of one :class:`TiledLSE` call.

    Attributes:
        diag_offset: row ``p``'s positive is column ``p + diag_offset``.
        want_cols: also compute column log-sum-exps (needs ``P == Q`` and ``diag_offset == 0``).
        margin_batch: ``mu_b``; 0 turns the difficulty margin off.
        offset: ``delta``; temperature: ``gamma``.
        block_rows, block_cols: tile shape.
    """

    diag_offset: int = 0
    want_cols: bool = False
    margin_batch: float = 0.0
    offset: float = 0.0
    temperature: float = 0.05
    block_rows: int = DEFAULT_BLOCK_ROWS
    block_cols: int = DEFAULT_BLOCK_COLS


def _tile_view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous ``[rows, cols]`` view at the start of a flat buffer (ragged last tiles stay contiguous)."""
    return buffer[: rows * cols].view(rows, cols)


def _margin_logits(t0: Tensor, out: Tensor, bias: Tensor, scale: float, cfg: TileConfig, diag: int) -> Tensor:
    """``out = T0 + s mu_b sigmoid(T0 / (s gamma) + bias)`` with the positive entries (diagonal ``diag``) = T0.

    ``bias`` is ``(delta - p) / gamma`` shaped ``[R, 1]`` (rows) or ``[1, C]`` (columns). 3 passes over the tile.
    """
    torch.add(bias, t0, alpha=1.0 / (scale * cfg.temperature), out=out)
    out.sigmoid_()
    torch.add(t0, out, alpha=scale * cfg.margin_batch, out=out)
    rows, cols = t0.shape
    if -rows < diag < cols:
        out.diagonal(diag).copy_(t0.diagonal(diag))
    return out


class TiledLSE(torch.autograd.Function):
    """Row (and optionally column) log-sum-exps of ``s a b^T + margins`` without materialising the matrix.

    forward(a ``[P, D]`` fp32, b ``[Q, D]`` fp32, scale 0-dim fp32, cfg) returns
    ``(row_lse [P], col_lse [Q] or [0], positive_logit [P])`` where ``positive_logit_p = s a_p . b_{p+offset}``.
    The positive logits are an output (not left to autograd) so that backward writes every gradient into one
    buffer per input: no extra ``[M, D]`` temporaries.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scale: Tensor, cfg: TileConfig):  # type: ignore[override]
        s = float(scale)
        positives = (a * b[cfg.diag_offset : cfg.diag_offset + a.shape[0]]).sum(dim=1)  # [P], margins' p_i
        num_rows, num_cols = a.shape[0], b.shape[0]
        br, bc = min(cfg.block_rows, num_rows), min(cfg.block_cols, num_cols)
        use_margin = cfg.margin_batch != 0.0
        options = {"device": a.device, "dtype": torch.float32}
        t0_buf = torch.empty(br * bc, **options)
        logit_buf = torch.empty(br * bc, **options) if use_margin else None
        exp_buf = torch.empty(br * bc, **options)
        bias = (cfg.offset - positives) / cfg.temperature  # [P]
        row_lse = torch.empty(num_rows, **options)
        col_max = torch.full((num_cols if cfg.want_cols else 0,), float("-inf"), **options)
        col_sum = torch.zeros_like(col_max)
        for r0 in range(0, num_rows, br):
            r1 = min(r0 + br, num_rows)
            a_scaled = a[r0:r1] * s
            row_max = torch.full((r1 - r0,), float("-inf"), **options)
            row_sum = torch.zeros(r1 - r0, **options)
            for c0 in range(0, num_cols, bc):
                c1 = min(c0 + bc, num_cols)
                t0 = torch.mm(a_scaled, b[c0:c1].T, out=_tile_view(t0_buf, r1 - r0, c1 - c0))
                exp_tile = _tile_view(exp_buf, r1 - r0, c1 - c0)
                diag = r0 + cfg.diag_offset - c0
                logits = t0
                if use_margin:
                    logits = _margin_logits(
                        t0, _tile_view(logit_buf, r1 - r0, c1 - c0), bias[r0:r1, None], s, cfg, diag
                    )
                # Online row log-sum-exp: rescale the running sum to the new running max.
                new_max = torch.maximum(row_max, logits.amax(dim=1))
                torch.sub(logits, new_max[:, None], out=exp_tile).exp_()
                row_sum.mul_(torch.exp(row_max - new_max)).add_(exp_tile.sum(dim=1))
                row_max = new_max
                if cfg.want_cols:
                    if use_margin:
                        logits = _margin_logits(t0, logits, bias[None, c0:c1], s, cfg, diag)
                    old_max = col_max[c0:c1]
                    new_max = torch.maximum(old_max, logits.amax(dim=0))
                    torch.sub(logits, new_max[None, :], out=exp_tile).exp_()
                    col_sum[c0:c1].mul_(torch.exp(old_max - new_max)).add_(exp_tile.sum(dim=0))
                    col_max[c0:c1] = new_max
            row_lse[r0:r1] = row_max + row_sum.log()
        col_lse = col_max + col_sum.log()
        ctx.save_for_backward(a, b, scale, positives, row_lse, col_lse)
        ctx.cfg = cfg
        return row_lse, col_lse, positives * s

    @staticmethod
    def backward(ctx, grad_row: Tensor | None, grad_col: Tensor | None, grad_positive: Tensor | None):  # type: ignore[override]
        a, b, scale, positives, row_lse, col_lse = ctx.saved_tensors
        cfg: TileConfig = ctx.cfg
        s = float(scale)
        num_rows, num_cols = a.shape[0], b.shape[0]
        br, bc = min(cfg.block_rows, num_rows), min(cfg.block_cols, num_cols)
        use_margin = cfg.margin_batch != 0.0
        options = {"device": a.device, "dtype": torch.float32}
        grad_row = torch.zeros(num_rows, **options) if grad_row is None else grad_row.float()
        want_cols = cfg.want_cols and grad_col is not None
        grad_col = torch.zeros(col_lse.shape[0], **options) if grad_col is None else grad_col.float()
        # G = sum of softmaxes weighted by the incoming gradients. When every weight has one sign (always, in
        # this loss) fold log|g| into the shift: G = sign * (exp(T^r - (lse - log|g^r|)) + exp(T^c - ...)),
        # saving a multiply pass per direction. Mixed signs fall back to explicit multiplies.
        nonneg = bool((grad_row >= 0).all()) and bool((grad_col >= 0).all())
        nonpos = bool((grad_row <= 0).all()) and bool((grad_col <= 0).all())
        sign = -1.0 if (nonpos and not nonneg) else 1.0
        folded = nonneg or nonpos
        if folded:
            row_shift = row_lse - torch.log(grad_row * sign)  # log 0 = -inf -> shift +inf -> exp(...) = 0
            col_shift = col_lse - torch.log(grad_col * sign)
        else:
            row_shift, col_shift = row_lse, col_lse
        bias = (cfg.offset - positives) / cfg.temperature
        t0_buf = torch.empty(br * bc, **options)
        logit_buf = torch.empty(br * bc, **options) if use_margin else None
        grad_buf = torch.empty(br * bc, **options)
        grad_a = torch.zeros_like(a)
        grad_b = torch.zeros_like(b)
        for r0 in range(0, num_rows, br):
            r1 = min(r0 + br, num_rows)
            a_scaled = a[r0:r1] * s
            acc_a = grad_a[r0:r1]  # contiguous row slice: accumulate in place
            for c0 in range(0, num_cols, bc):
                c1 = min(c0 + bc, num_cols)
                t0 = torch.mm(a_scaled, b[c0:c1].T, out=_tile_view(t0_buf, r1 - r0, c1 - c0))
                diag = r0 + cfg.diag_offset - c0
                logits = t0
                if use_margin:
                    logits = _margin_logits(
                        t0, _tile_view(logit_buf, r1 - r0, c1 - c0), bias[r0:r1, None], s, cfg, diag
                    )
                grad_tile = torch.sub(logits, row_shift[r0:r1, None], out=_tile_view(grad_buf, r1 - r0, c1 - c0))
                grad_tile.exp_()
                if not folded:
                    grad_tile.mul_(grad_row[r0:r1, None])
                if want_cols:
                    if use_margin:
                        logits = _margin_logits(t0, logits, bias[None, c0:c1], s, cfg, diag)
                    # The last use of this tile's logits (T0 itself without margins): work in place.
                    col_tile = logits.sub_(col_shift[None, c0:c1]).exp_()
                    if folded:
                        grad_tile.add_(col_tile)
                    else:
                        grad_tile.addcmul_(col_tile, grad_col[None, c0:c1])
                acc_a.addmm_(grad_tile, b[c0:c1])
                grad_b[c0:c1].addmm_(grad_tile.T, a_scaled)
        if grad_positive is not None:
            # Positive logits s a_p . b_{p+offset}: added in the folded frame (grad_a is unscaled, carries `sign`).
            diagonal = slice(cfg.diag_offset, cfg.diag_offset + num_rows)
            weight = grad_positive.float()[:, None] * sign
            grad_a.addcmul_(weight, b[diagonal])
            grad_b[diagonal].addcmul_(weight * s, a)
        # dL/ds = sum_ij G_ij S_ij = sum_i a_i . (G b)_i, before the factor s is applied to grad_a.
        # (a flat dot product: no [P, D] temporary)
        grad_scale = torch.dot(a.reshape(-1), grad_a.reshape(-1)) * sign if ctx.needs_input_grad[2] else None
        grad_a.mul_(s * sign)
        if sign < 0:
            grad_b.neg_()
        return grad_a, grad_b, grad_scale, None


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    ``torch.distributed.nn.all_gather``'s gloo backward (torch 2.14) scatters raw contiguous bytes into
    ``empty_like(grad)``: a non-contiguous gradient (``einsum``'s backward gives one for ``[B, K, D]``) comes
    back scrambled. The gradients this module returns are therefore always contiguous.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def cement_loss_chunked(
    image_features: Tensor,
    text_features: Tensor,
    scale: Tensor,
    hn_text_features: Tensor | None,
    hn_scores: Tensor | None,
    hn_mask: Tensor | None,
    *,
    margin_hard: float,
    margin_batch: float,
    difficulty_offset: float,
    difficulty_temperature: float,
    local_start: int,
    local_size: int,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> Tensor:
    """Symmetric Cement loss through :class:`TiledLSE` (inputs already validated).

    Args:
        image_features, text_features: ``[M, D]`` any float dtype (computed in fp32).
        scale: 0-dim fp32 tensor ``s`` (may require grad).
        hn_text_features: ``[B, K, D]`` or None; hn_scores ``[B, K]`` or None; hn_mask ``[B, K]`` bool or None.
        local_start, local_size: the ``B`` local rows/columns inside the ``M``.
        block_rows, block_cols: tile shape (default: the module's ``DEFAULT_BLOCK_ROWS`` / ``DEFAULT_BLOCK_COLS``).
    Returns:
        Scalar fp32 loss (logit bias excluded: it cancels exactly, see ``cement_loss``).
    """
    image = ContiguousGrad.apply(image_features).float()
    text = ContiguousGrad.apply(text_features).float()
    num_total = image.shape[0]
    rows = slice(local_start, local_start + local_size)
    common = {
        "margin_batch": float(margin_batch),
        "offset": float(difficulty_offset),
        "temperature": float(difficulty_temperature),
        "block_rows": DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows),
        "block_cols": DEFAULT_BLOCK_COLS if block_cols is None else int(block_cols),
    }
    if local_size == num_total:
        cfg = TileConfig(diag_offset=0, want_cols=True, **common)
        row_lse, col_lse, positive_logit = TiledLSE.apply(image.contiguous(), text.contiguous(), scale, cfg)
    else:
        # Local rows: local images against every caption; local columns: local captions against every image.
        cfg = TileConfig(diag_offset=local_start, want_cols=False, **common)
        row_lse, _, positive_logit = TiledLSE.apply(image[rows].contiguous(), text.contiguous(), scale, cfg)
        col_lse, _, _ = TiledLSE.apply(text[rows].contiguous(), image.contiguous(), scale, cfg)
    if hn_text_features is not None and hn_text_features.shape[1] > 0:
        hard = ContiguousGrad.apply(hn_text_features).float()
        hard_similarity = torch.einsum("bd,bkd->bk", image[rows], hard)  # [B, K]
        hard_logit = scale * hard_similarity
        if hn_scores is not None and margin_hard != 0.0:
            hard_logit = hard_logit + scale.detach() * margin_hard * hn_scores.float()
        if hn_mask is not None:
            hard_logit = hard_logit.masked_fill(~hn_mask, float("-inf"))
        # The tile LSE is finite, so the merged LSE is too and masked (-inf) entries get exactly zero gradient.
        row_lse = torch.logsumexp(torch.cat([row_lse[:, None], hard_logit], dim=1), dim=1)
    total = (row_lse - positive_logit).sum() + (col_lse - positive_logit).sum()
    return total / (2 * local_size)


def flops_symmetric(num_total: int, dim: int) -> float:
    """The FLOP count used for throughput figures: ``8 M^2 D`` (2 forward + 6 backward, per M^2 D)."""
    return 8.0 * float(num_total) ** 2 * dim


__all__ = [
    "DEFAULT_BLOCK_COLS",
    "DEFAULT_BLOCK_ROWS",
    "ContiguousGrad",
    "TileConfig",
    "TiledLSE",
    "cement_loss_chunked",
    "flops_symmetric",
]
