"""Fused Triton forward and backward kernels of the symmetric Cement loss.

Notation (see ``slipform_plugin.losses.reference`` for the definition): row features ``a`` ``[P, D]``,
column features ``b`` ``[Q, D]``, row ``i``'s positive is column ``i + off``, ``p_i = a_i . b_{i+off}``
(detached), scale ``s``, hard negatives ``h`` ``[P, K, D]`` with a per-entry offset
``eta_ik = s mu_h c_ik`` (``-inf`` where masked).

Forward, program = one block of ``BLOCK_M`` rows, looping over column tiles of ``BLOCK_N`` (and over D in
chunks of ``BLOCK_D``)::

    S   = a_I b_J^T                                           fp32 accumulation (tl.dot)
    T^r = s S + s mu_b sigmoid((S - p_i + delta) / gamma)     (= s S on the positive)
    T^c = s S + s mu_b sigmoid((S - p_j + delta) / gamma)     (= s S on the positive)
    running row max m_i and sum l_i over all J (online log-sum-exp), then the K hard negatives
    T^h_ik = s a_i.h_ik + eta_ik
    LSE^r_i = m_i + log l_i
    column partial LSE over this block's rows  ->  COL_PART[block, j];   LSE^c_j = logsumexp_block COL_PART

Every exp is of (logit - running max) <= 0, so logit_scale 100 (or larger) cannot overflow.

Backward, given g^r = dL/dLSE^r, g^c = dL/dLSE^c (one sign, folded into the shifts
``sh^r_i = LSE^r_i - log|g^r_i|``), recompute each tile once::

    G     = exp(T^r - sh^r_i) + exp(T^c - sh^c_j)             = g^r softmax_row + g^c softmax_col
    dA_I += G @ b_J            (rows owned by the program: plain load/add/store)
    dB_J += G^T @ a_I          (atomic adds, columns are shared between programs)
    G^h   = exp(T^h - sh^r_i);  dA_i += sum_k G^h_ik h_ik;  dH_ik = G^h_ik a_i
    host: dL/da = s dA,  dL/db = s dB,  dL/dh = s dH,  dL/ds = sum_i a_i . dA_i   (margins are constants)

FLOPs: forward 2 P Q D, backward 6 P Q D (recompute S, G @ b, G^T @ a): 8 M^2 D for the global symmetric
loss, both directions from the same tiles (Inf-CL needs about 20 M^2 D with two one-direction calls).
Memory: O((P + Q) D) plus the ``ceil(P / BLOCK_M) x Q`` fp32 column-partial buffer (M^2 / 32 bytes with
``BLOCK_M = 128``: 128 MiB at M = 65,536).

All program offsets are int64. Inputs may be fp32, bf16 or fp16; dots accumulate in fp32 (fp32 inputs use
IEEE fp32 dots, not TF32; 16-bit inputs use tensor cores, and backward casts G to the input dtype for its
two dots, as FlashAttention does). Under
``TRITON_INTERPRET=1`` (CPU) the loaded blocks are upcast to fp32 first (the interpreter's bf16 ``tl.dot``
is wrong), and autotuning has a single configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(interpret: bool) -> list[triton.Config]:
    """Autotune space: column tile and D chunk widths, warps and pipeline stages (BLOCK_M is set by the host)."""
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)
        for block_n in (64, 128)
        for block_d in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
        if not (block_n == 128 and block_d == 64 and stages == 3)  # too much shared memory for fp32 tiles
    ]


@triton.jit
def _logits(sim, scale, positive, delta, inv_gamma, margin_scale, is_positive, USE_MARGIN: tl.constexpr):
    """``s S + s mu_b sigmoid((S - p + delta) / gamma)`` with the margin off on the positive entries."""
    logits = sim * scale
    if USE_MARGIN:
        margin = margin_scale * tl.sigmoid((sim - positive + delta) * inv_gamma)
        logits = tl.where(is_positive, logits, logits + margin)
    return logits


@triton.jit
def _similarity_tile(
    a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``a[rows] @ b[cols]^T`` in fp32, looping over D in chunks (masked rows, columns and dims read 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dim_ok = dims < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _hard_similarity(
    a_ptr, h_ptr, rows, row_ok, k, K, D, stride_a, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``a_i . h_ik`` for the block's rows (row-wise dot, h is contiguous ``[P, K, D]``)."""
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_ok[:, None] & (dims < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + (rows[:, None] * K + k) * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * h, axis=1)
    return acc


