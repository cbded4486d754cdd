"""The Cement settings README recommends, in one place (no torch import, so the CLI and launchers can read it).

They were measured best on the synthetic benchmark at a CPU budget (README: "The Cement loss", "What we
recommend", and Evidence): margins at full strength from the first step, each concreteness margin scaled by
its pair's difficulty, mu_h 0.2, mu_b 0.1, and the hard negatives in the hard-negative term only, at lambda 1.
The experiment's (c) runs them, ``launch_slurm``'s ``CEMENT_ARGS=recommended`` expands to
:data:`RECOMMENDED_CEMENT_FLAGS`, and README's first command passes them; tests hold all three to this module.

    from slipform_plugin.losses import CementLoss
    from slipform_plugin.recommended import RECOMMENDED_CEMENT
    loss = CementLoss(**RECOMMENDED_CEMENT)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["RECOMMENDED_CEMENT", "RECOMMENDED_CEMENT_FLAGS", "cement_flags"]

#: ``CementLoss`` keyword arguments of the recommendation (read-only).
RECOMMENDED_CEMENT: Final = MappingProxyType(
    {
        "hard_margin_difficulty": True,
        "margin_hard": 0.2,
        "margin_batch": 0.1,
        "hard_columns": "separate",
        "hard_weight": 1.0,
    }
)

#: ``CementLoss`` keyword -> the ``open_clip_train.main`` flag that sets it (slipform_plugin.integration).
_FLAG_OF: Final = MappingProxyType(
    {
        "hard_margin_difficulty": "--cement-hard-margin-difficulty",
        "margin_hard": "--cement-margin-hard",
        "margin_batch": "--cement-margin-batch",
        "hard_columns": "--cement-hard-columns",
        "hard_weight": "--cement-hard-weight",
    }
)


def cement_flags(settings: Mapping[str, object]) -> tuple[str, ...]:
    """``open_clip_train.main`` arguments that give ``CementLoss(**settings)``.

    Args:
        settings: ``CementLoss`` keywords among ``hard_margin_difficulty``, ``margin_hard``, ``margin_batch``,
            ``hard_columns``, ``hard_weight``.

    Returns:
        The flags in the order of ``settings``, numbers written with ``%g``, a boolean as its bare flag when
        True and nothing when False (the trainer's default).

    Raises:
        ValueError: a keyword without a flag here.
    """
    flags: list[str] = []
    for name, value in settings.items():
        if name not in _FLAG_OF:
            raise ValueError(f"settings: expected keywords among {sorted(_FLAG_OF)}, got {name!r}")
        flag = _FLAG_OF[name]
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, float):
            flags += [flag, f"{value:g}"]
        else:
            flags += [flag, str(value)]
    return tuple(flags)


#: the recommendation as ``open_clip_train.main`` arguments, e.g. after ``--loss cement --hn concreteplant``
RECOMMENDED_CEMENT_FLAGS: Final[tuple[str, ...]] = cement_flags(RECOMMENDED_CEMENT)
