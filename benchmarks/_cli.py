"""Argument types shared by the benchmark command lines: each refuses a bad value by name."""

from __future__ import annotations

import argparse
import math
import sys


class UserError(Exception):
    """A mistake in a command's arguments or inputs, for the user to fix: no traceback."""


def fail(prog: str, error: BaseException) -> int:
    """Report ``error`` as one line on stderr, ``PROG: error: ...``; returns the exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def names(text: str) -> list[str]:
    """Comma-separated names, empty parts dropped; at least one."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return parts


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in ``(0, 1]``: an energy, or a fraction of a rank."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
