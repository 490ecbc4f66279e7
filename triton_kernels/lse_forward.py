"""Forward primitive: per-row (max, sum-exp) of the margin logits over a class block.

Kernel plan (one launch + a tiny finalize):

    grid = row_tiles * splits programs, program id = split * row_tiles + row_tile
    program (row_tile, split):
        for each class tile t of its split (contiguous range of class tiles):
            acc[BM, BN]  = x_hat[rows, :] @ W[cols, :]^T      (K loop over D, fp32 acc)
            inv          = 1 / max(||W[cols]||, 1e-12)         (see NORMS_IN_LOOP below)
            z            = s * acc * inv;  z[i, y_i - offset] = target_logit_i   (in-tile)
            online max / sum-exp update of the row statistics
        write (m, l) partials of (split, rows)

    The tile's epilogue works in log2 units (z * log2(e), one ex2 a logit, common.exp2),
    masks padding columns only in the last class tile and substitutes the target logit
    only in tiles that hold a target of the row tile: ~1,007 SASS instructions a tile
    outside the K loop on the common path instead of ~2,060 (sm_90, bf16, 128x256
    tiles, 8 warps, Triton 3.6: the tile's MMAs take ~8,200 tensor-core cycles, this
    work ~2 x 1,007 issue cycles per scheduler, not overlapped with them at one program
    per SM). The K loop's loads are unmasked (common.load_tile): 78 instructions a step.
    finalize: M = max_split m, S = sum_split l * exp(m - M)     (no atomics, no locks)

The row tiles of one split are consecutive program ids, so they run together and walk
the same W tiles in the same order: each W tile comes from HBM once and its other
reads hit L2; x_hat (B x D, a few MB at most) stays in L2 throughout.

W's inverse row norms (kept for the backward) come either from the W tiles the K loop
already loads (NORMS_IN_LOOP: squared and summed in registers, stored by row tile 0) or
from a separate pass over W before the launch (_row_inv_norm_kernel). The in-loop form
saves that pass but, on Hopper, the register use makes Triton give W's shared-memory
ring one buffer too few under the asynchronous wgmma -- a race; configs.forward_config
picks the separate pass there (its comment and compile_check.ring_hazard have the
numbers).

All offsets are int64 (C_local * D and B * C_local may pass 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import autotune, configs
from .common import (LN2, LOG2E, block_target_cols, cast_for_dot, check_vectors, dot_dtype, dot_kind,
                     exp2, fast_exp2, forward_program_rows, load_tile)


@triton.jit
def _lse_partials_kernel(
    x_ptr, w_ptr, tlogit_ptr, labels_ptr,          # (B, D), (C, D), (B,) fp32, (B,) int
    pmax_ptr, psum_ptr, winv_ptr,                  # (splits, B) fp32 x2, (C,) fp32
    B, C, D, offset, s,
    stride_xb, stride_wc,
    tiles_per_split, num_row_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, NORMS_IN_LOOP: tl.constexpr,
    FAST_EXP2: tl.constexpr, EVEN_K: tl.constexpr,
):
    """NORMS_IN_LOOP: W's row norms from the tiles loaded for the GEMM (and stored by row
    tile 0); otherwise winv_ptr already holds them (``_row_inv_norm_kernel``) and the K
    loop is a plain GEMM.

    The running (m, l) are kept in log2 units: z2 = z * log2(e), l = sum 2^(z2 - m2)
    (= sum e^(z - m)); m is stored back in natural units."""
    pid_m, split, rows, row_ok, rows64 = forward_program_rows(B, num_row_tiles, BLOCK_M)
    # int32 (-1 when the target is in another block): the per-element compare in the
    # tile loop is int32.
    tcol = block_target_cols(labels_ptr, rows64, row_ok, offset, C)
    tlogit2 = tl.load(tlogit_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)

    n_tiles = tl.cdiv(C, BLOCK_N)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    # The GEMM's loads are unmasked in M and N (common.load_tile): padding rows read the
    # last row (their partials are not stored) and padding classes the last class (their
    # logits are -inf below, their norms not stored).
    x_row_ptr = x_ptr + tl.minimum(rows, B - 1).to(tl.int64)[:, None] * stride_xb
    # A plain loop nest (the K loop is software-pipelined, the tile loop is not). Tried on
    # an H200 (Triton 3.6): tl.range(..., flatten=True), which pipelines across tiles,
    # was 9% slower (2.23 vs 2.04 ms at B=512, C=2^20, D=512 bf16).
    for t in range(t_begin, t_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        # W^T tile (BLOCK_K, BLOCK_N) addressed directly (features fastest in memory), so
        # the load feeds tl.dot without a tl.trans and stays in the software pipeline.
        w_col_ptr = w_ptr + tl.minimum(cols, C - 1).to(tl.int64)[None, :] * stride_wc
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sq = tl.zeros([BLOCK_N], tl.float32)
        for k in range(0, D, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            xt = load_tile(x_row_ptr + ks[None, :], (ks < D)[None, :], not EVEN_K)
            wt = load_tile(w_col_ptr + ks[:, None], (ks < D)[:, None], not EVEN_K)
            if NORMS_IN_LOOP:
                # Row norms from the tile already loaded for the GEMM: no second pass over W.
                wf = wt.to(tl.float32)
                sq += tl.sum(wf * wf, axis=0)
            acc = tl.dot(cast_for_dot(xt, DOT_KIND), cast_for_dot(wt, DOT_KIND), acc,
                         input_precision=INPUT_PRECISION)
        if NORMS_IN_LOOP:
            inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
            # Every row tile computes the same norms; one writes them (no duplicate
            # stores). A branch, not the mask `col_ok & (pid_m == 0)`, which Triton 3.9's
            # interpreter refuses (common.py, "Masks").
            if pid_m == 0:
                tl.store(winv_ptr + cols64, inv, mask=col_ok)
        else:
            inv = tl.load(winv_ptr + cols64, mask=col_ok, other=0.0)
        # z2 = c * s * log2(e): one FMUL a logit. The margin's target logit is substituted
        # inside the tile (never s*c then a correction of the logsumexp: that cancels
        # badly as p_y -> 1). A row's target lies in one of the C / BLOCK_N tiles, and
        # only the last tile has padding columns: the per-logit selects run only in the
        # tiles that need them (one if/else, so that one (BM, BN) tile stays live).
        a = inv * (s * LOG2E)
        t_lo = t * BLOCK_N
        hit = (tcol >= t_lo) & (tcol < t_lo + BLOCK_N)
        if (tl.max(hit.to(tl.int32), axis=0) > 0) | (t_lo + BLOCK_N > C):
            z = tl.where(cols[None, :] == tcol[:, None], tlogit2[:, None], acc * a[None, :])
            z = tl.where(col_ok[None, :], z, float("-inf"))
        else:
            z = acc * a[None, :]
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # Each tile has >= 1 valid column, so m_new > -inf for any finite row and
        # 2^(m_i - m_new) is 0 on the first tile rather than NaN. NaN logits make
        # the sum NaN (2^NaN = NaN) whatever max does with them.
        l_i = l_i * exp2(m_i - m_new, FAST_EXP2) + tl.sum(exp2(z - m_new[:, None], FAST_EXP2), axis=1)
        m_i = m_new

    out = split.to(tl.int64) * B + rows64
    tl.store(pmax_ptr + out, m_i * LN2, mask=row_ok)
    tl.store(psum_ptr + out, l_i, mask=row_ok)


@triton.jit
def _row_inv_norm_kernel(w_ptr, winv_ptr, C, D, stride_wc,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """winv[j] = 1 / max(||W_j||, 1e-12) for BLOCK_C rows per program (fp32 sums)."""
    rows = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = rows < C
    rows64 = rows.to(tl.int64)
    sq = tl.zeros([BLOCK_C], tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        wt = tl.load(w_ptr + rows64[:, None] * stride_wc + ks[None, :],
                     mask=ok[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(wt * wt, axis=1)
    tl.store(winv_ptr + rows64, 1.0 / tl.maximum(tl.sqrt(sq), 1e-12), mask=ok)


@triton.jit
def _lse_finalize_kernel(pmax_ptr, psum_ptr, max_ptr, sum_ptr, B, num_splits,
                         BLOCK: tl.constexpr):
    """Merge (splits, B) partials into (B,) row max and row sum-exp (two passes)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    rows64 = rows.to(tl.int64)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for sp in range(0, num_splits):
        # Padding rows read 0 (not -inf) so that they never form -inf - -inf below.
        m = tl.load(pmax_ptr + sp * B + rows64, mask=ok, other=0.0)
        mx = tl.maximum(mx, m)
    sm = tl.zeros([BLOCK], tl.float32)
    for sp in range(0, num_splits):
        m = tl.load(pmax_ptr + sp * B + rows64, mask=ok, other=0.0)
        l = tl.load(psum_ptr + sp * B + rows64, mask=ok, other=0.0)
        sm += l * tl.exp(m - mx)
    tl.store(max_ptr + rows64, mx, mask=ok)
    tl.store(sum_ptr + rows64, sm, mask=ok)


