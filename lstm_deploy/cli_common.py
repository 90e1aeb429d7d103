"""What every lstm-deploy command line shares: exit codes, the usage error, argparse types.

Torch-free, so that the serving CLI (`lstm-deploy serve`, `loadtest`) uses the same types as the
export CLI without importing it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # 1: a check failed; 2: bad input from the user


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: one or more comma-separated integers, each >= `minimum`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values

    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: one integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def number(*, positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number, > 0 if `positive`, else >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or math.isinf(value) or value < 0 or (positive and value == 0):
            bound = "above 0" if positive else "a finite number >= 0"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text}")
        return value

    return parse
