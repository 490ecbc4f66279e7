"""The naive loss: materialises the B×C logits. Ground truth, never fast.

Two things live here:

* :func:`reference_loss` — the formula of DESIGN §1 written with autograd (F.normalize,
  a matmul, the margin on the gathered target cosine, F.cross_entropy). It shares no
  code with the backends' primitives, so the tests can hold every backend against it.
* ``BACKEND`` — the ``reference`` backend: the contract's two primitives, each holding
  the block's full (B, C_local) logits in the accumulation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import Backend
from .margins import resolve_margin
from .torch_math import NORM_EPS, acc_dtype, block_target_index, inv_norm, project_w_grad, put_target


def reference_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: str = "expface",
                   *, s: float = 64.0, m=None, margin_grad: str = "exact",
                   reduction: str = "mean", ignore_index: int = -1,
                   compute_dtype: torch.dtype | None = None) -> Tensor:
    """The margin-softmax loss by autograd over materialised logits.

    Args:
        embeddings: (B, D) float; weight: (C, D) float; labels: (B,) int.
        compute_dtype: dtype of every step (default: float64 if an input is float64,
            else float32). Pass torch.bfloat16 to get "the same loss computed in bf16",
            the yardstick of the low-precision tests.
    Returns:
        The loss in ``compute_dtype`` ((B,) for ``reduction="none"``). In
        ``"straight_through"`` mode the margin enters the value but not the gradient,
        written here as ``s·c + (s·ψ(c) − s·c).detach()``. ``"exact"`` mode has the
        true derivative of ψ, with no clamp of the angle: it grows without bound as
        c → ±1. At |c| = 1 itself, where acos has no derivative, the target cosine
        contributes no gradient through ψ (see ``margins._theta``).
    """
    spec, mv = resolve_margin(margin, m)
    dt = compute_dtype or acc_dtype(embeddings, weight)
    x_hat = F.normalize(embeddings.to(dt), dim=1, eps=NORM_EPS)
    w_hat = F.normalize(weight.to(dt), dim=1, eps=NORM_EPS)
    cos = x_hat @ w_hat.t()
    labels = labels.long()
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).unsqueeze(1)
    c_t = cos.gather(1, safe).squeeze(1)
    if margin_grad == "straight_through":
        z_t = s * c_t + (s * spec.psi(c_t.detach(), mv) - s * c_t).detach()
    else:
        z_t = s * spec.psi(c_t, mv)
    logits = (s * cos).scatter(1, safe, z_t.unsqueeze(1))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _block_cosines(x_hat: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x_hat, w)
    w_acc = w.to(acc)
    w_inv = inv_norm(w_acc, acc)
    return (x_hat.to(acc) @ w_acc.t()) * w_inv, w_inv, w_acc


def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Contract primitive (see contract.py) over the whole (B, C_local) block at once."""
    cos, w_inv, _ = _block_cosines(x_hat, w)
    z = s * cos
    in_block, col = block_target_index(labels, offset, w.shape[0])
    put_target(z, in_block, col, target_logit)
    row_max = z.amax(1)
    return row_max, torch.exp(z - row_max.unsqueeze(1)).sum(1), w_inv


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int) -> tuple[Tensor, Tensor]:
    """Contract primitive (see contract.py): G = ∂L/∂c over the whole block at once."""
    acc = w_inv_norm.dtype
    w_acc = w.to(acc)
    cos = (x_hat.to(acc) @ w_acc.t()) * w_inv_norm
    g = torch.exp(s * cos - lse.unsqueeze(1)) * (s * grad_row).unsqueeze(1)
    in_block, col = block_target_index(labels, offset, w.shape[0])
    put_target(g, in_block, col, target_grad)
    g = g * w_inv_norm  # fold 1/‖W_j‖ into the columns: both GEMMs need it
    grad_x = g @ w_acc
    grad_w = project_w_grad(g.t() @ x_hat.to(acc), w, w_inv_norm)
    return grad_x, grad_w.to(w.dtype)


def _unsupported(x_hat: Tensor, w: Tensor) -> list[str]:
    return []  # any device and dtype torch supports


BACKEND = Backend("reference", lse_partials, grads, _unsupported)
