"""Input checks shared by every implementation of :func:`slipform_plugin.kernels.cement_loss`.

Every problem raises ``ValueError`` (or ``TypeError`` for a wrong type) with an "expected ..., got ..." message
that names the argument; nothing here uses ``assert``. ``CementLoss`` runs the same checks on its local tensors
(messages prefixed with ``"CementLoss: "``) and then calls :func:`slipform_plugin.kernels.cement_loss_unchecked`,
so every input is checked once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Floating dtypes the kernels accept; every path accumulates in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class CheckedInputs:
    """Normalised arguments after validation.

    Attributes:
        num_total: ``M``, the number of (gathered) image/caption pairs.
        dim: ``D``, the feature width.
        local_start: first local row/column.
        local_size: ``B``, number of local rows/columns.
        num_hard: ``K``, hard negatives per local row (0 when there are none).
        scale: the logit scale as an fp32 0-dim tensor on the features' device (keeps its autograd graph).
    """

    num_total: int
    dim: int
    local_start: int
    local_size: int
    num_hard: int
    scale: Tensor


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_values(image: Tensor, text: Tensor, hard: Tensor | None, scores: Tensor | None) -> None:
    """Raise on NaN/Inf features or ``hn_scores`` outside [0, 1], reading the device once when all is well.

    Every check is reduced on the device into one small bool tensor and read back with a single ``tolist()``
    (one host-device synchronisation per call, not one per tensor); only a failing call looks further, to name
    the argument and what it holds.
    """
    named = [("image_features", image), ("text_features", text)]
    if hard is not None:
        named.append(("hn_text_features", hard))
    if scores is not None:
        named.append(("hn_scores", scores))
    flags = [torch.isfinite(tensor).all() for _, tensor in named]
    if scores is not None:
        flags.append(((scores >= 0) & (scores <= 1)).all())
    ok = torch.stack(flags).tolist()
    for (name, tensor), finite in zip(named, ok):
        if not finite:
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise ValueError(
                f"{name}: expected finite values, got {bad} (pass check_finite=False to skip this check for speed)"
            )
    if scores is not None and not ok[-1]:
        raise ValueError(
            f"hn_scores: expected values in [0, 1], got min {float(scores.min())}, "
            f"max {float(scores.max())} (pass check_finite=False to skip this check for speed)"
        )


def validate_inputs(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    hn_text_features: Tensor | None,
    hn_scores: Tensor | None,
    hn_mask: Tensor | None,
    *,
    difficulty_temperature: float,
    logit_bias: Tensor | float | None,
    local_start: int,
    local_size: int | None,
    check_finite: bool,
    caller: str | None = None,
) -> CheckedInputs:
    """Check shapes, dtypes, devices and values of :func:`cement_loss`'s arguments.

    Args:
        image_features: ``[M, D]``; text_features: ``[M, D]``; hn_text_features: ``[B, K, D]`` or None;
        hn_scores: ``[B, K]`` or None; hn_mask: ``[B, K]`` bool or None; the rest as in ``cement_loss``.
        check_finite: also check values: features finite, ``hn_scores`` finite and in [0, 1] (one reduction
            per tensor, all read back in one host sync).
        caller: prefix of every message (``"CementLoss"`` gives ``"CementLoss: image_features: expected ..."``).
    Returns:
        The derived sizes and the scale as an fp32 0-dim tensor.
    Raises:
        TypeError, ValueError: with a message naming the argument, what was expected and what was given.
    """
    try:
        return _validate(
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
    except (TypeError, ValueError) as error:
        if caller is None:
            raise
        raise type(error)(f"{caller}: {error}") from None


def _validate(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    hn_text_features: Tensor | None,
    hn_scores: Tensor | None,
    hn_mask: Tensor | None,
    *,
    difficulty_temperature: float,
    logit_bias: Tensor | float | None,
    local_start: int,
    local_size: int | None,
    check_finite: bool,
) -> CheckedInputs:
    image = _check_tensor("image_features", image_features)
    text = _check_tensor("text_features", text_features)
    for name, tensor in (("image_features", image), ("text_features", text)):
        if tensor.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [M, D], got shape {tuple(tensor.shape)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: expected one of float32/bfloat16/float16/float64, got {tensor.dtype}")
    if image.shape != text.shape:
        raise ValueError(
            f"text_features: expected the shape of image_features {tuple(image.shape)}, got {tuple(text.shape)}"
        )
    if image.dtype != text.dtype:
        raise ValueError(f"text_features: expected dtype {image.dtype} like image_features, got {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"text_features: expected device {image.device} like image_features, got {text.device}")
    num_total, dim = image.shape
    if num_total == 0:
        raise ValueError("image_features: expected a non-empty batch (M >= 1), got M = 0")
    if dim == 0:
        raise ValueError("image_features: expected a feature width D >= 1, got D = 0")

    if isinstance(local_start, bool) or not isinstance(local_start, int):
        raise TypeError(f"local_start: expected an int, got {type(local_start).__name__}")
    if not 0 <= local_start < num_total:
        raise ValueError(f"local_start: expected 0 <= local_start < M = {num_total}, got {local_start}")
    size = num_total - local_start if local_size is None else local_size
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"local_size: expected an int or None, got {type(size).__name__}")
    if size < 1 or local_start + size > num_total:
        raise ValueError(
            f"local_size: expected 1 <= local_size <= M - local_start = {num_total - local_start}, got {size}"
        )

    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale: expected a scalar tensor, got shape {tuple(logit_scale.shape)}")
        if logit_scale.device != image.device and logit_scale.device.type != "cpu":
            raise ValueError(f"logit_scale: expected device {image.device} like the features, got {logit_scale.device}")
        scale = logit_scale.reshape(()).to(device=image.device, dtype=torch.float32)
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale = torch.tensor(float(logit_scale), device=image.device, dtype=torch.float32)
    else:
        raise TypeError(f"logit_scale: expected a float or a scalar tensor, got {type(logit_scale).__name__}")
    scale_value = float(scale.detach())
    if not (scale_value > 0.0 and scale_value < float("inf")):
        raise ValueError(f"logit_scale: expected a finite value > 0 (the exponentiated scale), got {scale_value}")
    if not difficulty_temperature > 0.0:
        raise ValueError(f"difficulty_temperature: expected a value > 0, got {difficulty_temperature}")
    if logit_bias is not None:
        if isinstance(logit_bias, Tensor):
            if logit_bias.numel() != 1:
                raise ValueError(f"logit_bias: expected a scalar, got shape {tuple(logit_bias.shape)}")
            bias_value = float(logit_bias.detach())
        else:
            bias_value = float(logit_bias)
        if bias_value != bias_value or abs(bias_value) == float("inf"):
            raise ValueError(f"logit_bias: expected a finite scalar, got {bias_value}")

    num_hard = 0
    if hn_text_features is None:
        if hn_scores is not None or hn_mask is not None:
            raise ValueError(
                "hn_text_features: expected a [B, K, D] tensor when hn_scores or hn_mask is given, got None"
            )
    else:
        hard = _check_tensor("hn_text_features", hn_text_features)
        if hard.dim() != 3 or hard.shape[0] != size or hard.shape[2] != dim:
            raise ValueError(f"hn_text_features: expected shape [B={size}, K, D={dim}], got {tuple(hard.shape)}")
        if hard.dtype != image.dtype:
            raise ValueError(f"hn_text_features: expected dtype {image.dtype} like the features, got {hard.dtype}")
        if hard.device != image.device:
            raise ValueError(f"hn_text_features: expected device {image.device}, got {hard.device}")
        num_hard = hard.shape[1]
        for name, extra in (("hn_scores", hn_scores), ("hn_mask", hn_mask)):
            if extra is None:
                continue
            extra = _check_tensor(name, extra)
            if tuple(extra.shape) != (size, num_hard):
                raise ValueError(f"{name}: expected shape [B={size}, K={num_hard}], got {tuple(extra.shape)}")
            if extra.device != image.device:
                raise ValueError(f"{name}: expected device {image.device}, got {extra.device}")
        if hn_mask is not None and hn_mask.dtype != torch.bool:
            raise ValueError(f"hn_mask: expected dtype torch.bool, got {hn_mask.dtype}")
        if hn_scores is not None and not hn_scores.is_floating_point():
            raise ValueError(f"hn_scores: expected a floating dtype, got {hn_scores.dtype}")

    if check_finite:
        _check_values(image, text, hn_text_features, hn_scores)
    return CheckedInputs(num_total, dim, local_start, size, num_hard, scale)
