"""Open registries of losses and hard-negative generators.

Third-party packages extend them through entry points:

    [project.entry-points."slipform.losses"]
    my_loss = "my_pkg.losses:create_my_loss"          # callable(args) -> nn.Module

    [project.entry-points."slipform.hard_negatives"]
    my_gen = "my_pkg.negatives:create_my_generator"   # callable(args) -> object with .plant(captions, keys)

A loss that can use hard negatives sets the class attribute ``accepts_hard_negatives = True`` and accepts
``hn_text_features``, ``hn_scores`` and ``hn_mask`` keyword arguments. ``clip`` (OpenCLIP's own loss) and
``none`` (no generator) are always present.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

LOSS_GROUP = "slipform.losses"
HARD_NEGATIVE_GROUP = "slipform.hard_negatives"

#: Always available, even when the distribution's metadata is missing (running from a source checkout).
_BUILTIN_LOSSES = {
    "clip": "",  # OpenCLIP's create_loss, untouched
    "infonce": "slipform_plugin.losses:create_infonce_loss",
    "cement": "slipform_plugin.losses:create_cement_loss",
}
_BUILTIN_HARD_NEGATIVES = {
    "none": "slipform_plugin.data_stage:no_hard_negatives",
    "concreteplant": "slipform_plugin.concreteplant:create_from_args",
    # The concreteness ablation: ConcretePlant's candidates, drawn uniformly instead of by concreteness.
    "concreteplant-uniform": "slipform_plugin.evaluation.ablations:create_uniform_concreteplant",
    # The same with ConcretePlant's mix of kinds kept: only the word within each kind is drawn uniformly.
    "concreteplant-uniform-kinds": "slipform_plugin.evaluation.ablations:create_kind_matched_uniform_concreteplant",
}
#: Built-in losses that take hard negatives; third-party ones declare ``accepts_hard_negatives``.
LOSSES_WITHOUT_HARD_NEGATIVES = frozenset({"clip"})


def _load(target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    return getattr(import_module(module_name), attribute)


def _discover(group: str, builtins: dict[str, str]) -> dict[str, str]:
    found = dict(builtins)
    for entry_point in entry_points(group=group):
        found.setdefault(entry_point.name, entry_point.value)
    return found


def loss_names() -> list[str]:
    """Names accepted by ``--loss``."""
    return sorted(_discover(LOSS_GROUP, _BUILTIN_LOSSES))


def hard_negative_names() -> list[str]:
    """Names accepted by ``--hn``."""
    return sorted(_discover(HARD_NEGATIVE_GROUP, _BUILTIN_HARD_NEGATIVES))


def get_loss_factory(name: str) -> Callable[[Any], Any] | None:
    """The factory registered as ``name`` (None for ``clip``, OpenCLIP's own loss)."""
    registered = _discover(LOSS_GROUP, _BUILTIN_LOSSES)
    if name not in registered:
        raise ValueError(f"--loss: unknown loss {name!r}; registered losses are {', '.join(sorted(registered))}")
    return _load(registered[name]) if registered[name] else None


def get_hard_negative_factory(name: str) -> Callable[[Any], Any]:
    """The generator factory registered as ``name``."""
    registered = _discover(HARD_NEGATIVE_GROUP, _BUILTIN_HARD_NEGATIVES)
    if name not in registered:
        raise ValueError(
            f"--hn: unknown hard-negative generator {name!r}; registered generators are {', '.join(sorted(registered))}"
        )
    return _load(registered[name])
