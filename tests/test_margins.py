"""ψ and ψ' of every margin (margins.py) against the formulas of DESIGN §1 in float64."""

import math

import pytest
import torch

from expface_kernels.margins import MARGINS, THETA_EPS, resolve_margin, target_terms

from util import MARGIN_CASES

ANGLES = torch.linspace(0.05, math.pi - 0.05, 41, dtype=torch.float64)


def formula(name, theta, m):
    """ψ as DESIGN §1 writes it, as a function of θ (independent of margins.py)."""
    if name == "expface":
        return torch.cos(math.pi * (theta / math.pi) ** m)
    if name == "arcface":
        return torch.cos(theta + m)
    if name == "cosface":
        return torch.cos(theta) - m
    if name == "sphereface":
        k = torch.floor(m * theta / math.pi)
        return (-1.0) ** k * torch.cos(m * theta) - 2 * k
    if name == "combined":
        m1, m2, m3 = m
        return torch.cos(m1 * theta + m2) - m3
    return torch.cos(theta)


@pytest.mark.parametrize("name,m", MARGIN_CASES)
def test_psi_matches_formula(name, m):
    spec, mv = resolve_margin(name, m)
    c = torch.cos(ANGLES)
    torch.testing.assert_close(spec.psi(c, mv), formula(name, ANGLES, mv), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,m", MARGIN_CASES)
def test_dpsi_matches_autograd_away_from_clamp(name, m):
    spec, mv = resolve_margin(name, m)
    c = torch.cos(ANGLES).requires_grad_()
    (auto,) = torch.autograd.grad(formula(name, torch.acos(c), mv).sum(), c)
    torch.testing.assert_close(spec.dpsi(c.detach(), mv), auto, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,m", MARGIN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpsi_finite_everywhere(name, m, dtype):
    """ψ' at c = ±1 (an embedding exactly on its centre, or opposite) is finite and
    equals its value at the clamped angle."""
    spec, mv = resolve_margin(name, m)
    c = torch.tensor([1.0, -1.0, 1.0 + 1e-7, -1.0 - 1e-7, 0.0], dtype=dtype)
    d = spec.dpsi(c, mv)
    assert torch.isfinite(d).all(), d
    edge = torch.cos(torch.tensor([THETA_EPS, math.pi - THETA_EPS], dtype=dtype))
    torch.testing.assert_close(d[:2], spec.dpsi(edge, mv))


@pytest.mark.parametrize("name,m", [c for c in MARGIN_CASES if c[0] not in ("cosface", "none")])
def test_autograd_of_psi_at_unit_cosines_is_pinned(name, m):
    """Autograd of ψ (what reference_loss differentiates) is the formula's derivative
    for |c| < 1, and 0 where |c| >= 1, whatever torch's clamp backward does at its bound
    (torch 2.11: NaN here with a zero upstream gradient; 2.14: 0)."""
    spec, mv = resolve_margin(name, m)
    inner = torch.cos(ANGLES)
    c = torch.cat([inner, torch.tensor([1.0, -1.0, 1.0 + 1e-12], dtype=torch.float64)]).requires_grad_()
    upstream = torch.ones_like(c)
    upstream[-2] = 0.0  # 0·∞ = NaN where the bound's gradient passes on (torch 2.11)
    (g,) = torch.autograd.grad(spec.psi(c, mv), c, upstream)
    c_in = inner.clone().requires_grad_()
    (want,) = torch.autograd.grad(formula(name, torch.acos(c_in), mv).sum(), c_in)
    torch.testing.assert_close(g[:41], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(g[41:], torch.zeros(3, dtype=torch.float64)), g[41:]


def test_expface_clamp_bound():
    """The documented size of the clamp: ExpFace ψ'(1) = m·(ε/π)^(2m−2)·(1 + O(ε²))."""
    spec, m = resolve_margin("expface", 0.7)
    d = float(spec.dpsi(torch.tensor([1.0], dtype=torch.float64), m))
    assert d == pytest.approx(0.7 * (THETA_EPS / math.pi) ** (2 * 0.7 - 2), rel=1e-3)


def test_expface_penalty_shape():
    """ExpFace's selling point: the penalty θ' − θ peaks mid-range and vanishes at 0 and π."""
    spec, m = resolve_margin("expface", 0.7)
    theta = torch.linspace(0, math.pi, 101, dtype=torch.float64)
    penalty = math.pi * (theta / math.pi) ** m - theta
    assert penalty[0] == 0 and abs(float(penalty[-1])) < 1e-12
    assert 0 < int(penalty.argmax()) < 100
    torch.testing.assert_close(spec.psi(torch.cos(theta), m), torch.cos(theta + penalty))


def test_target_terms_modes():
    spec, m = resolve_margin("arcface", 0.5)
    c = torch.tensor([0.3, 0.9], dtype=torch.float64)
    logit, f_exact = target_terms(c, spec, m, 64.0, "exact")
    _, f_st = target_terms(c, spec, m, 64.0, "straight_through")
    torch.testing.assert_close(logit, 64 * torch.cos(torch.acos(c) + 0.5))
    torch.testing.assert_close(f_st, torch.full_like(c, 64.0))
    torch.testing.assert_close(f_exact, 64 * torch.sin(torch.acos(c) + 0.5) / torch.sin(torch.acos(c)))


@pytest.mark.parametrize("name,m,msg", [
    ("expface", 0.0, "0 < m <= 1"), ("expface", 1.5, "0 < m <= 1"), ("expface", float("nan"), "finite"),
    ("arcface", -0.1, "0 <= m < pi"), ("arcface", 28.6, "0 <= m < pi, in radians"), ("cosface", -1.0, "0 <= m <= 2"),
    ("sphereface", 0.5, "m >= 1"), ("combined", 0.5, "tuple"), ("combined", (1.0, 0.5), "tuple"),
    ("combined", (0.0, 0.5, 0.0), "m1 > 0"), ("combined", (1.0, -0.5, 0.0), "m2 >= 0"),
    ("none", 0.3, "m must be None"), ("expface", "0.7", "finite float"), ("arcface", True, "finite float"),
])
def test_bad_m(name, m, msg):
    with pytest.raises(ValueError, match="m") as e:
        resolve_margin(name, m)
    assert msg in str(e.value)


def test_bad_margin_name():
    with pytest.raises(ValueError, match="margin must be one of"):
        resolve_margin("magface", None)


def test_defaults():
    assert {k: v.default for k, v in MARGINS.items()} == {
        "expface": 0.7, "arcface": 0.5, "cosface": 0.35, "sphereface": 1.7,
        "combined": (1.0, 0.5, 0.0), "none": 0.0}
