"""Forward primitive, warp-specialized form (Hopper, opt-in): TMA loads in a producer
warpgroup, the GEMM tiles and the online logsumexp in two consumer warpgroups.

Why: at one 8-warp program per SM the default forward (lse_forward._lse_partials_kernel)
runs each tile as load latency, then 8 MMA K steps, then ~1,000 instructions of epilogue
a thread, one after the other; the tile loop is not pipelined across tiles. The
2026-11-28 profile put the forward at 1.41 ms against 0.95 ms for one cuBLAS GEMM of the
same shape (H200, B = 512, C = 2^20, D = 512, bf16). With ``tl.range(...,
warp_specialize=True)`` Triton's Hopper pass (3.6 and 3.8) splits the tile loop into a
producer that streams the next tiles' x / W stages through TMA while the consumers
finish the current tile, so no tile waits for its first loads. ``ForwardConfig.
warp_specialize`` picks this kernel; only the autotune candidates set it until a GPU has
timed it (bench/RESULTS.md "Next, on a GPU").

What the Hopper pass accepts (compiled for sm_90 here, Triton 3.6 and 3.8): the loads
must be tensor descriptors (pointer loads crash the pass: "PassManager::run failed",
also reported as triton-lang/triton#9728), and the loop body must not branch on a
tensor value -- the default kernel's ``if`` that runs the target / padding selects only
in the tiles that need them makes the pass leave the loop unspecialized, silently. So:

* padding columns (last class tile): TMA fills rows past C with zeros, and a per-column
  bias of -inf makes their logit -inf in the same FFMA that scales the tile
  (z2 = acc * a + bias);
* the target column: substituting it in the loop needs a per-logit compare and select
  (in a test kernel with 64 logits a thread: 1,768 -> 2,120 SASS instructions, ~2.75
  more a logit on ~5). Instead each row *skips* the one tile that holds its target (a
  per-row select, a few instructions a tile), and ``_lse_target_tile_kernel`` computes
  that tile for that row alone -- s * x_hat_i . W_j / ||W_j|| on the FMA units over
  BLOCK_N classes, the target logit substituted -- into one more (split) slot of the
  partials, which the finalize merges with the others. One extra launch of B programs,
  B x BLOCK_N x D multiply-adds (0.01% of the GEMM's at C = 2^20) but one W tile read
  per row: 64 MiB at B = 512, BLOCK_N = 128, D = 512, bf16 (~15 us of an H200's HBM
  bandwidth, an estimate).

Requirements (``unsupported_reason``): x_hat and W of one dtype -- on a GPU a 16-bit
one -- and rows 16-byte aligned (TMA: base address and row stride multiples of 16
bytes, e.g. D % 8 == 0 for bf16). Anything else runs the default kernel.

All offsets int64 where they can pass 2^31 (class ids, B * splits, C * D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import LN2, LOG2E, block_target_cols, exp2, fast_exp2, forward_program_rows
from .configs import device_kind


@triton.jit
def _tile_logits(x_desc, w_desc, row0, col0, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 = x_hat[row0:, :] @ W[col0:, :]^T over D in BLOCK_K steps
    (TMA reads past B / C / D as zeros)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, D, BLOCK_K):
        acc = tl.dot(x_desc.load([row0, k]), w_desc.load([col0, k]).T, acc)
    return acc


@triton.jit
def _lse_partials_ws_kernel(
    x_ptr, w_ptr, labels_ptr,                      # (B, D), (C, D) 16-byte aligned rows; (B,) int
    pmax_ptr, psum_ptr, winv_ptr,                  # (splits + 1, B) fp32 x2, (C,) fp32
    B, C, D, offset, s, stride_xb, stride_wc, tiles_per_split, num_row_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    """Program (row tile, split) as in _lse_partials_kernel; each row leaves out the class
    tile that holds its target (``_lse_target_tile_kernel`` adds that tile)."""
    # TMA descriptors made in the kernel (with a block shape per load): descriptors passed
    # from the host made Triton 3.8's Hopper pass split the x tile between the consumers
    # without splitting its block ("descriptor block and tensor must have the same number
    # of elements"; 3.6 compiled both).
    x_desc = tl.make_tensor_descriptor(x_ptr, [B, D], [stride_xb, 1], [BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, [C, D], [stride_wc, 1], [BLOCK_N, BLOCK_K])
    pid_m, split, rows, row_ok, rows64 = forward_program_rows(B, num_row_tiles, BLOCK_M)
    # The class tile of each row's target, -1 if not in this block.
    tcol = block_target_cols(labels_ptr, rows64, row_ok, offset, C)
    ttile = tl.where(tcol >= 0, tcol // BLOCK_N, -1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_tiles = tl.cdiv(C, BLOCK_N)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    row0 = pid_m * BLOCK_M
    for t in tl.range(t_begin, t_end, warp_specialize=True):
        acc = _tile_logits(x_desc, w_desc, row0, t * BLOCK_N, D, BLOCK_M, BLOCK_N, BLOCK_K)
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        a = tl.load(winv_ptr + cols.to(tl.int64), mask=col_ok, other=0.0) * (s * LOG2E)
        bias = tl.where(col_ok, 0.0, float("-inf"))
        z = acc * a[None, :] + bias[None, :]       # log2 units; padding columns -inf
        # m_cand includes the skipped rows' tiles too, so that every exponent below is
        # <= 0 and finite-or--inf (no inf - inf); the selects then drop those rows' terms.
        m_cand = tl.maximum(m_i, tl.max(z, axis=1))
        l_cand = l_i * exp2(m_i - m_cand, FAST_EXP2) + tl.sum(exp2(z - m_cand[:, None], FAST_EXP2), axis=1)
        skip = ttile == t
        m_i = tl.where(skip, m_i, m_cand)
        l_i = tl.where(skip, l_i, l_cand)

    out = split.to(tl.int64) * B + rows64
    tl.store(pmax_ptr + out, m_i * LN2, mask=row_ok)
    tl.store(psum_ptr + out, l_i, mask=row_ok)


@triton.jit
def _lse_target_tile_kernel(x_ptr, w_ptr, winv_ptr, tlogit_ptr, labels_ptr, pmax_ptr, psum_ptr,
                            B, C, D, offset, s, stride_xb, stride_wc, slot,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST_EXP2: tl.constexpr):
    """One program per row: (max, sum-exp) of the row over the class tile holding its
    target, target logit substituted, into partial slot ``slot``; (-inf, 0) for a row
    whose target is not in this block (ignored rows included)."""
    r = tl.program_id(0).to(tl.int64)
    tcol = tl.load(labels_ptr + r).to(tl.int64) - offset
    out = slot.to(tl.int64) * B + r
    if (tcol >= 0) & (tcol < C):
        cols = (tcol // BLOCK_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k in range(0, D, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            xr = tl.load(x_ptr + r * stride_xb + ks, mask=ks < D, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + cols[:, None] * stride_wc + ks[None, :],
                         mask=col_ok[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wt * xr[None, :], axis=1)
        a = tl.load(winv_ptr + cols, mask=col_ok, other=0.0) * (s * LOG2E)
        tlogit2 = tl.load(tlogit_ptr + r).to(tl.float32) * LOG2E
        z = tl.where(cols == tcol, tlogit2, acc * a)
        z = tl.where(col_ok, z, float("-inf"))
        m = tl.max(z, axis=0)
        tl.store(pmax_ptr + out, m * LN2)
        tl.store(psum_ptr + out, tl.sum(exp2(z - m, FAST_EXP2), axis=0))
    else:
        tl.store(pmax_ptr + out, float("-inf"))
        tl.store(psum_ptr + out, 0.0)


def unsupported_reason(x_hat: Tensor, w: Tensor) -> str | None:
    """Why the warp-specialized forward cannot run these (contiguous) inputs, or None."""
    kind = device_kind(x_hat.device)[0]
    if kind not in ("interpreter", "hopper"):
        return f"warp specialization is only built for Hopper here (this device: {kind})"
    if x_hat.dtype != w.dtype:
        return f"x_hat ({x_hat.dtype}) and w ({w.dtype}) differ in dtype"
    if kind == "hopper" and x_hat.element_size() != 2:
        return f"{x_hat.dtype} operands (the Hopper form is built for fp16 / bf16)"
    for name, t in (("x_hat", x_hat), ("w", w)):
        if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name}'s rows are not 16-byte aligned (TMA); D * element size = {t.shape[1] * t.element_size()}"
    return None


def _scratch(size: int, alignment: int, stream):
    """Global scratch for the kernel-made TMA descriptors (128 bytes each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Kernels that make TMA descriptors need Triton's scratch allocator; set one backed by
    PyTorch's caching allocator unless the user has set their own (it is a ContextVar)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def launch(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float, offset: int,
           cfg, pmax: Tensor, psum: Tensor, w_inv: Tensor, row_tiles: int, splits: int, per: int) -> None:
    """Fill pmax / psum (splits + 1, B): slots [0, splits) from the warp-specialized kernel,
    slot ``splits`` from the target tiles. w_inv must already hold W's inverse norms."""
    t = cfg.tile
    B, D = x_hat.shape
    C = w.shape[0]
    fast = fast_exp2(x_hat.device)
    _ensure_allocator()
    _lse_partials_ws_kernel[(row_tiles * splits,)](
        x_hat, w, labels, pmax, psum, w_inv, B, C, D, int(offset), float(s),
        x_hat.stride(0), w.stride(0), per, row_tiles,
        BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, FAST_EXP2=fast,
        num_warps=t.num_warps, num_stages=t.num_stages)
    _lse_target_tile_kernel[(B,)](
        x_hat, w, w_inv, target_logit, labels, pmax, psum, B, C, D, int(offset), float(s),
        x_hat.stride(0), w.stride(0), splits,
        BLOCK_N=t.BLOCK_N, BLOCK_K=min(64, triton.next_power_of_2(D)), FAST_EXP2=fast, num_warps=4)
