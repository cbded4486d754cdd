"""Slipform: concreteness-ranked hard negatives (ConcretePlant) and the Cement loss for OpenCLIP.

Importing this package is cheap (no torch, no spaCy): the public names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConcretePlant": "slipform_plugin.concreteplant",
    "HardNegative": "slipform_plugin.hard_negatives",
    "CementLoss": "slipform_plugin.losses",
    "InfoNCELoss": "slipform_plugin.losses",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slipform_plugin' has no attribute {name!r}")
