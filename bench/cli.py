"""argparse types shared by the benchmark and example scripts.

A size or count of 0 is refused at parse time with the option's name, instead of
being read as "not given" (``if args.B:``: ``--B 0`` once ran the whole default preset)
or ending in a traceback deep inside torch (``--C 0``, ``--calls 0``). Used by
bench.run (with its profile and host parts) and examples/noisy_labels.py; standard library only.
"""

from __future__ import annotations

import argparse
import math


def _parsed(text: str, parse, ok, expected: str):
    try:
        v = parse(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _parsed(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """A finite float > 0."""
    return _parsed(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def fraction(text: str) -> float:
    """A float strictly between 0 and 1 (examples/noisy_labels.py's --noise: it compares
    flipped against clean samples, so neither group may be empty)."""
    return _parsed(text, float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
