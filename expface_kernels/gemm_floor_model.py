"""A PyTorch model of the GEMM-floor decomposition that the CUTLASS kernels implement.

This module is the executable specification of csrc/cutlass/: it does, in PyTorch and
in whatever dtype it is given (float64 in the tests), exactly the arithmetic of the four
fused kernels, tile by tile and chunk by chunk, so that the decomposition can be held
against the reference on a CPU. It is a backend of the contract in contract.py
(``BACKEND``), so the tests run it under the package's own autograd.Function, prologue
and margins; it is not registered for users (it is slow, and the reference serves).

Shapes: x_hat (B, D) normalised embeddings; w (C_local, D) raw centres of the block
``[offset, offset + C_local)``; "acc" is float64 for float64 inputs, else float32.

Two facts turn every epilogue into a standard GEMM-epilogue reduction:

(a) A fixed offset replaces the running max. Off-target logits satisfy |z| <= s and the
    target logit s·ψ(c) <= s (ψ <= 1 for every margin). With a per-call constant ``o``,
    Σ_j exp(z_ij − o) cannot overflow fp32 while s − o + ln C < LN_SUM_MAX, and its
    largest term stays a normal fp32 number while −s − o > LN_TERM_MIN (every
    off-target term does; the row's largest term is at least the smallest off-target
    one). ``o = 0`` satisfies both when s + ln C < 88 (s = 64, C = 2^20: 77.9); a
    positive ``o`` extends that to 2s + ln C < 175. When no ``o`` fits (a huge s), the
    kernels' running-max path is used: :func:`fixed_offset` returns None.
(b) The projection through W's normalisation moves into the dW GEMM. With
    G'_ij = G_ij/‖W_j‖ (16 bits, what the dX and dW GEMMs read) and the column
    reduction c'_j = Σ_i G'_ij·c_ij of the recompute kernel,
    grad_W_j = (G'ᵀ x̂)_j − c'_j·W_j/‖W_j‖, and grad_x̂ = G'·W: both GEMMs take raw W.

The four kernels, as modelled here:

1. forward: per (row tile, class tile) the epilogue forms z = s·acc·w_inv_j, puts the
   precomputed target logit at column y_i inside the tile, and reduces
   Σ_j exp(z_ij − o) over the tile's columns into a per-(class tile, row) partial; the
   partials are summed afterwards (no atomics, no logits in memory).
2. backward recompute, per class chunk: G'_ij = w_inv_j·grad_row_i·s·exp(s·c_ij − lse_i),
   target column G'_iy = w_inv_j·target_grad_i, stored in 16 bits (as G'ᵀ: the kernel
   runs with classes as GEMM rows, so that c' is a reduction along GEMM rows); c'_j
   reduced from the stored (rounded) G' so that the projection removes exactly the
   radial part of what the dW GEMM accumulates.
3. grad_x̂ += G'·W_chunk (plain GEMM, fp32 accumulation across chunks).
4. grad_W_chunk = G'ᵀ·x̂ − (c'_j·w_inv_j)·W_j (epilogue with W as the C operand; no
   projection where ‖W_j‖ < 1e-12, as F.normalize's backward).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .contract import Backend
from .torch_math import NORM_EPS, acc_dtype, block_target_index, inv_norm, merge_partials, put_target

LN_SUM_MAX = 88.0
"""Largest ln of a row's sum of exp the fixed-offset path allows: ln(FLT_MAX) = 88.72,
so a sum of C terms each <= exp(88 − ln C) stays finite with 0.7 nats to spare for the
fp32 rounding of z (|Δz| <= s·2^-23·(a few) << 0.7)."""

LN_TERM_MIN = -87.0
"""Smallest ln of one off-target term the fixed-offset path allows: ln(FLT_MIN) = -87.34,
the smallest normal fp32 number; below it exp() loses bits or flushes to zero."""

FORWARD_TILE_N = 128
"""Class columns per forward tile (the CUTLASS kernel's tile N): one partial per
(class tile, row)."""

BACKWARD_CHUNK = 16384
"""Classes per backward chunk. On the GPU G' of one chunk (B x chunk x 2 bytes: 16 MiB
at B = 512) is written by kernel 2 and read by kernels 3 and 4 while it is L2-resident
(H100: 50 MB of L2)."""


def fixed_offset(s: float, num_classes: int) -> Optional[float]:
    """The constant ``o`` of fact (a) for scale ``s`` and ``num_classes`` columns, or None.

    Returns 0.0 when s + ln C < LN_SUM_MAX (the common case), the smallest positive ``o``
    that keeps the sum finite when its terms also stay normal (s + o <= −LN_TERM_MIN),
    and None when no constant does: then the running max must be used.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    o = max(0.0, s + math.log(num_classes) - LN_SUM_MAX)
    return o if -s - o >= LN_TERM_MIN else None


def _cosines(x_hat: Tensor, w_tile: Tensor, inv_tile: Tensor, acc: torch.dtype) -> Tensor:
    """(B, n) c_ij = (x̂_i·W_j)·w_inv_j: the GEMM's accumulator times a column broadcast."""
    return (x_hat.to(acc) @ w_tile.to(acc).t()) * inv_tile


