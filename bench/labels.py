"""How the reports write a class count and a time.

The tables and plots once wrote every C as ``2^int(log2 C)`` (C=100,000 came out as
"2^16") and every time as whole milliseconds (a 0.7 ms GPU forward came out as "1").
"""

from __future__ import annotations


def class_count(c: int, tex: bool = False) -> str:
    """``"2^17"`` (``"$2^{17}$"`` with ``tex``) for a power of two, else ``"100,000"``."""
    c = int(c)
    if c > 0 and c & (c - 1) == 0:
        k = c.bit_length() - 1
        return f"$2^{{{k}}}$" if tex else f"2^{k}"
    return f"{c:,}"


def ms(seconds: float) -> str:
    """A time in milliseconds to three significant figures (whole ms from 100 ms up)."""
    v = seconds * 1e3
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
