"""Backward primitive: grad_x_hat and grad_W of a class block, 3 GEMMs per class chunk.

The classes are walked in chunks of ``chunk`` classes, sized so that the (chunk, B)
gradient-of-cosine block G^T fits a byte budget (configs.GradsConfig.chunk_bytes: the
one bounded block of logits DESIGN §4 allows -- never B x C). Per chunk, two launches:
``_grad_logits_kernel`` (1.), then ``_grad_wx_kernel`` running the tiles of 2. and 3.:

1. ``_grad_logits_kernel``  grid class tiles x row tiles, K over D (forward GEMM recomputed,
   transposed: S^T = W @ x_hat^T):
       c    = (x_hat @ W^T) * w_inv_norm
       G    = grad_row * s * exp(s*c - lse)     off target,  G[i, y_i] = target_grad_i
       G^T  -> gbuf (chunk, B), in the GEMM operand dtype (bf16/fp16/fp32), times
               w_inv_norm_j when SCALE_G (below)
       r_j  = sum_i G_ij * c_ij  -> rpart[row_tile, j]   (fp32; = w_hat_j . g_j, see 2.)
2. ``_grad_w_tile``         grid class tiles x feature tiles, K over B. Each program owns
   its grad_W rows (no atomics):
       g    = G^T @ x_hat
       grad_W_j = inv_j * (g_j - w_hat_j * r_j)     (inv_j < 1e12, else inv_j * g_j)
   The projection's w_hat_j . g_j = sum_i G_ij (w_hat_j . x_hat_i) = sum_i G_ij c_ij = r_j
   comes from step 1, so a program needs only its own feature columns of g_j.
3. ``_grad_x_tile``         grid feature tiles x row tiles x splits (split-K over the
   chunk's classes; B x D alone is too few tiles to fill the GPU), transposed:
       part[split]^T += (W * inv)^T[:, split's classes] @ G^T[split's classes, :]
   Each (split, row tile, feature tile) slot is owned by one program; chunks are
   sequential launches, so the read-add-write needs no atomics. After the last chunk
   grad_x_hat = part.sum(0).

SCALE_G (bf16 and fp32 operands; configs.GradsConfig.scale_g): gbuf holds G_ij * inv_j,
so dX is the product of the raw W tile with the buffer, and grad_W_j = g'_j - w_hat_j *
(inv_j * r_j) with g' = (G * inv)^T @ x_hat. The W tile then reaches the tensor cores as
loaded -- for a 16-bit W straight from shared memory -- instead of being scaled in
registers first: the dX loop went from 283 to 162 SASS instructions per 64-class step
(sm_90, bf16, 128x128 tiles, 8 warps, Triton 3.8; 306 -> 156 with 3.6; an issue ratio
of ~1.1 -> ~0.6 in compile_check).
fp16 keeps unscaled G: G_ij * inv_j could pass fp16's 65504 (s * grad_row up to 64 with
inverse norms up to 1e12).

Why G is stored transposed: with G^T in a (chunk, B) buffer the A operands of the G and
dW GEMMs are K-major in memory, which Triton (3.6-3.8) software-pipelines with cp.async
(compile_check counts the copies); dX reads W and G^T transposed from shared memory
(wgmma's transpose bits for 16-bit operands).

The epilogue works in log2 units (common.exp2): p = 2^(acc * inv*s*log2(e) - lse*log2(e)),
one FFMA and one ex2 a logit; the target column is substituted only in the class tiles
that hold a target of the tile's rows.

4 GEMM-equivalents in all (forward, recompute, dW, dX). Extra memory: gbuf (budget) +
rpart (row_tiles x chunk fp32) + part (splits x B x D fp32, capped) -- O(B*D + chunk*B).
All offsets int64. A GEMM operand is masked only where a launch can be ragged (a short
last K step; the contiguous dimension of the dW/dX tiles unless every dimension is
full); its strided dimension is clamped into range instead (common.load_tile). Every
edge tile's store is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import autotune, configs
from .common import (LOG2E, block_targets, cast_for_dot, check_vectors, dot_dtype, dot_kind,
                     exp2, fast_exp2, load_tile)


@triton.jit
def _grad_logits_kernel(
    x_ptr, w_ptr, winv_ptr, tcol_ptr, lse2_ptr, tgrad_ptr, gs_ptr,
    g_ptr, rpart_ptr,
    B, D, c0, cn, s,
    stride_xb, stride_wc, stride_gc, stride_rp,
    num_row_tiles,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_G: tl.constexpr,
    FAST_EXP2: tl.constexpr, EVEN_K: tl.constexpr,
):
    """G^T tiles: classes [pid_c*BC, +BC) x rows [pid_b*BB, +BB) of the chunk c0..c0+cn,
    one program per tile."""
    pid = tl.program_id(0)
    pid_b = pid % num_row_tiles  # row tiles of one class tile adjacent: W tile read once
    pid_c = pid // num_row_tiles
    lcols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # class inside the chunk
    col_ok = lcols < cn
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B

    # The GEMM's loads are unmasked in M and N: padding classes / rows read the last
    # valid one (clamped), and their results are never stored (see the epilogue), so
    # only a ragged K step needs a mask -- none when D % BLOCK_K == 0 (EVEN_K).
    acc = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)   # S^T = W @ x_hat^T
    w_row_ptr = w_ptr + (tl.minimum(lcols, cn - 1).to(tl.int64) + c0)[:, None] * stride_wc
    x_col_ptr = x_ptr + tl.minimum(rows, B - 1).to(tl.int64)[None, :] * stride_xb
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        wt = load_tile(w_row_ptr + ks[None, :], (ks < D)[None, :], not EVEN_K)
        xt = load_tile(x_col_ptr + ks[:, None], (ks < D)[:, None], not EVEN_K)
        acc = tl.dot(cast_for_dot(wt, DOT_KIND), cast_for_dot(xt, DOT_KIND), acc,
                     input_precision=INPUT_PRECISION)

    inv = tl.load(winv_ptr + lcols.to(tl.int64) + c0, mask=col_ok, other=0.0).to(tl.float32)
    # Per-row operands as the host prepared them (grads: one op each per call, not per
    # tile), padded to whole row tiles so that the loads need no mask: the target column
    # inside the block (int32 where C < 2^31; -1: ignored, another block, padding),
    # lse * log2(e) (padding +inf), grad_row * s and target_grad (padding 0). In this
    # (classes x rows) tile each thread holds 32 of the 128 rows, so each per-row
    # multiply, int64 compare or masked load done here would cost 32 instructions a
    # thread a tile. Padding rows get p = 2^-inf = 0 and gs = 0: their G and their share
    # of r are 0 although their (clamped) logits are real ones.
    tcol = tl.load(tcol_ptr + rows)
    lse2 = tl.load(lse2_ptr + rows)
    gs = tl.load(gs_ptr + rows)
    tgrad = tl.load(tgrad_ptr + rows)

    # fp32 all the way: p = exp(s*c - lse) = 2^(acc * inv*s*log2(e) - lse*log2(e)) <= 1
    # (one FFMA and one ex2 a logit), G = grad_row * s * p. Padding columns (inv 0) are
    # never stored, and r is summed per column.
    g = gs[None, :] * exp2(acc * (inv * (s * LOG2E))[:, None] - lse2[None, :], FAST_EXP2)
    # Target column: (p - 1) * factor * grad_row, formed by the caller before any rounding.
    # A row's target lies in one class tile: the per-logit compare only in tiles that
    # hold a target of these rows.
    c_lo = pid_c * BLOCK_C
    b_lo = c0 + c_lo  # the tile's first class inside the block
    hit = (tcol >= b_lo) & (tcol < b_lo + BLOCK_C)
    if tl.max(hit.to(tl.int32), axis=0) > 0:
        g = tl.where((b_lo + tl.arange(0, BLOCK_C))[:, None] == tcol[None, :], tgrad[None, :], g)
    # SCALE_G: the buffer holds G_ij * inv_j (see the module docstring), rounded once.
    g_out = (g * inv[:, None] if SCALE_G else g).to(g_ptr.dtype.element_ty)
    # int64 tile base + int32 in-tile offsets (BLOCK_C * B < 2^31): cheaper addresses.
    g_tile = g_ptr + c_lo.to(tl.int64) * stride_gc
    g_ptrs = g_tile + tl.arange(0, BLOCK_C)[:, None] * stride_gc + rows[None, :]
    if (c_lo + BLOCK_C <= cn) & (pid_b * BLOCK_B + BLOCK_B <= B):
        tl.store(g_ptrs, g_out)  # interior tile: no per-element mask
    else:
        tl.store(g_ptrs, g_out, mask=col_ok[:, None] & row_ok[None, :])
    # r_j partial over this row tile: sum_i G_ij c_ij = inv_j * sum_i G_ij acc_ij (the
    # radial part of g_j; unscaled G).
    r = tl.sum(g * acc, axis=1) * inv
    tl.store(rpart_ptr + pid_b.to(tl.int64) * stride_rp + lcols, r, mask=col_ok)


@triton.jit
def _grad_w_tile(
    pid,
    g_ptr, x_ptr, w_ptr, winv_ptr, rpart_ptr, gw_ptr,
    B, D, c0, cn,
    stride_gc, stride_xb, stride_wc, stride_gwc, stride_rp,
    num_rpart, num_feat_tiles,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_G: tl.constexpr,
    RPART_BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    """grad_W for chunk classes [pid_c*BC, +BC) x features [pid_d*BD, +BD); K over B.
    RPART_BLOCK: a power of two >= num_rpart (the G kernel's row tiles). EVEN: B and D
    are multiples of BLOCK_K and BLOCK_D (the GEMM's loads need no mask; the chunk's
    classes past cn are clamped)."""
    pid_d = pid % num_feat_tiles
    pid_c = pid // num_feat_tiles
    lcols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = lcols < cn
    lcols64 = lcols.to(tl.int64)
    cols64 = lcols64 + c0
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = feats < D

    # The projection's operands are loaded before the K loop, so that their latency (W's
    # tile from L2 or HBM, the r partials of every G row tile in one 2-D load) overlaps
    # the MMAs instead of stalling the epilogue.
    parts = tl.arange(0, RPART_BLOCK)
    r = tl.sum(tl.load(rpart_ptr + parts[:, None] * stride_rp + lcols[None, :],
                       mask=(parts < num_rpart)[:, None] & col_ok[None, :], other=0.0), axis=0)
    inv = tl.load(winv_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)
    ok2 = col_ok[:, None] & f_ok[None, :]
    wt = tl.load(w_ptr + cols64[:, None] * stride_wc + feats[None, :], mask=ok2, other=0.0)
    # grad_W_j = inv_j * (g_j - w_hat_j * r_j) = inv_j * g_j - W_j * (r_j * inv_j^2); no
    # radial projection where the norm was clamped (F.normalize's backward).
    q = tl.where(inv < 1e12, r * inv * inv, 0.0)

    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    g_row_ptr = g_ptr + tl.minimum(lcols, cn - 1).to(tl.int64)[:, None] * stride_gc
    for k in range(0, B, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < B
        gt = load_tile(g_row_ptr + ks[None, :], k_ok[None, :], not EVEN)
        xt = load_tile(x_ptr + ks.to(tl.int64)[:, None] * stride_xb + feats[None, :],
                       k_ok[:, None] & f_ok[None, :], not EVEN)
        acc = tl.dot(cast_for_dot(gt, DOT_KIND), cast_for_dot(xt, DOT_KIND), acc,
                     input_precision=INPUT_PRECISION)

    if SCALE_G:
        out = acc - wt.to(tl.float32) * q[:, None]  # acc = inv_j * g_j already
    else:
        out = acc * inv[:, None] - wt.to(tl.float32) * q[:, None]
    tl.store(gw_ptr + cols64[:, None] * stride_gwc + feats[None, :],
             out.to(gw_ptr.dtype.element_ty), mask=ok2)


@triton.jit
def _grad_x_tile(
    pid,
    g_ptr, w_ptr, winv_ptr, part_ptr,
    B, D, c0, cn,
    stride_gc, stride_wc, stride_ps, stride_pb,
    k_per_split, num_feat_tiles, num_row_tiles,
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_G: tl.constexpr,
    EVEN: tl.constexpr,
):
    """part[split, rows, feats]^T += W_hat^T[feats, split's classes] @ G^T[split's classes, rows]
    (SCALE_G: W^T @ (G * inv)^T, the same product with W's scale carried by the buffer).
    EVEN: the chunk's class count, D and B are multiples of BLOCK_K, BLOCK_D and BLOCK_B
    (the GEMM's loads need no mask)."""
    pid_d = pid % num_feat_tiles
    rest = pid // num_feat_tiles
    pid_b = rest % num_row_tiles
    split = rest // num_row_tiles
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = feats < D
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)

    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, cn)
    acc = tl.zeros([BLOCK_D, BLOCK_B], tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        lks64 = ks.to(tl.int64)
        cols64 = lks64 + c0
        wt = load_tile(w_ptr + cols64[None, :] * stride_wc + feats[:, None],
                       f_ok[:, None] & k_ok[None, :], not EVEN)
        gt = load_tile(g_ptr + lks64[:, None] * stride_gc + rows64[None, :],
                       k_ok[:, None] & row_ok[None, :], not EVEN)
        if SCALE_G:
            # W's tile goes to the tensor cores as loaded (16-bit W: straight from shared
            # memory, no pass through registers).
            a = cast_for_dot(wt, DOT_KIND)
        else:
            # Normalise W in fp32 before the cast: w_hat has |entries| <= 1, safe in fp16.
            inv = load_tile(winv_ptr + cols64, k_ok, not EVEN).to(tl.float32)
            a = cast_for_dot(wt.to(tl.float32) * inv[None, :], DOT_KIND)
        acc = tl.dot(a, cast_for_dot(gt, DOT_KIND), acc, input_precision=INPUT_PRECISION)

    ok2 = f_ok[:, None] & row_ok[None, :]
    p = part_ptr + split.to(tl.int64) * stride_ps + rows64[None, :] * stride_pb + feats[:, None]
    prev = tl.load(p, mask=ok2, other=0.0)
    tl.store(p, prev + acc, mask=ok2)


@triton.jit
def _grad_wx_kernel(
    g_ptr, x_ptr, w_ptr, winv_ptr, rpart_ptr, gw_ptr, part_ptr,
    B, D, c0, cn,
    stride_gc, stride_xb, stride_wc, stride_gwc, stride_rp, stride_ps, stride_pb,
    num_rpart, dw_feat_tiles, k_per_split, dx_feat_tiles, dx_row_tiles, num_dx_programs,
    DW_C: tl.constexpr, DW_D: tl.constexpr, DW_K: tl.constexpr,
    DX_D: tl.constexpr, DX_B: tl.constexpr, DX_K: tl.constexpr,
    DOT_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALE_G: tl.constexpr,
    RPART_BLOCK: tl.constexpr, DW_EVEN: tl.constexpr, DX_EVEN: tl.constexpr,
):
    """One launch for the two GEMMs that read a chunk's G^T: programs [0, num_dx_programs)
    do grad_x split-K tiles (the longer ones, first), the rest grad_W tiles. They are
    independent given G^T, so one launch instead of two halves the host launch overhead
    per chunk and lets the two kinds of tiles share the GPU without a tail in between."""
    pid = tl.program_id(0)
    if pid < num_dx_programs:
        _grad_x_tile(pid, g_ptr, w_ptr, winv_ptr, part_ptr, B, D, c0, cn,
                     stride_gc, stride_wc, stride_ps, stride_pb,
                     k_per_split, dx_feat_tiles, dx_row_tiles,
                     DX_D, DX_B, DX_K, DOT_KIND, INPUT_PRECISION, SCALE_G, DX_EVEN)
    else:
        _grad_w_tile(pid - num_dx_programs, g_ptr, x_ptr, w_ptr, winv_ptr, rpart_ptr, gw_ptr,
                     B, D, c0, cn, stride_gc, stride_xb, stride_wc, stride_gwc, stride_rp,
                     num_rpart, dw_feat_tiles,
                     DW_C, DW_D, DW_K, DOT_KIND, INPUT_PRECISION, SCALE_G, RPART_BLOCK, DW_EVEN)


def scales_g(cfg: configs.GradsConfig, dot_dtype: torch.dtype) -> bool:
    """The SCALE_G constexpr: G * inv_j in the buffer where the config asks for it and its
    range is safe -- in fp16 (max 65504) G_ij up to s * grad_row_i times an inverse norm
    up to 1e12 would overflow."""
    return cfg.scale_g and dot_dtype != torch.float16


def chunk_plan(B: int, C: int, D: int, g_elem: int, cfg: configs.GradsConfig
               ) -> tuple[int, int, int]:
    """(classes per chunk, grad_x splits, classes per split) of a backward.

    The chunk is a multiple of every class-tile size (so tiles never straddle chunks)
    and holds at least one tile; the split count is capped by the partial-buffer budget.
    """
    step = max(cfg.g_tile.BLOCK_M, cfg.dw_tile.BLOCK_M, cfg.dx_tile.BLOCK_K)  # powers of 2
    chunk = max(step, (cfg.chunk_bytes // max(1, B * g_elem)) // step * step)
    chunk = min(chunk, triton.cdiv(C, step) * step)
    out_tiles = triton.cdiv(D, cfg.dx_tile.BLOCK_M) * triton.cdiv(B, cfg.dx_tile.BLOCK_N)
    k_tiles = triton.cdiv(min(chunk, C), cfg.dx_tile.BLOCK_K)
    splits = max(1, min(k_tiles, triton.cdiv(cfg.target_programs, out_tiles),
                        cfg.max_dx_partial_bytes // max(1, B * D * 4)))
    per = triton.cdiv(k_tiles, splits) * cfg.dx_tile.BLOCK_K
    splits = triton.cdiv(min(chunk, C), per)
    return chunk, splits, per


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int,
          config: configs.GradsConfig | None = None) -> tuple[Tensor, Tensor]:
    """Contract primitive ``grads`` (see expface_kernels/contract.py).

    Args:
        x_hat: (B, D) fp16/bf16/fp32 normalised embeddings.
        w: (C_local, D) fp16/bf16/fp32 raw centres of the block.
        w_inv_norm: (C_local,) fp32 from lse_partials.
        labels: (B,) int64/int32 global labels (ignored rows -1).
        lse: (B,) fp32 final logsumexp over all classes.
        target_grad: (B,) fp32 dL/dc at the target column (0 on ignored rows).
        grad_row: (B,) fp32 dL/dloss_i (or a 1-element tensor, broadcast).
        s: scale; offset: first class id of the block.
        config: optional launch config (tests); default from configs.grads_config.
    Returns:
        grad_x_hat (B, D) fp32 (this block's contribution), grad_w (C_local, D) w.dtype.
    """
    B, D = x_hat.shape
    C = w.shape[0]
    dev = x_hat.device
    if w.dim() != 2 or w.shape[1] != D or w.device != dev:
        raise ValueError(f"w must be (C, {D}) on {dev}, got {tuple(w.shape)} on {w.device}")
    check_vectors(B, C, dev, w_inv_norm_c=w_inv_norm, labels=labels, lse=lse,
                  target_grad=target_grad, grad_row=grad_row)
    f32 = torch.float32
    x_hat = x_hat.contiguous()
    w = w.contiguous()
    labels = labels.contiguous()
    w_inv_norm = w_inv_norm.to(f32).contiguous()
    lse = lse.to(f32).contiguous()
    target_grad = target_grad.to(f32).reshape(-1).expand(B).contiguous()
    grad_row = grad_row.to(f32).reshape(-1).expand(B).contiguous()
    grad_w = torch.empty_like(w)
    if B == 0 or C == 0 or D == 0:
        return torch.zeros((B, D), dtype=f32, device=dev), grad_w.zero_()

    dd = dot_dtype(x_hat.dtype, w.dtype)
    kind = dot_kind(dd)
    prec = configs.dot_input_precision(dd, dev)
    lb = max(x_hat.element_size(), w.element_size())
    if config is None and autotune.enabled(dev):
        config = autotune.pick(
            autotune.key("grads", dev, B, C, D, x_hat.dtype, w.dtype),
            configs.grads_candidates(dev, B, C, D, dd, lb),
            lambda cfg: grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset,
                              config=cfg))
    cfg = config or configs.grads_config(dev, B, C, D, dd, lb)
    g_elem = torch.empty((), dtype=dd).element_size()
    scale_g = scales_g(cfg, dd)
    fuse = configs.fp_fusion()  # explicit on every launch: Triton's default changes in 3.10
    chunk, splits, per = chunk_plan(B, C, D, g_elem, cfg)
    chunk = min(chunk, C)

    tg, tw, tx = cfg.g_tile, cfg.dw_tile, cfg.dx_tile
    g_rows = triton.cdiv(B, tg.BLOCK_N)
    # The G kernel's per-row operands, once per call, padded to whole row tiles (see
    # _grad_logits_kernel).
    pad = g_rows * tg.BLOCK_N - B
    tcol = F.pad(block_targets(labels, offset, C), (0, pad), value=-1)
    lse2 = F.pad(lse * LOG2E.value, (0, pad), value=float("inf"))
    gs = F.pad(grad_row * float(s), (0, pad), value=0.0)
    tgrad = F.pad(target_grad, (0, pad), value=0.0)
    gbuf = torch.empty((chunk, B), dtype=dd, device=dev)         # G^T of one chunk
    rpart = torch.empty((g_rows, chunk), dtype=f32, device=dev)  # r_j partials per row tile
    part = torch.zeros((splits, B, D), dtype=f32, device=dev)    # grad_x split-K partials
    dw_feat = triton.cdiv(D, tw.BLOCK_N)
    dx_feat = triton.cdiv(D, tx.BLOCK_M)
    dx_rows = triton.cdiv(B, tx.BLOCK_N)
    for c0 in range(0, C, chunk):
        cn = min(chunk, C - c0)
        g_tiles = triton.cdiv(cn, tg.BLOCK_M) * g_rows
        _grad_logits_kernel[(g_tiles,)](
            x_hat, w, w_inv_norm, tcol, lse2, tgrad, gs, gbuf, rpart,
            B, D, c0, cn, float(s),
            x_hat.stride(0), w.stride(0), gbuf.stride(0), rpart.stride(0),
            g_rows,
            BLOCK_C=tg.BLOCK_M, BLOCK_B=tg.BLOCK_N, BLOCK_K=tg.BLOCK_K,
            DOT_KIND=kind, INPUT_PRECISION=prec, SCALE_G=scale_g,
            FAST_EXP2=fast_exp2(dev), EVEN_K=D % tg.BLOCK_K == 0,
            num_warps=tg.num_warps, num_stages=tg.num_stages, enable_fp_fusion=fuse,
        )
        n_dx = dx_feat * dx_rows * triton.cdiv(cn, per)
        n_dw = triton.cdiv(cn, tw.BLOCK_M) * dw_feat
        _grad_wx_kernel[(n_dx + n_dw,)](
            gbuf, x_hat, w, w_inv_norm, rpart, grad_w, part,
            B, D, c0, cn,
            gbuf.stride(0), x_hat.stride(0), w.stride(0), grad_w.stride(0), rpart.stride(0),
            part.stride(0), part.stride(1),
            g_rows, dw_feat, per, dx_feat, dx_rows, n_dx,
            DW_C=tw.BLOCK_M, DW_D=tw.BLOCK_N, DW_K=tw.BLOCK_K,
            DX_D=tx.BLOCK_M, DX_B=tx.BLOCK_N, DX_K=tx.BLOCK_K,
            DOT_KIND=kind, INPUT_PRECISION=prec, SCALE_G=scale_g,
            RPART_BLOCK=triton.next_power_of_2(g_rows),
            DW_EVEN=(B % tw.BLOCK_K == 0) and (D % tw.BLOCK_N == 0),
            DX_EVEN=(cn % tx.BLOCK_K == 0) and (D % tx.BLOCK_M == 0) and (B % tx.BLOCK_N == 0),
            # one config for both tile kinds: the larger warp count, the smaller stage count
            num_warps=max(tw.num_warps, tx.num_warps), num_stages=min(tw.num_stages, tx.num_stages),
            enable_fp_fusion=fuse,
        )
    grad_x = part.view(B, D) if splits == 1 else part.sum(0)
    return grad_x, grad_w