def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int, *, fixed: Union[str, float, None] = "auto",
                 sum_dtype: Optional[torch.dtype] = None,
                 tile_n: int = FORWARD_TILE_N) -> tuple[Tensor, Tensor, Tensor]:
    """Contract primitive (contract.py), as kernel 1 computes it.

    Args:
        fixed: "auto" takes :func:`fixed_offset` (s, C_local) and falls back to the
            running max when it is None; a float forces that offset (to show what
            happens outside the condition); None forces the running max.
        sum_dtype: dtype of the exp and its sums (default acc); float32 models the
            kernel's registers when the GEMM runs in float64 here.
        tile_n: class columns per tile.
    Returns:
        row_max (B,) acc, row_sumexp (B,) acc, w_inv (C_local,) acc. The fixed path
        returns row_max = o; the running-max path returns the merged lse as row_max and
        row_sumexp = 1 (the same lse = row_max + ln row_sumexp).
    """
    acc = acc_dtype(x_hat, w)
    sd = sum_dtype or acc
    b, c_local = x_hat.shape[0], w.shape[0]
    if tile_n < 1:
        raise ValueError(f"tile_n must be >= 1, got {tile_n}")
    o = fixed_offset(s, c_local) if fixed == "auto" else fixed
    w_inv = inv_norm(w, acc)  # the C-float norms pass, kept for backward
    in_block, col = block_target_index(labels, offset, c_local)
    n_tiles = -(-c_local // tile_n)
    part_max = torch.empty(n_tiles, b, dtype=sd, device=w.device)
    part_sum = torch.empty(n_tiles, b, dtype=sd, device=w.device)
    for t in range(n_tiles):
        start = t * tile_n
        z = s * _cosines(x_hat, w[start:start + tile_n], w_inv[start:start + tile_n], acc)
        put_target(z, in_block, col, target_logit, start)  # inside the tile, before the exp
        z = z.to(sd)
        if o is not None:
            part_sum[t] = torch.exp(z - o).sum(1)
        else:  # the running-max path: (max, sum) per tile, merged below
            part_max[t] = z.amax(1)
            part_sum[t] = torch.exp(z - part_max[t].unsqueeze(1)).sum(1)
    if o is not None:
        return torch.full((b,), float(o), dtype=acc, device=w.device), part_sum.sum(0).to(acc), w_inv
    lse = merge_partials(part_max, part_sum)
    return lse.to(acc), torch.ones(b, dtype=acc, device=w.device), w_inv


def recompute_chunk(x_hat: Tensor, w_chunk: Tensor, inv_chunk: Tensor, in_block: Tensor,
                    col: Tensor, start: int, lse: Tensor, target_grad: Tensor,
                    grad_row: Tensor, s: float,
                    store_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Kernel 2 over one class chunk ``[start, start + n)`` of the block.

    Returns:
        g_prime (B, n) acc: G'_ij = G_ij·w_inv_j, rounded through ``store_dtype`` when
        given (the 16-bit tile the dX/dW GEMMs read); c_prime (n,) acc: Σ_i G'_ij·c_ij
        from that rounded G'.
    """
    acc = inv_chunk.dtype
    cos = _cosines(x_hat, w_chunk, inv_chunk, acc)
    g = torch.exp(s * cos - lse.unsqueeze(1)) * (s * grad_row).unsqueeze(1)
    put_target(g, in_block, col, target_grad, start)
    g_prime = g * inv_chunk
    if store_dtype is not None:
        g_prime = g_prime.to(store_dtype).to(acc)
    return g_prime, (g_prime * cos).sum(0)


def projection_scale(c_prime: Tensor, inv_chunk: Tensor) -> Tensor:
    """(n,) the coefficient of W_j in kernel 4's epilogue: c'_j·w_inv_j, and 0 where
    ‖W_j‖ < 1e-12 (F.normalize's backward does not project there)."""
    scale = c_prime * inv_chunk
    return torch.where(inv_chunk < 1.0 / NORM_EPS, scale, torch.zeros_like(scale))


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int, *,
          chunk: int = BACKWARD_CHUNK,
          store_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Contract primitive (contract.py), as kernels 2-4 compute it, chunk by chunk.

    Args:
        chunk: classes per recompute chunk; store_dtype: G''s storage dtype (None: acc).
    Returns:
        grad_x_hat (B, D) acc; grad_w (C_local, D) w.dtype.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    acc = w_inv_norm.dtype
    c_local = w.shape[0]
    in_block, col = block_target_index(labels, offset, c_local)
    x_acc = x_hat.to(acc)
    grad_x = torch.zeros(x_hat.shape, dtype=acc, device=x_hat.device)
    grad_w = torch.empty_like(w)
    for start in range(0, c_local, chunk):
        wc = w[start:start + chunk]
        inv_c = w_inv_norm[start:start + chunk]
        g_prime, c_prime = recompute_chunk(x_hat, wc, inv_c, in_block, col, start, lse,
                                           target_grad, grad_row, s, store_dtype)
        w_acc = wc.to(acc)
        grad_x += g_prime @ w_acc                                      # kernel 3
        gw = g_prime.t() @ x_acc - projection_scale(c_prime, inv_c).unsqueeze(1) * w_acc  # kernel 4
        grad_w[start:start + chunk] = gw.to(w.dtype)
    return grad_x, grad_w


def _unsupported(x_hat: Tensor, w: Tensor) -> list[str]:
    return []  # plain torch ops


BACKEND = Backend("gemm_floor_model", lse_partials, grads, _unsupported)