@triton.autotune(configs=_configs(INTERPRET), key=["Q", "D", "USE_MARGIN", "WANT_COLS"])
@triton.jit
def _cement_fwd_kernel(
    a_ptr, b_ptr, pos_ptr, h_ptr, h_bias_ptr, row_lse_ptr, col_part_ptr,
    P, Q, D, K, stride_a, stride_b, diag_offset,
    scale, delta, inv_gamma, margin_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_MARGIN: tl.constexpr, WANT_COLS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < P
    # Rows past P read positive 0; they are never stored and are masked out of the column LSE below.
    pos_row = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, Q, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < Q
        sim = _similarity_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                               BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)  # fmt: skip
        is_positive = cols[None, :] == rows[:, None] + diag_offset
        logits = _logits(sim, scale, pos_row[:, None], delta, inv_gamma, margin_scale, is_positive, USE_MARGIN)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))  # columns past Q: not in any row's softmax
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # finite: every tile has a real column
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        if WANT_COLS:
            # Columns past Q read positive 0; their partial LSE is computed but never stored.
            pos_col = tl.load(pos_ptr + cols, mask=col_ok, other=0.0)
            logits = _logits(sim, scale, pos_col[None, :], delta, inv_gamma, margin_scale, is_positive, USE_MARGIN)
            logits = tl.where(row_ok[:, None], logits, float("-inf"))  # rows past P: not in any column's softmax
            col_max = tl.max(logits, axis=0)  # finite: every block has a real row
            col_sum = tl.sum(tl.exp(logits - col_max[None, :]), axis=0)
            tl.store(col_part_ptr + pid * Q + cols, col_max + tl.log(col_sum), mask=col_ok)
    for k in range(0, K):
        hard = _hard_similarity(a_ptr, h_ptr, rows, row_ok, k, K, D, stride_a, BLOCK_M, BLOCK_D)
        # Masked negatives carry bias -inf (exp -> 0); rows past P read -inf and are never stored.
        bias = tl.load(h_bias_ptr + rows * K + k, mask=row_ok, other=float("-inf"))
        logit = hard * scale + bias
        new_max = tl.maximum(row_max, logit)
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.exp(logit - new_max)
        row_max = new_max
    tl.store(row_lse_ptr + rows, row_max + tl.log(row_sum), mask=row_ok)


