"""Argument types shared by the subcommands (argparse ``type=`` callables with clear messages)."""

from __future__ import annotations

import argparse
import math


def number(text: str) -> float:
    """A float; ``inf`` allowed, NaN refused."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return v


def numbers(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0,0.5,1``."""
    return tuple(number(t) for t in text.split(",") if t.strip())


def ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
