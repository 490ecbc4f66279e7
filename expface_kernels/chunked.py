"""The ``chunked`` backend: pure PyTorch, classes in chunks, any device.

Forward keeps an online (max, sum-exp) per row across class chunks; backward recomputes
each chunk's cosines (4 GEMM-equivalents in all). Extra memory: O(B·D + C) plus one
(B, chunk) tile and its temporaries, where ``chunk`` comes from a byte budget.

GEMMs run in the promoted input dtype (fp32 for fp16 x with fp32 W; bf16 for bf16 both);
everything after the GEMM — scaling, exp, sums, G, the gradient accumulators — in the
accumulation dtype (fp32, or fp64 for fp64 inputs). In fp16 the GEMMs take the chunk's
normalised rows ŵ instead of W (see :func:`_w_operand`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import Backend
from .torch_math import acc_dtype, block_target_index, inv_norm, project_w_grad, put_target

TILE_BYTES = 8 << 20
"""Budget of one (B, chunk) acc tile on the CPU. On this 2-core CPU (B=256, C=2^17,
D=512, fp32) chunks of 2^12–2^14 classes gave the same forward+backward time within 3%;
8 MiB keeps the three live tiles (logits, exp, G) near 24 MiB — about 2% of the naive
loss's peak."""

CUDA_TILE_BYTES = 64 << 20
"""Budget of one tile on a GPU. Each chunk costs ~50 small kernel launches from Python;
with the CPU's 8 MiB (B=512, C=2^20: 256 chunks) an H200 spent 240 ms in this backend,
12x the naive loss — launch-bound. 64 MiB (32 chunks there) cuts the launches 8x; its
three live tiles (192 MiB) stay under 5% of the naive loss's 4.1 GiB at that shape."""

_MIN_CHUNK = 256


def chunk_size(batch: int, c_local: int, itemsize: int = 4, device_type: str = "cpu") -> int:
    """Classes per chunk for a (batch, chunk) tile of ``itemsize`` bytes within the budget."""
    budget = CUDA_TILE_BYTES if device_type == "cuda" else TILE_BYTES
    n = max(_MIN_CHUNK, budget // max(1, batch * itemsize))
    return min(c_local, n)


def _gemm_dtype(x_hat: Tensor, w: Tensor) -> torch.dtype:
    return torch.promote_types(x_hat.dtype, w.dtype)


def _w_operand(wc: Tensor, inv_c: Tensor, gd: torch.dtype) -> tuple[Tensor, bool]:
    """The (chunk, D) W operand of the GEMMs in ``gd``, and whether it is normalised.

    fp16 (max 65504, normal down to 6.1e-5) takes ŵ = W·inv, unit rows: the raw-W form
    rounds the logits' GEMM output x̂·W_j, of size ‖W_j‖, to fp16, and feeds the
    gradient GEMMs G_ij·inv_j, up to s·grad_row/‖W_j‖. With B = 8, D = 128, s = 64 and
    an fp16 W of row norms 1.1e-4 (reduction mean) or 3.4e-4 (sum) that overflowed into
    NaN gradients where the reference backend's fp16 gradients were finite (4e-4 from
    float64). Other dtypes have fp32's range: raw W, no (chunk, D) copy.
    """
    if gd != torch.float16:
        return wc.to(gd), False
    return (wc.to(inv_c.dtype) * inv_c.unsqueeze(1)).to(gd), True


def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Contract primitive (contract.py) with an online logsumexp over class chunks."""
    acc = acc_dtype(x_hat, w)
    gd = _gemm_dtype(x_hat, w)
    b, c_local = x_hat.shape[0], w.shape[0]
    xg = x_hat.to(gd)
    in_block, col = block_target_index(labels, offset, c_local)
    w_inv = torch.empty(c_local, dtype=acc, device=w.device)
    run_max = torch.full((b,), float("-inf"), dtype=acc, device=w.device)
    run_sum = torch.zeros(b, dtype=acc, device=w.device)
    step = chunk_size(b, c_local, torch.finfo(acc).bits // 8, w.device.type)
    for start in range(0, c_local, step):
        wc = w[start:start + step]
        inv_c = inv_norm(wc, acc)
        w_inv[start:start + step] = inv_c
        wg, unit_rows = _w_operand(wc, inv_c, gd)
        z = (xg @ wg.t()).to(acc).mul_(s if unit_rows else inv_c * s)
        put_target(z, in_block, col, target_logit, start)
        new_max = torch.maximum(run_max, z.amax(1))
        run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max.unsqueeze(1)).exp_().sum(1)
        run_max = new_max
    return run_max, run_sum, w_inv


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int) -> tuple[Tensor, Tensor]:
    """Contract primitive (contract.py): recompute each chunk, form G, two GEMMs."""
    acc = w_inv_norm.dtype
    gd = _gemm_dtype(x_hat, w)
    b, c_local = x_hat.shape[0], w.shape[0]
    xg = x_hat.to(gd)
    # The dW GEMM multiplies G (acc) by x̂: in acc when the GEMM dtype is acc, else in gd.
    x_for_dw = x_hat.to(acc) if gd == acc else xg
    in_block, col = block_target_index(labels, offset, c_local)
    row_scale = (grad_row * s).unsqueeze(1)
    neg_lse = lse.neg().unsqueeze(1)
    grad_x = torch.zeros(b, x_hat.shape[1], dtype=acc, device=x_hat.device)
    grad_w = torch.empty_like(w)
    step = chunk_size(b, c_local, torch.finfo(acc).bits // 8, w.device.type)
    for start in range(0, c_local, step):
        wc = w[start:start + step]
        inv_c = w_inv_norm[start:start + step]
        wg, unit_rows = _w_operand(wc, inv_c, gd)
        g = (xg @ wg.t()).to(acc).mul_(s if unit_rows else inv_c * s)
        g.add_(neg_lse).exp_().mul_(row_scale)
        put_target(g, in_block, col, target_grad, start)
        if not unit_rows:
            g.mul_(inv_c)  # fold 1/‖W_j‖ into the columns: both GEMMs need it
        if gd == acc:
            grad_x.addmm_(g, wg)  # wg is W in acc here (raw rows)
            gw = g.t() @ x_for_dw
        else:
            # Low-precision GEMMs (tensor cores on a GPU) with fp32 accumulation inside.
            gl = g.to(gd)
            grad_x.add_(gl @ wg)
            gw = (gl.t() @ x_for_dw).to(acc)
            if unit_rows:
                gw.mul_(inv_c.unsqueeze(1))  # the 1/‖W_j‖ that G did not carry
        grad_w[start:start + step] = project_w_grad(gw, wc, inv_c).to(w.dtype)
    return grad_x, grad_w


def _unsupported(x_hat: Tensor, w: Tensor) -> list[str]:
    return []  # plain torch ops: any device and float dtype torch has matmul for


BACKEND = Backend("chunked", lse_partials, grads, _unsupported)
