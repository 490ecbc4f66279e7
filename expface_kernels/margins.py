"""Margin functions ψ(c) and their derivatives ψ'(c), evaluated on the B target cosines.

The PyTorch definition of every margin of DESIGN §1. The class loop (B×C) never sees a
margin: it receives the per-row target logit ``s·ψ(c_iy)`` and the gradient factor
``∂z_iy/∂c_iy`` computed by :func:`target_terms` -- or by the extension's prologue op,
which has its own C++ copy of ψ and ψ' (csrc/ek_math.h). A new margin therefore touches
four files in two languages: this one, prologue.py (``MARGIN_CODES``), csrc/ek_math.h
and the range check of csrc/ek_prologue.cpp; docs/backends.md has the checklist, and
tests/test_prologue.py holds the two copies to the same numbers.

All functions take a 1-D tensor of cosines (float32 or float64) and return the same
shape and dtype.

The derivative clamp
--------------------
ψ'(c) = dψ/dθ · dθ/dc with dθ/dc = −1/sin θ, which is singular at θ = 0 and θ = π for
expface, arcface, sphereface and combined (for ExpFace ψ' grows like (θ/π)^(2m−2) as
θ → 0). ``margin_grad="exact"`` therefore evaluates ψ' at the angle clamped into
``[THETA_EPS, π − THETA_EPS]``. With ``THETA_EPS = 1e-3`` rad the largest factors are
ψ' ≈ 88 (ExpFace, m = 0.7) and ψ' ≈ 480 (ArcFace, m = 0.5); a float32 cosine cannot
resolve angles much below that anyway (1 − cos θ < 2^-24 for θ < 3.5e-4). Away from
the clamp the value equals autograd of the formula in float64 (tested).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import torch
from torch import Tensor

THETA_EPS = 1e-3
"""Angle clamp (radians) for the exact derivative; see the module docstring."""

MarginParam = Union[float, Tuple[float, float, float]]


def _theta(c: Tensor) -> Tensor:
    # The clamp only catches |c| > 1 from rounding. Where |c| >= 1 (every cosine at D = 1,
    # or x exactly parallel to w) acos has no derivative, and the clamp's backward at its
    # bound differs between torch versions: 2.11 passes the gradient on, so autograd
    # through acos gives ±inf, or NaN when the upstream gradient is 0; 2.14 gives 0.
    # Autograd of reference_loss must not depend on the torch version, so the angle is a
    # constant there on every version (2.14's answer). Values are unchanged.
    inside = c.abs() < 1.0
    return torch.acos(torch.where(inside, c, c.detach().clamp(-1.0, 1.0)))


def _theta_for_grad(c: Tensor) -> Tensor:
    return _theta(c).clamp(THETA_EPS, math.pi - THETA_EPS)


# --- ψ and dψ/dθ per margin ------------------------------------------------------
# Each margin is written as a function of θ: psi(θ, m) and dpsi_dtheta(θ, m).
# ψ'(c) = dpsi_dtheta(θ) / (−sin θ).


def _expface_psi(theta: Tensor, m: float) -> Tensor:
    return torch.cos(math.pi * (theta / math.pi) ** m)


def _expface_dpsi(theta: Tensor, m: float) -> Tensor:
    u = theta / math.pi
    return -torch.sin(math.pi * u**m) * m * u ** (m - 1.0)


def _arcface_psi(theta: Tensor, m: float) -> Tensor:
    return torch.cos(theta + m)


def _arcface_dpsi(theta: Tensor, m: float) -> Tensor:
    return -torch.sin(theta + m)


def _sphereface_k(theta: Tensor, m: float) -> Tensor:
    return torch.floor(m * theta / math.pi)


def _sphereface_psi(theta: Tensor, m: float) -> Tensor:
    k = _sphereface_k(theta, m)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (−1)^k
    return sign * torch.cos(m * theta) - 2.0 * k


def _sphereface_dpsi(theta: Tensor, m: float) -> Tensor:
    k = _sphereface_k(theta, m)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return -sign * m * torch.sin(m * theta)


def _combined_psi(theta: Tensor, m) -> Tensor:
    m1, m2, m3 = m
    return torch.cos(m1 * theta + m2) - m3


def _combined_dpsi(theta: Tensor, m) -> Tensor:
    m1, m2, _ = m
    return -m1 * torch.sin(m1 * theta + m2)


@dataclass(frozen=True)
class Margin:
    """One margin of DESIGN §1.

    ``psi_theta``/``dpsi_theta`` are None for margins that are affine in c (cosface,
    none); for those ψ(c) = c − shift and ψ' = 1, no angle needed.
    """

    name: str
    default: MarginParam
    check: Callable[[object], str | None]  # returns an error text, or None when m is valid
    psi_theta: Callable | None = None
    dpsi_theta: Callable | None = None

    def psi(self, c: Tensor, m: MarginParam) -> Tensor:
        """ψ(c) for cosines ``c`` (any shape, float32/float64)."""
        if self.name == "cosface":
            return c - m
        if self.name == "none":
            return c
        return self.psi_theta(_theta(c), m)

    def dpsi(self, c: Tensor, m: MarginParam) -> Tensor:
        """ψ'(c), finite everywhere: evaluated at the clamped angle (module docstring)."""
        if self.psi_theta is None:
            return torch.ones_like(c)
        theta = _theta_for_grad(c)
        return self.dpsi_theta(theta, m) / (-torch.sin(theta))


