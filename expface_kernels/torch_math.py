"""Small tensor helpers shared by the pure-PyTorch backends and the autograd.Function.

Shapes: B rows (embeddings), a block of C_local classes, D features.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12
"""The norm floor of DESIGN §1: x̂ = x / max(‖x‖, 1e-12), as F.normalize."""


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (all accumulation dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def inv_norm(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """(N,) ``1 / max(‖row‖₂, 1e-12)`` in ``dtype`` for a (N, D) tensor."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).clamp_min(NORM_EPS).reciprocal()


def block_target_index(labels: Tensor, offset: int, c_local: int) -> tuple[Tensor, Tensor]:
    """Where each row's target column lies in the block ``[offset, offset + c_local)``.

    Args:
        labels: (B,) int64 global labels, ignored rows already −1.
    Returns:
        in_block (B,) bool and col (B,) int64, the local column clamped into
        ``[0, c_local)`` so that it is always a safe index (only meaningful where
        in_block).
    """
    col = labels - offset
    in_block = (col >= 0) & (col < c_local)
    return in_block, col.clamp(0, max(c_local - 1, 0))


def put_target(tile: Tensor, in_block: Tensor, col: Tensor, value: Tensor, start: int = 0) -> None:
    """In place: ``tile[i, col_i - start] = value_i`` for rows whose target is in the tile.

    ``tile`` is a (B, n) slice of columns ``[start, start + n)`` of the block; rows whose
    target lies outside it keep their entry.
    """
    n = tile.shape[1]
    here = in_block & (col >= start) & (col < start + n)
    idx = (col - start).clamp(0, n - 1).unsqueeze(1)
    old = tile.gather(1, idx).squeeze(1)
    tile.scatter_(1, idx, torch.where(here, value.to(tile.dtype), old).unsqueeze(1))


def project_w_grad(g_scaled: Tensor, w: Tensor, w_inv: Tensor) -> Tensor:
    """Chain ∂L/∂ŵ through ŵ = W / max(‖W‖, eps) (F.normalize's backward).

    Args:
        g_scaled: (C, D) acc, ``w_inv_j · ∂L/∂ŵ_j``.
        w: (C, D) raw centres; w_inv: (C,) acc inverse norms.
    Returns:
        (C, D) acc: ``g_scaled − ŵ (ŵ·g_scaled)`` where ‖W_j‖ ≥ eps, ``g_scaled`` where not.
    """
    w_hat = w.to(g_scaled.dtype) * w_inv.unsqueeze(1)
    radial = (w_hat * g_scaled).sum(1, keepdim=True)
    radial = torch.where((w_inv < 1.0 / NORM_EPS).unsqueeze(1), radial, torch.zeros_like(radial))
    return g_scaled - w_hat * radial



def merge_partials(row_max: Tensor, row_sumexp: Tensor) -> Tensor:
    """lse (B,) from per-split partials (S, B): M = max_s m_s, S = Σ_s S_s·exp(m_s − M)."""
    m = row_max.amax(0)
    return m + torch.log((row_sumexp * torch.exp(row_max - m)).sum(0))