def split_plan(B: int, C: int, cfg: configs.ForwardConfig) -> tuple[int, int, int]:
    """(row_tiles, splits, class tiles per split) of a forward launch."""
    row_tiles = triton.cdiv(B, cfg.tile.BLOCK_M)
    n_tiles = triton.cdiv(C, cfg.tile.BLOCK_N)
    splits = max(1, min(n_tiles, triton.cdiv(cfg.target_programs, row_tiles)))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)  # no empty split
    return row_tiles, splits, per


def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int, config: configs.ForwardConfig | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Contract primitive ``lse_partials`` (see expface_kernels/contract.py).

    Args:
        x_hat: (B, D) fp16/bf16/fp32, normalised embeddings.
        w: (C_local, D) fp16/bf16/fp32 raw centres of the block [offset, offset + C_local).
        target_logit: (B,) fp32, s * psi(c_iy).
        labels: (B,) int64 (int32 accepted) global labels, ignored rows -1.
        s: scale; offset: first class id of the block.
        config: optional launch config (tests); default from configs.forward_config.
    Returns:
        row_max (B,) fp32, row_sumexp (B,) fp32, w_inv_norm (C_local,) fp32.
    """
    B, D = x_hat.shape
    C = w.shape[0]
    dev = x_hat.device
    if w.dim() != 2 or w.shape[1] != D or w.device != dev:
        raise ValueError(f"w must be (C, {D}) on {dev}, got {tuple(w.shape)} on {w.device}")
    check_vectors(B, C, dev, target_logit=target_logit, labels=labels)
    f32 = torch.float32
    x_hat = x_hat.contiguous()
    w = w.contiguous()
    labels = labels.contiguous()
    target_logit = target_logit.to(f32).contiguous()
    row_max = torch.full((B,), float("-inf"), dtype=f32, device=dev)
    row_sum = torch.zeros((B,), dtype=f32, device=dev)
    w_inv = torch.empty((C,), dtype=f32, device=dev)
    if B == 0 or C == 0:
        return row_max, row_sum, w_inv
    if D == 0:
        raise ValueError("lse_partials needs D >= 1 features")
    dd = dot_dtype(x_hat.dtype, w.dtype)
    lb = max(x_hat.element_size(), w.element_size())
    if config is None and autotune.enabled(dev):
        config = autotune.pick(
            autotune.key("lse_partials", dev, B, C, D, x_hat.dtype, w.dtype),
            configs.forward_candidates(dev, B, C, D, dd, lb),
            lambda cfg: lse_partials(x_hat, w, target_logit, labels, s, offset, config=cfg))
    cfg = config or configs.forward_config(dev, B, C, D, dd, lb)
    row_tiles, splits, per = split_plan(B, C, cfg)
    fuse = configs.fp_fusion()  # explicit on every launch: Triton's default changes in 3.10
    pmax = torch.empty((splits, B), dtype=f32, device=dev)
    psum = torch.empty((splits, B), dtype=f32, device=dev)
    if not cfg.norms_in_loop:
        _row_inv_norm_kernel[(triton.cdiv(C, 32),)](w, w_inv, C, D, w.stride(0), BLOCK_C=32,
                                                    BLOCK_D=min(128, triton.next_power_of_2(D)),
                                                    num_warps=4, enable_fp_fusion=fuse)
    t = cfg.tile
    _lse_partials_kernel[(row_tiles * splits,)](
        x_hat, w, target_logit, labels, pmax, psum, w_inv,
        B, C, D, int(offset), float(s),
        x_hat.stride(0), w.stride(0),
        per, row_tiles,
        BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K,
        DOT_KIND=dot_kind(dd), INPUT_PRECISION=configs.dot_input_precision(dd, dev),
        NORMS_IN_LOOP=cfg.norms_in_loop, FAST_EXP2=fast_exp2(dev), EVEN_K=D % t.BLOCK_K == 0,
        num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=fuse,
    )
    if splits == 1:
        return pmax.view(B), psum.view(B), w_inv
    fin = 128 if B >= 128 else max(16, triton.next_power_of_2(B))
    _lse_finalize_kernel[(triton.cdiv(B, fin),)](pmax, psum, row_max, row_sum, B, splits,
                                                 BLOCK=fin, num_warps=4, enable_fp_fusion=fuse)
    return row_max, row_sum, w_inv