def is_finite_number(v) -> bool:
    """A finite real number: int, float, or a numpy scalar such as np.float32 (a
    numbers.Real, not a float subclass; what a sweep over np.linspace(..., dtype=np.float32)
    hands in), but not a bool and not a tensor. NaN fails both comparisons. Comparisons
    rather than math.isfinite: under torch.compile(dynamic=True) Dynamo traces a float
    keyword default (s=64.0, m=0.7) as a symbolic float, which math.isfinite cannot take
    and a comparison turns into a guard; the numbers.Real test is reached only by
    values that are not int or float, so Dynamo never sees it for those."""
    if not isinstance(v, (int, float)) and not isinstance(v, numbers.Real):
        return False
    return not isinstance(v, bool) and -math.inf < v < math.inf


def _check_scalar(lo: float, hi: float, lo_open: bool, hi_open: bool, text: str):
    def check(m) -> str | None:
        if not is_finite_number(m):
            return f"must be a finite float ({text}), got {m!r}"
        ok_lo = m > lo if lo_open else m >= lo
        ok_hi = m < hi if hi_open else m <= hi
        return None if (ok_lo and ok_hi) else f"must satisfy {text}, got {m!r}"

    return check


def _check_combined(m) -> str | None:
    if not (isinstance(m, (tuple, list)) and len(m) == 3 and all(is_finite_number(v) for v in m)):
        return f"must be a tuple (m1, m2, m3) of three finite floats, got {m!r}"
    m1, m2, m3 = m
    if m1 <= 0 or m2 < 0 or m3 < 0:
        return f"must satisfy m1 > 0, m2 >= 0, m3 >= 0, got {tuple(m)!r}"
    return None


MARGINS: dict[str, Margin] = {
    "expface": Margin("expface", 0.7, _check_scalar(0.0, 1.0, True, False, "0 < m <= 1"),
                      _expface_psi, _expface_dpsi),
    # pytorch-metric-learning's ArcFaceLoss takes its margin in degrees (28.6 = 0.5 rad):
    # the message says which unit this one is in.
    "arcface": Margin("arcface", 0.5,
                      _check_scalar(0.0, math.pi, False, True, "0 <= m < pi, in radians"),
                      _arcface_psi, _arcface_dpsi),
    "cosface": Margin("cosface", 0.35, _check_scalar(0.0, 2.0, False, False, "0 <= m <= 2")),
    "sphereface": Margin("sphereface", 1.7,
                         _check_scalar(1.0, math.inf, False, True, "m >= 1 (finite)"),
                         _sphereface_psi, _sphereface_dpsi),
    "combined": Margin("combined", (1.0, 0.5, 0.0), _check_combined,
                       _combined_psi, _combined_dpsi),
    "none": Margin("none", 0.0, lambda m: None),
}

MARGIN_GRADS = ("exact", "straight_through")


def resolve_margin(margin: str, m) -> tuple[Margin, MarginParam]:
    """Validate ``margin`` and ``m``; return the Margin and the effective parameter.

    Raises ValueError naming the argument.
    """
    if not isinstance(margin, str) or margin not in MARGINS:
        raise ValueError(f"margin must be one of {sorted(MARGINS)}, got {margin!r}")
    spec = MARGINS[margin]
    if m is None:
        return spec, spec.default
    if margin == "none":
        raise ValueError("m must be None for margin='none' (it has no parameter), "
                         f"got {m!r}")
    err = spec.check(m)
    if err is not None:
        raise ValueError(f"m for margin={margin!r} {err}")
    if margin == "combined":
        return spec, tuple(float(v) for v in m)
    return spec, float(m)


def target_terms(c_target: Tensor, spec: Margin, m: MarginParam, s: float,
                 margin_grad: str) -> tuple[Tensor, Tensor]:
    """The prologue's per-row numbers.

    Args:
        c_target: (B,) float32/float64 target cosines c_iy.
    Returns:
        target_logit (B,) = s·ψ(c_iy) and target_factor (B,) = ∂z_iy/∂c_iy, which is
        s·ψ'(c_iy) for ``"exact"`` and s for ``"straight_through"``.
    """
    logit = s * spec.psi(c_target, m)
    if margin_grad == "exact":
        factor = s * spec.dpsi(c_target, m)
    else:
        factor = torch.full_like(c_target, s)
    return logit, factor