@triton.autotune(
    configs=_configs(INTERPRET), key=["Q", "D", "USE_MARGIN", "WANT_COLS"], reset_to_zero=["da_ptr", "db_ptr"]
)
@triton.jit
def _cement_bwd_kernel(
    a_ptr, b_ptr, pos_ptr, h_ptr, h_bias_ptr, row_shift_ptr, col_shift_ptr, da_ptr, db_ptr, dh_ptr,
    P, Q, D, K, stride_a, stride_b, diag_offset,
    scale, delta, inv_gamma, margin_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_MARGIN: tl.constexpr, WANT_COLS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < P
    pos_row = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    # Rows past P get shift +inf, so exp(logit - shift) = 0: they add nothing to dB.
    row_shift = tl.load(row_shift_ptr + rows, mask=row_ok, other=float("inf"))
    for c0 in range(0, Q, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < Q
        sim = _similarity_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                               BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)  # fmt: skip
        is_positive = cols[None, :] == rows[:, None] + diag_offset
        logits = _logits(sim, scale, pos_row[:, None], delta, inv_gamma, margin_scale, is_positive, USE_MARGIN)
        grad = tl.exp(logits - row_shift[:, None])
        if WANT_COLS:
            pos_col = tl.load(pos_ptr + cols, mask=col_ok, other=0.0)
            # Columns past Q get shift +inf (exp -> 0).
            col_shift = tl.load(col_shift_ptr + cols, mask=col_ok, other=float("inf"))
            logits = _logits(sim, scale, pos_col[None, :], delta, inv_gamma, margin_scale, is_positive, USE_MARGIN)
            grad += tl.exp(logits - col_shift[None, :])
        grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)  # ragged tiles contribute nothing
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            dim_ok = dims < D
            a_mask = row_ok[:, None] & dim_ok[None, :]
            b_mask = col_ok[:, None] & dim_ok[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=a_mask, other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + dims[None, :], mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            grad_in = grad.to(a.dtype)
            da_ptrs = da_ptr + rows[:, None] * D + dims[None, :]
            da = tl.load(da_ptrs, mask=a_mask, other=0.0)
            tl.store(da_ptrs, tl.dot(grad_in, b, da, input_precision=DOT_PRECISION), mask=a_mask)
            db = tl.dot(tl.trans(grad_in), a, input_precision=DOT_PRECISION)
            tl.atomic_add(db_ptr + cols[:, None] * D + dims[None, :], db, mask=b_mask)
    for k in range(0, K):
        hard = _hard_similarity(a_ptr, h_ptr, rows, row_ok, k, K, D, stride_a, BLOCK_M, BLOCK_D)
        bias = tl.load(h_bias_ptr + rows * K + k, mask=row_ok, other=float("-inf"))
        grad_hard = tl.exp(hard * scale + bias - row_shift)  # masked negatives and rows past P: exp(-inf) = 0
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_ok[:, None] & (dims < D)[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_a + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + (rows[:, None] * K + k) * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            da_ptrs = da_ptr + rows[:, None] * D + dims[None, :]
            da = tl.load(da_ptrs, mask=mask, other=0.0)
            tl.store(da_ptrs, da + grad_hard[:, None] * h, mask=mask)
            tl.store(dh_ptr + (rows[:, None] * K + k) * D + dims[None, :], grad_hard[:, None] * a, mask=mask)


def _block_m(device: torch.device) -> int:
    """Rows per program: 128 on a GPU, 16 in the interpreter (smaller tiles keep tests quick)."""
    return 16 if (INTERPRET or device.type != "cuda") else 128


def _pointer(tensor: Tensor) -> Tensor:
    """``tensor``, or a one-element stand-in when it is empty (K = 0): the kernel never reads it then."""
    return tensor if tensor.numel() > 0 else torch.zeros(1, device=tensor.device, dtype=tensor.dtype)


def _upcast(tensor: Tensor) -> bool:
    """Upcast loaded blocks to fp32: always in the interpreter (its bf16 ``tl.dot`` is wrong), and for fp32."""
    return INTERPRET or tensor.dtype == torch.float32


def _dot_precision(tensor: Tensor) -> str:
    """fp32 inputs: true fp32 dots ("ieee", like ClipLoss without TF32); 16-bit inputs ignore the setting."""
    return "ieee" if tensor.dtype == torch.float32 else "tf32"


def _common_args(scale: float, margin_batch: float, offset: float, temperature: float) -> tuple[float, ...]:
    return (scale, offset, 1.0 / temperature, scale * margin_batch)


class TritonLSE(torch.autograd.Function):
    """Row LSEs (hard negatives included) and optionally column LSEs of ``s a b^T + margins``.

    forward(a ``[P, D]``, b ``[Q, D]``, scale 0-dim fp32, positives ``[P]`` fp32, h ``[P, K, D]``,
    h_bias ``[P, K]`` fp32 (``s mu_h c``, ``-inf`` where masked), diag_offset, want_cols, margin_batch, offset,
    temperature) returns ``(row_lse [P], col_lse [Q] or [0])`` in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, a, b, scale, positives, hard, hard_bias, diag_offset, want_cols, margin_batch, offset, temperature
    ):
        num_rows, dim = a.shape
        num_cols = b.shape[0]
        num_hard = hard.shape[1]
        s = float(scale)
        block_m = _block_m(a.device)
        num_blocks = triton.cdiv(num_rows, block_m)
        row_lse = torch.empty(num_rows, device=a.device, dtype=torch.float32)
        col_part = torch.empty((num_blocks if want_cols else 1, num_cols), device=a.device, dtype=torch.float32)
        _cement_fwd_kernel[(num_blocks,)](
            a, b, positives, _pointer(hard), _pointer(hard_bias), row_lse, col_part,
            num_rows, num_cols, dim, num_hard, a.stride(0), b.stride(0), diag_offset,
            *_common_args(s, margin_batch, offset, temperature),
            BLOCK_M=block_m, USE_MARGIN=margin_batch != 0.0, WANT_COLS=want_cols, UPCAST=_upcast(a),
            DOT_PRECISION=_dot_precision(a),
        )  # fmt: skip
        col_lse = torch.logsumexp(col_part, dim=0) if want_cols else torch.empty(0, device=a.device)
        ctx.save_for_backward(a, b, scale, positives, hard, hard_bias, row_lse, col_lse)
        ctx.settings = (diag_offset, want_cols, margin_batch, offset, temperature)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row, grad_col):  # type: ignore[override]
        a, b, scale, positives, hard, hard_bias, row_lse, col_lse = ctx.saved_tensors
        diag_offset, want_cols, margin_batch, offset, temperature = ctx.settings
        num_rows, dim = a.shape
        num_cols = b.shape[0]
        s = float(scale)
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row.float()
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col.float()
        want_cols = want_cols and bool((grad_col != 0).any())
        # The loss gives every LSE a weight of one sign; fold log|g| into the shifts (see the module docstring).
        if bool((grad_row >= 0).all()) and bool((grad_col >= 0).all()):
            sign = 1.0
        elif bool((grad_row <= 0).all()) and bool((grad_col <= 0).all()):
            sign = -1.0
        else:
            raise NotImplementedError("TritonLSE.backward: expected LSE gradients of one sign, got mixed signs")
        row_shift = (row_lse - torch.log(grad_row * sign)).contiguous()
        col_shift = (col_lse - torch.log(grad_col * sign)).contiguous() if want_cols else row_shift
        grad_a = torch.zeros((num_rows, dim), device=a.device, dtype=torch.float32)
        grad_b = torch.zeros((num_cols, dim), device=a.device, dtype=torch.float32)
        grad_h = torch.zeros(hard.shape, device=a.device, dtype=torch.float32)
        block_m = _block_m(a.device)
        _cement_bwd_kernel[(triton.cdiv(num_rows, block_m),)](
            a, b, positives, _pointer(hard), _pointer(hard_bias), row_shift, col_shift,
            grad_a, grad_b, _pointer(grad_h),
            num_rows, num_cols, dim, hard.shape[1], a.stride(0), b.stride(0), diag_offset,
            *_common_args(s, margin_batch, offset, temperature),
            BLOCK_M=block_m, USE_MARGIN=margin_batch != 0.0, WANT_COLS=want_cols, UPCAST=_upcast(a),
            DOT_PRECISION=_dot_precision(a),
        )  # fmt: skip
        grad_scale = torch.dot(a.float().reshape(-1), grad_a.reshape(-1)) * sign if ctx.needs_input_grad[2] else None
        factor = s * sign
        grad_a = (grad_a * factor).to(a.dtype)
        grad_b = (grad_b * factor).to(b.dtype)
        grad_h = (grad_h * factor).to(hard.dtype) if ctx.needs_input_grad[4] else None
        return grad_a, grad_b, grad_scale, None, grad_h, None, None, None, None, None, None


def cement_loss_triton(
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
) -> Tensor:
    """Symmetric Cement loss through the fused kernels (inputs already validated).

    Args:
        image_features, text_features: ``[M, D]`` fp32/bf16/fp16 (kept in their dtype; fp32 accumulation).
        scale: 0-dim fp32 ``s``; hn_text_features ``[B, K, D]`` or None; hn_scores, hn_mask ``[B, K]`` or None.
    Returns:
        Scalar fp32 loss (logit bias excluded: it cancels exactly).
    """
    image = image_features.contiguous()
    text = text_features.contiguous()
    device = image.device
    num_total, dim = image.shape
    rows = slice(local_start, local_start + local_size)
    positive = (image[rows].float() * text[rows].float()).sum(dim=1)  # [B], with gradient
    positive_detached = positive.detach().contiguous()
    if hn_text_features is not None and hn_text_features.shape[1] > 0:
        hard = hn_text_features.contiguous()
        with torch.no_grad():
            hard_bias = torch.zeros(hard.shape[:2], device=device, dtype=torch.float32)
            if hn_scores is not None and margin_hard != 0.0:
                hard_bias += float(scale) * margin_hard * hn_scores.float()
            if hn_mask is not None:
                hard_bias.masked_fill_(~hn_mask, float("-inf"))
    else:
        hard = torch.zeros((local_size, 0, dim), device=device, dtype=image.dtype)
        hard_bias = torch.zeros((local_size, 0), device=device, dtype=torch.float32)
    settings = (float(margin_batch), float(difficulty_offset), float(difficulty_temperature))
    if local_size == num_total:
        row_lse, col_lse = TritonLSE.apply(image, text, scale, positive_detached, hard, hard_bias, 0, True, *settings)
    else:
        no_hard = torch.zeros((local_size, 0, dim), device=device, dtype=image.dtype)
        no_bias = torch.zeros((local_size, 0), device=device, dtype=torch.float32)
        row_lse, _ = TritonLSE.apply(
            image[rows].contiguous(), text, scale, positive_detached, hard, hard_bias, local_start, False, *settings
        )
        col_lse, _ = TritonLSE.apply(
            text[rows].contiguous(), image, scale, positive_detached, no_hard, no_bias, local_start, False, *settings
        )
    positive_logit = scale * positive
    total = (row_lse - positive_logit).sum() + (col_lse - positive_logit).sum()
    return total / (2 * local_size)


__all__ = ["INTERPRET", "TritonLSE", "cement_loss_triton"]
