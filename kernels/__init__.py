"""Memory-efficient Cement / InfoNCE loss: a chunked PyTorch path and fused Triton kernels.

``cement_loss`` has the semantics of ``slipform_plugin.losses.reference.cement_loss_reference`` and picks an
implementation:

- ``"triton"``: fused forward/backward Triton kernels (CUDA; or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"chunked"``: a tiled PyTorch ``autograd.Function`` (any device, O(M D) memory);
- ``"reference"``: the full-matrix reference (for tests and small batches);
- ``"auto"``: Triton on CUDA when triton imports, else chunked.

Importing this package loads torch only: no triton import and no device probing happen before a call.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ._validate import validate_inputs

IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_impls(device: torch.device | str | None = None) -> list[str]:
    """Implementations that can run on ``device`` (default: CUDA when available, else CPU).

    Returns:
        A subset of ``["triton", "chunked", "reference"]``, in order of preference.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ["chunked", "reference"]
    try:
        resolve_impl("triton", device)
    except RuntimeError:
        return names
    return ["triton", *names]


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Turn ``impl`` into the concrete implementation used for tensors on ``device``.

    Args:
        impl: one of ``"auto"``, ``"triton"``, ``"chunked"``, ``"reference"``.
        device: where the features live.
    Returns:
        ``"triton"``, ``"chunked"`` or ``"reference"``.
    Raises:
        ValueError: unknown ``impl``. RuntimeError: ``"triton"`` forced where it cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    device = torch.device(device)
    if impl in ("chunked", "reference"):
        return impl
    triton_ok = _triton_importable()
    if impl == "auto":
        return "triton" if (device.type == "cuda" and triton_ok) else "chunked"
    if not triton_ok:
        raise RuntimeError("impl='triton': expected the triton package to be installed, got no triton module")
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return "triton"
    raise RuntimeError(
        f"impl='triton': expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton loads), "
        f"got device {device.type!r}; use impl='chunked' or impl='auto'"
    )


def cement_loss(
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
    logit_bias: Tensor | float | None = None,
    local_start: int = 0,
    local_size: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
) -> Tensor:
    """Symmetric Cement loss (InfoNCE when both margins are 0), without the M x M matrix unless asked.

    Args:
        image_features: ``[M, D]`` image features, all ranks' when gathered (fp32, bf16 or fp16).
        text_features: ``[M, D]`` caption features, same dtype and device; caption ``j`` pairs with image ``j``.
        logit_scale: exponentiated scale ``s > 0`` (float or scalar tensor; gradient flows to a tensor).
        hn_text_features: ``[B, K, D]`` hard-negative caption features of the local rows, or None.
        hn_scores: ``[B, K]`` concreteness scores (None: zero), hn_mask: ``[B, K]`` bool (None: all real).
        margin_hard, margin_batch, difficulty_offset, difficulty_temperature: ``mu_h``, ``mu_b``, ``delta``,
            ``gamma`` as in the reference.
        hard_weight: ``lambda``, weight of the hard-negative term (each caption against its own hard negatives
            in a softmax of their own; O(B K D), computed by autograd beside the tiled loss).
        logit_bias: scalar added to every logit. Each cross-entropy is shift-invariant, so the bias cancels
            exactly: the fast paths do not compute with it, and its gradient is 0 (kept in the graph).
        local_start, local_size: the ``B`` local rows/columns inside the ``M`` gathered ones (default: all).
        impl: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"reference"``.
        check_finite: raise on NaN/Inf features and on ``hn_scores`` outside [0, 1] (one reduction per
            tensor, read back in a single host-device synchronisation; turn off for speed).
    Returns:
        Scalar fp32 loss ``(sum of local row CEs + sum of local column CEs) / (2B)``.
    """
    checked = validate_inputs(
        image_features,
        text_features,
        logit_scale,
        hn_text_features,
        hn_scores,
        hn_mask,
        difficulty_temperature=difficulty_temperature,
        logit_bias=logit_bias,
        local_start=local_start,
        local_size=local_size,
        check_finite=check_finite,
    )
    return cement_loss_unchecked(
        image_features,
        text_features,
        checked.scale,
        hn_text_features,
        hn_scores,
        hn_mask,
        margin_hard=margin_hard,
        margin_batch=margin_batch,
        difficulty_offset=difficulty_offset,
        difficulty_temperature=difficulty_temperature,
        hard_weight=hard_weight,
        logit_bias=logit_bias,
        local_start=checked.local_start,
        local_size=checked.local_size,
        impl=impl,
    )


def cement_loss_unchecked(
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
    logit_bias: Tensor | float | None,
    local_start: int,
    local_size: int,
    impl: str,
    hard_weight: float = 0.0,
) -> Tensor:
    """:func:`cement_loss` without its input checks, for callers that ran :func:`validate_inputs` themselves.

    ``CementLoss`` validates its local tensors once, gathers them across ranks and calls this on the gathered
    ones. Arguments as in :func:`cement_loss`, except ``scale``: the fp32 0-dim tensor of
    ``CheckedInputs.scale``, and ``local_size``: required. Shapes: image/text ``[M, D]``, hard negatives
    ``[B, K, D]``, scores and mask ``[B, K]``.
    Returns:
        Scalar fp32 loss.
    """
    chosen = resolve_impl(impl, image_features.device)
    options = {
        "margin_hard": float(margin_hard),
        "margin_batch": float(margin_batch),
        "difficulty_offset": float(difficulty_offset),
        "difficulty_temperature": float(difficulty_temperature),
        "local_start": local_start,
    }
    if chosen == "reference":
        from slipform_plugin.losses.reference import cement_loss_reference

        return cement_loss_reference(
            image_features,
            text_features,
            scale,
            hn_text_features,
            hn_scores,
            hn_mask,
            hard_weight=float(hard_weight),
            logit_bias=logit_bias,
            local_size=local_size,
            **options,
        )
    if chosen == "triton":
        from .triton_cement import cement_loss_triton

        loss = cement_loss_triton(
            image_features,
            text_features,
            scale,
            hn_text_features,
            hn_scores,
            hn_mask,
            local_size=local_size,
            **options,
        )
    else:
        from .chunked import cement_loss_chunked

        loss = cement_loss_chunked(
            image_features,
            text_features,
            scale,
            hn_text_features,
            hn_scores,
            hn_mask,
            local_size=local_size,
            **options,
        )
    if hard_weight != 0.0 and hn_text_features is not None and hn_text_features.shape[1] > 0:
        from slipform_plugin.losses.reference import hard_negative_term

        rows = slice(local_start, local_start + local_size)
        hard_sum = hard_negative_term(
            image_features[rows], text_features[rows], scale, hn_text_features, hn_scores, hn_mask, float(margin_hard)
        )
        loss = loss + float(hard_weight) * hard_sum / (2 * local_size)
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        # Keep the bias in the graph (DDP expects every used parameter to receive a gradient); it is exactly 0.
        loss = loss + 0.0 * logit_bias.reshape(()).float()
    return loss


__all__ = ["IMPLS", "available_impls", "cement_loss", "cement_loss_unchecked", "resolve_impl", "validate_inputs"]
