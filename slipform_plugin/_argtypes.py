"""``argparse`` types shared by Slipform's command lines and OpenCLIP flags: clear messages naming the range.

argparse prefixes the message with the flag, e.g. ``argument --num: expected a positive integer, got 0``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _parse_int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _parse_int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _parse_int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type accepting integers in ``[low, high]``."""
    expected = f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        value = _parse_int(text, expected)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = f"int_in_range_{low}_{high}"
    return parse


def float_in_range(low: float, high: float) -> Callable[[str], float]:
    """An argparse type accepting finite numbers in ``[low, high]``."""
    expected = f"a number in [{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value:g}")
        return value

    parse.__name__ = f"float_in_range_{low:g}_{high:g}"
    return parse
