"""Cement and InfoNCE losses: drop-in replacements for ``open_clip.ClipLoss`` that also take hard negatives.

``CementLoss(...)(image_features, text_features, logit_scale, hn_text_features=..., hn_scores=..., hn_mask=...)``
gathers features across ranks exactly as OpenCLIP's ``ClipLoss`` does and computes the symmetric loss
defined in :mod:`slipform_plugin.losses.reference` with one of three implementations:

- ``"reference"``: the plain PyTorch formula with the full similarity matrix;
- ``"chunked"``: a tiled PyTorch ``autograd.Function`` with O(N D) memory (the CPU default);
- ``"triton"``: fused Triton forward and backward kernels (the CUDA default);
- ``"auto"``: Triton on CUDA when it can run, else chunked.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from slipform_plugin.hard_negatives import HARD_NEGATIVE_KINDS
from slipform_plugin.kernels import cement_loss_unchecked, validate_inputs
from slipform_plugin.losses.reference import (
    caption_separation_term,
    cement_loss_reference,
    hard_negative_accuracy,
    hard_negative_pair_wins,
    hard_negative_row_wins,
    hard_negative_term,
    hard_pair_difficulty,
)
from slipform_plugin.recommended import RECOMMENDED_CEMENT

logger = logging.getLogger(__name__)

__all__ = [
    "HARD_COLUMNS",
    "MARGIN_GATES",
    "RECOMMENDED_CEMENT",
    "CementLoss",
    "InfoNCELoss",
    "cement_loss_reference",
    "create_cement_loss",
    "create_infonce_loss",
    "hard_negative_accuracy",
]

LOSS_IMPLS = ("auto", "triton", "chunked", "reference")

#: Documented defaults of the Cement settings (README, "The Cement loss").
CEMENT_DEFAULTS: dict[str, float] = {
    "margin_hard": 0.10,
    "margin_batch": 0.05,
    "difficulty_offset": 0.0,
    "difficulty_temperature": 0.05,
    "hard_weight": 0.0,
    "text_weight": 0.0,
    "text_margin": 0.2,
}


def _gather(tensor: Tensor, with_grad: bool, replace_local: bool, rank: int, world_size: int) -> Tensor:
    """All-gather ``tensor`` on dim 0 like OpenCLIP's ``gather_features`` (gloo and NCCL alike)."""
    import torch.distributed as dist
    import torch.distributed.nn

    if with_grad:
        from slipform_plugin.kernels.chunked import ContiguousGrad

        # torch's gloo all_gather backward scatters contiguous bytes into empty_like(grad): a non-contiguous
        # gradient would come back scrambled, so the gathered parts hand on contiguous gradients.
        parts = torch.distributed.nn.all_gather(tensor)
        return torch.cat([ContiguousGrad.apply(part) for part in parts], dim=0)
    parts = [torch.zeros_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    if replace_local:
        parts[rank] = tensor  # keep the gradient of this rank's own features
    return torch.cat(parts, dim=0)


#: where the hard negatives enter the loss (see ``CementLoss``'s ``hard_columns``)
HARD_COLUMNS: tuple[str, ...] = ("joint", "separate")

#: how the margins are scaled over training (see ``CementLoss``'s ``margin_gate``)
MARGIN_GATES: tuple[str, ...] = ("none", "hn-accuracy")


class CementLoss(nn.Module):
    """Symmetric contrastive loss with calibrated margins and hard-negative columns.

    Constructor arguments mirror ``open_clip.ClipLoss`` (``local_loss``, ``gather_with_grad``,
    ``cache_labels``, ``rank``, ``world_size``, ``use_horovod`` which is rejected) plus Cement's settings:

    Args:
        margin_hard: ``mu_h``; a hard negative's logit is raised by ``s * mu_h * score``.
        margin_batch: ``mu_b``; an in-batch negative's logit is raised by
            ``s * mu_b * sigmoid((sim_neg - sim_pos + difficulty_offset) / difficulty_temperature)``.
        difficulty_offset: ``delta`` of that sigmoid.
        difficulty_temperature: ``gamma`` (> 0) of that sigmoid.
        hard_weight: ``lambda`` (>= 0), weight of the hard-negative term ``H_i``: each caption against its own
            image's hard negatives only, in a softmax of their own (``H_i = logsumexp(s x_i.y_i, z'_i1..z'_iK) -
            s x_i.y_i``), so the K fine-grained comparisons of a row are not diluted by its M in-batch columns.
        impl: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"reference"``.
        check_finite: raise a clear error on NaN/Inf features, ``hn_scores`` outside [0, 1] or ``hn_kinds``
            ids outside ``HARD_NEGATIVE_KINDS`` (one reduction per tensor, read back in one host-device
            synchronisation for the features and one for the kinds; off, the loss's own logging never waits
            for the device).
        margin_gate: ``"none"`` (margins always at full strength) or ``"hn-accuracy"``: both margins are
            multiplied by a gate ``g`` in [0, 1] that opens only as far as the model already separates captions
            from their hard negatives: ``g = clip(EMA of the excess hard-negative accuracy, 0, 1)``, where a
            batch's excess accuracy is ``sum_i (win_i - 1/(1+k_i)) / sum_i (1 - 1/(1+k_i))`` over rows with
            ``k_i >= 1`` real negatives (0 at chance, 1 when every caption beats all of its negatives), summed
            over ranks, updated in training mode only. Batches without real negatives leave ``g`` unchanged.
        gate_momentum: EMA momentum of the gate (default 0.9).
        hard_margin_difficulty: scale each hard negative's concreteness margin by how hard its pair is,
            ``sigmoid((x_i.h_ik - x_i.y_i + difficulty_offset) / difficulty_temperature)`` (detached): the margin
            stays on the negatives the model cannot yet tell from the caption and fades from those it has
            separated. False (the default) keeps the constant margin ``s * mu_h * score``.
        hard_difficulty_offset: the ``delta`` of that pair sigmoid, if it should differ from
            ``difficulty_offset`` (None: the same). With ``delta_h > 0`` a tie keeps more than half of the margin and
            the margin fades only once the caption leads by about ``delta_h``.
        hard_difficulty_warmup: ``T`` (>= 0 training steps) over which that pair scaling is phased in: at step
            ``t`` each pair's factor is ``w_t + (1 - w_t) * d_ik`` with ``w_t = max(0, 1 - t / T)``, so training
            starts with the constant margin (full pressure on the pairs the model cannot yet tell apart) and
            ends with the difficulty-scaled one. 0 (the default) scales from the first step. The step is counted
            by training-mode calls (``calls_per_step`` of them per step); OpenCLIP's ``train_one_epoch`` sets it
            at each epoch start through :meth:`set_training_step`, so a resumed run continues the schedule.
        hard_columns: ``"joint"`` (the default): hard negatives are extra columns of their image's
            image-to-text row, beside the in-batch captions (NegCLIP's placement), and also enter ``H_i`` when
            ``hard_weight > 0``. ``"separate"``: they enter ``H_i`` only, so the in-batch rows and columns are
            those of CLIP (with the difficulty margin) and a raised hard-negative logit takes no share of the
            retrieval softmax; needs ``hard_weight > 0``.
        text_weight: ``lambda_t`` (>= 0), weight of the caption-separation term ``S_i``
            (:func:`~slipform_plugin.losses.reference.caption_separation_term`): in the text tower's own space a
            caption and its hard negative may be at most ``1 - mu_t * score`` alike, so captions with the same
            words in another order are pulled apart before the image tower can tell them apart. The term adds
            ``lambda_t * s * sum_i S_i / (2B)`` (``s`` detached, so it is in the units of the other terms).
            0 (the default) leaves it out.
        text_margin: ``mu_t`` in [0, 2], the text-side separation asked of a negative with score 1.
        hard_unit_difference: None (the default), or a floor ``eps`` in (0, 2]: in ``H_i`` each hard pair's
            cosine gap ``x_i.(h_ik - y_i)`` is divided by the detached text-space distance
            ``max(|h_ik - y_i|, eps)``, so that the image is asked to prefer its caption along the unit
            direction between the two (see :func:`~slipform_plugin.losses.reference.hard_negative_term`);
            needs ``hard_columns="separate"``.

    ``forward`` returns the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``. The in-batch
    hard-negative accuracy of the last calls is kept in :attr:`hard_negative_meter` for logging (never in the
    returned dict, whose values OpenCLIP sums into the optimised loss).

    With ``local_loss=True`` and ``gather_with_grad=False`` OpenCLIP's ``ClipLoss`` drops the gradient of a
    rank's own features through the other direction; Cement keeps it (the loss value is the same).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        margin_hard: float = CEMENT_DEFAULTS["margin_hard"],
        margin_batch: float = CEMENT_DEFAULTS["margin_batch"],
        difficulty_offset: float = CEMENT_DEFAULTS["difficulty_offset"],
        difficulty_temperature: float = CEMENT_DEFAULTS["difficulty_temperature"],
        hard_weight: float = CEMENT_DEFAULTS["hard_weight"],
        impl: str = "auto",
        check_finite: bool = True,
        margin_gate: str = "none",
        gate_momentum: float = 0.9,
        hard_margin_difficulty: bool = False,
        hard_difficulty_offset: float | None = None,
        hard_difficulty_warmup: int = 0,
        hard_columns: str = "joint",
        text_weight: float = CEMENT_DEFAULTS["text_weight"],
        text_margin: float = CEMENT_DEFAULTS["text_margin"],
        hard_unit_difference: float | None = None,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("CementLoss: use_horovod is not supported, expected torch.distributed (got True)")
        if impl not in LOSS_IMPLS:
            raise ValueError(f"CementLoss: impl must be one of {LOSS_IMPLS}, got {impl!r}")
        for name, value in (
            ("margin_hard", margin_hard),
            ("margin_batch", margin_batch),
            ("difficulty_offset", difficulty_offset),
        ):
            if not math.isfinite(float(value)):
                raise ValueError(f"CementLoss: {name} must be a finite number, got {value!r}")
        if not (math.isfinite(float(hard_weight)) and hard_weight >= 0):
            raise ValueError(f"CementLoss: hard_weight must be a finite number >= 0, got {hard_weight!r}")
        if not difficulty_temperature > 0:
            raise ValueError(f"CementLoss: difficulty_temperature must be > 0, got {difficulty_temperature!r}")
        if margin_gate not in MARGIN_GATES:
            raise ValueError(f"CementLoss: margin_gate must be one of {MARGIN_GATES}, got {margin_gate!r}")
        if not 0.0 <= gate_momentum < 1.0:
            raise ValueError(f"CementLoss: gate_momentum must be in [0, 1), got {gate_momentum!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CementLoss: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for ClipLoss compatibility; no labels are materialised
        self.rank = rank
        self.world_size = world_size
        self.margin_hard = float(margin_hard)
        self.margin_batch = float(margin_batch)
        self.difficulty_offset = float(difficulty_offset)
        self.difficulty_temperature = float(difficulty_temperature)
        self.hard_weight = float(hard_weight)
        self.impl = impl
        self.check_finite = check_finite
        self.hard_negative_meter = HardNegativeMeter()
        self.margin_gate = margin_gate
        self.gate_momentum = float(gate_momentum)
        self.hard_margin_difficulty = bool(hard_margin_difficulty)
        if hard_difficulty_offset is not None and not math.isfinite(float(hard_difficulty_offset)):
            raise ValueError(
                f"CementLoss: hard_difficulty_offset must be a finite number or None, got {hard_difficulty_offset!r}"
            )
        self.hard_difficulty_offset = (
            float(difficulty_offset) if hard_difficulty_offset is None else float(hard_difficulty_offset)
        )
        if isinstance(hard_difficulty_warmup, bool) or not (
            isinstance(hard_difficulty_warmup, int) and hard_difficulty_warmup >= 0
        ):
            raise ValueError(
                f"CementLoss: hard_difficulty_warmup must be an integer >= 0 (training steps), "
                f"got {hard_difficulty_warmup!r}"
            )
        if hard_difficulty_warmup and not self.hard_margin_difficulty:
            raise ValueError(
                "CementLoss: hard_difficulty_warmup phases in hard_margin_difficulty, "
                f"expected hard_margin_difficulty=True (got warmup {hard_difficulty_warmup} without it)"
            )
        self.hard_difficulty_warmup = hard_difficulty_warmup
        if hard_columns not in HARD_COLUMNS:
            raise ValueError(f"CementLoss: hard_columns must be one of {HARD_COLUMNS}, got {hard_columns!r}")
        if hard_columns == "separate" and not hard_weight > 0:
            raise ValueError(
                "CementLoss: hard_columns='separate' puts the hard negatives in the hard-negative term only, "
                f"expected hard_weight > 0 (got {hard_weight!r})"
            )
        self.hard_columns = hard_columns
        if not (math.isfinite(float(text_weight)) and text_weight >= 0):
            raise ValueError(f"CementLoss: text_weight must be a finite number >= 0, got {text_weight!r}")
        if not (math.isfinite(float(text_margin)) and 0.0 <= text_margin <= 2.0):
            raise ValueError(f"CementLoss: text_margin must be in [0, 2] (a cosine separation), got {text_margin!r}")
        self.text_weight = float(text_weight)
        self.text_margin = float(text_margin)
        if hard_unit_difference is not None:
            if not (math.isfinite(float(hard_unit_difference)) and 0.0 < hard_unit_difference <= 2.0):
                raise ValueError(
                    f"CementLoss: hard_unit_difference must be None or a floor in (0, 2], got {hard_unit_difference!r}"
                )
            if hard_columns != "separate":
                raise ValueError(
                    "CementLoss: hard_unit_difference reshapes the hard-negative term of separate columns, "
                    f"expected hard_columns='separate' (got {hard_columns!r})"
                )
            hard_unit_difference = float(hard_unit_difference)
        self.hard_unit_difference = hard_unit_difference
        self.calls_per_step = 1
        self.training_calls = 0  # training-mode forward calls so far (the warm-up's clock)
        self.gate_state = 0.0  # EMA of the excess hard-negative accuracy (used when margin_gate="hn-accuracy")

    @property
    def gate(self) -> float:
        """The factor in [0, 1] applied to both margins at the next call (1 when ``margin_gate="none"``)."""
        return 1.0 if self.margin_gate == "none" else min(1.0, max(0.0, self.gate_state))

    @property
    def training_step(self) -> int:
        """Training steps seen so far: training-mode calls divided by :attr:`calls_per_step`."""
        return self.training_calls // self.calls_per_step

    def set_training_step(self, step: int, calls_per_step: int = 1) -> None:
        """Set the schedule's clock to optimizer step ``step``, with ``calls_per_step`` loss calls per step
        (OpenCLIP's ``--accum-freq``); called at each epoch start so that a resumed run continues the warm-up."""
        if step < 0 or calls_per_step < 1:
            raise ValueError(
                f"CementLoss.set_training_step: expected step >= 0 and calls_per_step >= 1, "
                f"got step={step}, calls_per_step={calls_per_step}"
            )
        self.calls_per_step = int(calls_per_step)
        self.training_calls = int(step) * self.calls_per_step

    @property
    def difficulty_warmup_weight(self) -> float:
        """``w_t`` in [0, 1]: the share of the constant margin in each pair's factor at the next call."""
        if self.hard_difficulty_warmup == 0:
            return 0.0
        return max(0.0, 1.0 - self.training_step / self.hard_difficulty_warmup)

    def _update_gate(self, wins: Tensor, has_negative: Tensor, hn_mask: Tensor | None, num_hard: int) -> None:
        """Fold this batch's excess hard-negative accuracy (summed over ranks) into the gate's EMA."""
        with torch.no_grad():
            if hn_mask is None:
                num_real = torch.full(wins.shape, float(num_hard), device=wins.device)
            else:
                num_real = hn_mask.bool().sum(dim=1).float()
            chance = 1.0 / (1.0 + num_real)
            rows = has_negative.float()
            sums = torch.stack([((wins.float() - chance) * rows).sum(), ((1.0 - chance) * rows).sum()])
            if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            excess, weight = (float(v) for v in sums)
        if weight > 0:
            self.gate_state = self.gate_momentum * self.gate_state + (1.0 - self.gate_momentum) * excess / weight

    def _meter_kinds(self, pair_wins: Tensor, hn_mask: Tensor | None, hn_kinds: Tensor) -> None:
        """Check ``hn_kinds`` and count this batch's pairwise wins (bool ``[B, K]``) by kind."""
        if not isinstance(hn_kinds, Tensor) or hn_kinds.shape != pair_wins.shape:
            got = tuple(hn_kinds.shape) if isinstance(hn_kinds, Tensor) else type(hn_kinds).__name__
            raise ValueError(f"CementLoss: hn_kinds: expected shape {tuple(pair_wins.shape)} ([B, K]), got {got}")
        if hn_kinds.dtype.is_floating_point or hn_kinds.dtype == torch.bool or hn_kinds.is_complex():
            raise ValueError(f"CementLoss: hn_kinds: expected an integer tensor of kind ids, got {hn_kinds.dtype}")
        mask = torch.ones_like(pair_wins) if hn_mask is None else hn_mask.bool()
        if self.check_finite:
            num_kinds = len(HARD_NEGATIVE_KINDS)
            if bool((mask & ((hn_kinds < 0) | (hn_kinds >= num_kinds))).any()):
                real_kinds = hn_kinds[mask]
                raise ValueError(
                    f"CementLoss: hn_kinds: expected kind ids in [0, {num_kinds}) (HARD_NEGATIVE_KINDS), "
                    f"got values from {int(real_kinds.min())} to {int(real_kinds.max())}"
                )
        self.hard_negative_meter.update_kinds(pair_wins, mask, hn_kinds)

    def extra_repr(self) -> str:
        return (
            f"margin_hard={self.margin_hard}, margin_batch={self.margin_batch}, "
            f"difficulty_offset={self.difficulty_offset}, difficulty_temperature={self.difficulty_temperature}, "
            f"hard_weight={self.hard_weight}, "
            f"impl={self.impl!r}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"world_size={self.world_size}, margin_gate={self.margin_gate!r}, "
            f"hard_margin_difficulty={self.hard_margin_difficulty}, "
            f"hard_difficulty_offset={self.hard_difficulty_offset}, "
            f"hard_difficulty_warmup={self.hard_difficulty_warmup}, hard_columns={self.hard_columns!r}, "
            f"text_weight={self.text_weight}, text_margin={self.text_margin}, "
            f"hard_unit_difference={self.hard_unit_difference}"
        )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        hn_text_features: Tensor | None = None,
        hn_scores: Tensor | None = None,
        hn_mask: Tensor | None = None,
        output_dict: bool = False,
        hn_kinds: Tensor | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Loss of one (local) batch.

        Args:
            image_features: ``[B, D]`` normalised image features of this rank.
            text_features: ``[B, D]`` normalised caption features; row ``b`` is image ``b``'s positive.
            logit_scale: exponentiated scale (scalar tensor or float), as OpenCLIP's model returns it.
            logit_bias: optional scalar bias added to every logit.
            hn_text_features: ``[B, K, D]`` hard-negative caption features, or None.
            hn_scores: ``[B, K]`` concreteness scores in [0, 1]; None means 0 (no concreteness margin).
            hn_mask: ``[B, K]`` bool, True where a negative is real; None means all real.
            output_dict: return ``{"contrastive_loss": loss}`` instead of the tensor.
            hn_kinds: ``[B, K]`` integer kind of each negative (an index into
                :data:`~slipform_plugin.hard_negatives.HARD_NEGATIVE_KINDS`), or None; used for logging only
                (:meth:`HardNegativeMeter.pop_kinds`), never in the loss.
        """
        # The one input check: the kernels' own, on this rank's tensors; the gathered ones are not re-checked.
        checked = validate_inputs(
            image_features,
            text_features,
            logit_scale,
            hn_text_features,
            hn_scores,
            hn_mask,
            difficulty_temperature=self.difficulty_temperature,
            logit_bias=logit_bias,
            local_start=0,
            local_size=None,
            check_finite=self.check_finite,
            caller="CementLoss",
        )
        batch = image_features.shape[0]
        if hn_text_features is not None:
            # One [B, K] comparison serves the row accuracy, the per-kind accuracy and the gate.
            pair_wins = hard_negative_pair_wins(image_features, text_features, hn_text_features, hn_mask)
            wins, has_negative = hard_negative_row_wins(pair_wins, hn_mask)
            self.hard_negative_meter.update(wins.sum(), has_negative.sum())
            if hn_kinds is not None:
                self._meter_kinds(pair_wins, hn_mask, hn_kinds)
            if self.margin_gate != "none" and self.training:
                self._update_gate(wins, has_negative, hn_mask, hn_text_features.shape[1])
            if hn_mask is None:
                hn_mask = torch.ones(hn_text_features.shape[:2], dtype=torch.bool, device=hn_text_features.device)
            if hn_scores is None:
                hn_scores = torch.zeros(hn_text_features.shape[:2], dtype=torch.float32, device=hn_mask.device)

        local_start = 0
        if self.world_size > 1:
            # One all-gather for every feature tensor: a single collective in forward and in backward.
            gather_hard = not self.local_loss and hn_text_features is not None
            parts = [image_features, text_features]
            if gather_hard:
                parts.append(hn_text_features.flatten(1))
            replace_local = not self.local_loss or not self.gather_with_grad
            gathered = _gather(
                torch.cat(parts, dim=1), self.gather_with_grad, replace_local, self.rank, self.world_size
            )
            dim = image_features.shape[1]
            all_image, all_text = gathered[:, :dim], gathered[:, dim : 2 * dim]
            if self.local_loss:
                local_start = self.rank * batch
                local_size = batch
            else:
                local_size = all_image.shape[0]
                if gather_hard:
                    hn_text_features = gathered[:, 2 * dim :].reshape(local_size, -1, dim)
                    meta = torch.cat([hn_scores.float(), hn_mask.float()], dim=1)
                    meta = _gather(meta, False, False, self.rank, self.world_size)
                    num_hard = hn_scores.shape[1]
                    hn_scores, hn_mask = meta[:, :num_hard], meta[:, num_hard:] > 0.5
        else:
            all_image, all_text, local_size = image_features, text_features, batch

        rows = slice(local_start, local_start + local_size)  # this process's rows of the gathered features
        concreteness = hn_scores  # before any difficulty scaling: the caption-separation term's c_ik
        margin_hard = self.margin_hard * self.gate
        if self.hard_margin_difficulty and hn_text_features is not None and margin_hard != 0.0:
            positive = (all_image[rows].float() * all_text[rows].float()).sum(-1, keepdim=True)  # [B, 1]
            hard = torch.einsum("bd,bkd->bk", all_image[rows].float(), hn_text_features.float())  # [B, K]
            difficulty = hard_pair_difficulty(hard, positive, self.hard_difficulty_offset, self.difficulty_temperature)
            warmup = self.difficulty_warmup_weight
            if warmup > 0.0:
                difficulty = warmup + (1.0 - warmup) * difficulty
            hn_scores = hn_scores.float() * difficulty
        separate = self.hard_columns == "separate" and hn_text_features is not None
        loss = cement_loss_unchecked(
            all_image,
            all_text,
            checked.scale,
            None if separate else hn_text_features,
            None if separate else hn_scores,
            None if separate else hn_mask,
            margin_hard=margin_hard,
            margin_batch=self.margin_batch * self.gate,
            difficulty_offset=self.difficulty_offset,
            difficulty_temperature=self.difficulty_temperature,
            logit_bias=logit_bias,
            local_start=local_start,
            local_size=local_size,
            impl=self.impl,
            hard_weight=0.0 if separate else self.hard_weight,
        )
        if separate and hn_text_features.shape[1] > 0:
            hard_sum = hard_negative_term(
                all_image[rows],
                all_text[rows],
                checked.scale,
                hn_text_features,
                hn_scores,
                hn_mask,
                margin_hard,
                unit_difference_floor=self.hard_unit_difference,
            )
            loss = loss + self.hard_weight * hard_sum / (2 * local_size)
        if self.text_weight > 0.0 and hn_text_features is not None and hn_text_features.shape[1] > 0:
            separation = caption_separation_term(
                all_text[rows], hn_text_features, concreteness, hn_mask, self.text_margin
            )
            loss = loss + self.text_weight * checked.scale.detach().float() * separation / (2 * local_size)
        if self.training:
            self.training_calls += 1
        if image_features.dtype in (torch.float16, torch.bfloat16):
            loss = loss.to(image_features.dtype)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(CementLoss):
    """Symmetric InfoNCE with hard negatives as extra image-to-text columns: Cement with its margins at zero.

    With no hard negatives it equals ``open_clip.ClipLoss``.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        impl: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            local_loss,
            gather_with_grad,
            cache_labels,
            rank,
            world_size,
            use_horovod,
            margin_hard=0.0,
            margin_batch=0.0,
            impl=impl,
            check_finite=check_finite,
        )


class HardNegativeMeter:
    """Running counts of hard-negative wins, for logging only.

    Two counts: rows whose caption beats all of its own real hard negatives (:meth:`pop`), and, when the
    batch says which kind each negative is, each negative the caption beats, by kind (:meth:`pop_kinds`).
    The counts are int64 tensors kept on the device of the batches they come from, so an update never waits
    for the device; only :meth:`pop` and :meth:`pop_kinds` read them back, once per log line.
    """

    def __init__(self) -> None:
        self._rows: Tensor | None = None  # int64 [2]: rows won, rows counted
        self._kinds: Tensor | None = None  # int64 [3, len(HARD_NEGATIVE_KINDS)]: beaten, counted, id outside
        self.ignored_kind_ids = 0  # real negatives whose kind id was outside HARD_NEGATIVE_KINDS, popped so far

    def update(self, correct: Tensor | int, counted: Tensor | int) -> None:
        """Add ``correct`` rows won out of ``counted`` (scalar tensors, on any device, or ints)."""
        device = correct.device if isinstance(correct, Tensor) else None
        counts = torch.stack(
            [torch.as_tensor(value, device=device).reshape(()).to(torch.int64) for value in (correct, counted)]
        )
        self._rows = counts if self._rows is None else self._rows + counts.to(self._rows.device)

    def update_kinds(self, pair_wins: Tensor, hn_mask: Tensor, hn_kinds: Tensor) -> None:
        """Count each real negative under its kind, on the device (no boolean indexing, no read-back).

        Args:
            pair_wins: bool ``[B, K]``, the caption beats that negative; hn_mask: bool ``[B, K]``;
            hn_kinds: integer ``[B, K]``, indices into :data:`~slipform_plugin.hard_negatives.HARD_NEGATIVE_KINDS`.
                A real negative with an id outside them is not counted under any kind; :meth:`pop_kinds` logs a
                warning with how many (:class:`CementLoss` raises on them instead while ``check_finite`` is on).
        """
        ids = torch.arange(len(HARD_NEGATIVE_KINDS), device=hn_kinds.device)
        match = hn_kinds.long().unsqueeze(-1) == ids  # [B, K, kinds]
        real = hn_mask.bool()
        beaten = (match & (real & pair_wins.bool()).unsqueeze(-1)).sum(dim=(0, 1))
        counted = (match & real.unsqueeze(-1)).sum(dim=(0, 1))
        outside = torch.zeros_like(counted)
        outside[0] = (real & ~match.any(dim=-1)).sum()
        counts = torch.stack([beaten, counted, outside]).to(torch.int64)
        self._kinds = counts if self._kinds is None else self._kinds + counts.to(self._kinds.device)

    def pop(self) -> float | None:
        """Accuracy since the last call, or None when no row had a negative; resets the counts."""
        if self._rows is None:
            return None
        correct, counted = self._rows.tolist()
        self._rows = None
        return correct / counted if counted else None

    def pop_kinds(self) -> dict[str, float]:
        """Share of negatives of each kind that their caption beat since the last call (kinds seen only, in
        the order of ``HARD_NEGATIVE_KINDS``); resets the counts."""
        if self._kinds is None:
            return {}
        beaten, counted, outside = self._kinds.tolist()
        self._kinds = None
        if outside[0]:
            self.ignored_kind_ids += outside[0]
            logger.warning(
                "Slipform: hn_kinds: %d real negatives had kind ids outside [0, %d) (HARD_NEGATIVE_KINDS) and "
                "were not counted by kind",
                outside[0],
                len(HARD_NEGATIVE_KINDS),
            )
        kinds = enumerate(HARD_NEGATIVE_KINDS)
        return {kind: beaten[index] / counted[index] for index, kind in kinds if counted[index]}


def _common_kwargs(args: Any) -> dict[str, Any]:
    return dict(
        local_loss=getattr(args, "local_loss", False),
        gather_with_grad=getattr(args, "gather_with_grad", False),
        cache_labels=True,
        rank=getattr(args, "rank", 0),
        world_size=getattr(args, "world_size", 1),
        use_horovod=getattr(args, "horovod", False),
        impl=getattr(args, "loss_impl", "auto"),
        check_finite=not getattr(args, "cement_skip_finite_check", False),
    )


def create_cement_loss(args: Any) -> CementLoss:
    """Build :class:`CementLoss` from OpenCLIP's parsed arguments (the ``slipform.losses`` entry point)."""
    return CementLoss(
        **_common_kwargs(args),
        margin_hard=getattr(args, "cement_margin_hard", CEMENT_DEFAULTS["margin_hard"]),
        margin_batch=getattr(args, "cement_margin_batch", CEMENT_DEFAULTS["margin_batch"]),
        difficulty_offset=getattr(args, "cement_difficulty_offset", CEMENT_DEFAULTS["difficulty_offset"]),
        difficulty_temperature=getattr(
            args, "cement_difficulty_temperature", CEMENT_DEFAULTS["difficulty_temperature"]
        ),
        hard_weight=getattr(args, "cement_hard_weight", CEMENT_DEFAULTS["hard_weight"]),
        margin_gate=getattr(args, "cement_margin_gate", "none"),
        hard_margin_difficulty=getattr(args, "cement_hard_margin_difficulty", False),
        hard_difficulty_offset=getattr(args, "cement_hard_difficulty_offset", None),
        hard_difficulty_warmup=getattr(args, "cement_hard_difficulty_warmup", 0),
        hard_columns=getattr(args, "cement_hard_columns", "joint"),
        text_weight=getattr(args, "cement_text_weight", CEMENT_DEFAULTS["text_weight"]),
        text_margin=getattr(args, "cement_text_margin", CEMENT_DEFAULTS["text_margin"]),
        hard_unit_difference=getattr(args, "cement_hard_unit_difference", None),
    )


def create_infonce_loss(args: Any) -> InfoNCELoss:
    """Build :class:`InfoNCELoss` from OpenCLIP's parsed arguments (the ``slipform.losses`` entry point)."""
    return InfoNCELoss(**_common_kwargs(args))


# Losses registered here accept hard negatives; the registry uses this to refuse --hn with other losses.
CementLoss.accepts_hard_negatives = True
# ... and the kind of each negative (``hn_kinds``, for per-kind logging): the model adds it to its output only
# for losses that declare this.
CementLoss.accepts_hard_negative_kinds = True
