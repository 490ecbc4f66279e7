"""Helpers for the tests: inputs, the float64 ground truth, tolerances."""

from __future__ import annotations

import torch

import expface_kernels as ek

MARGIN_CASES = [
    ("expface", None), ("expface", 0.5), ("arcface", None), ("cosface", None),
    ("sphereface", None), ("combined", None), ("combined", (1.2, 0.3, 0.1)), ("none", None),
]


def make_inputs(b: int, c: int, d: int, *, dtype=torch.float64, w_dtype=None, seed: int = 0,
                ignore: tuple[int, ...] = (), label_dtype=torch.int64, device="cpu"):
    """Random (x (b, d), w (c, d), labels (b,)) with rows ``ignore`` set to −1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    for i in ignore:
        y[i] = -1
    x = x.to(device=device, dtype=dtype).requires_grad_()
    w = w.to(device=device, dtype=w_dtype or dtype).requires_grad_()
    return x, w, y.to(device=device, dtype=label_dtype)


def loss_and_grads(fn, x, w):
    """fn() -> loss; returns (loss detached, grad_x, grad_w) for a random-free sum backward."""
    x.grad = w.grad = None
    loss = fn()
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


def ground_truth(x, w, y, margin, m=None, **kw):
    """float64 autograd reference: (loss, grad_x, grad_w)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    return loss_and_grads(lambda: ek.reference_loss(x64, w64, y, margin, m=m, **kw), x64, w64)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(max |b|, tiny), in float64 (NaN-aware: NaN -> inf)."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max()
    if torch.isnan(err):
        return float("inf")
    return float(err / b.abs().max().clamp_min(1e-30))
