"""Launch configurations of the Triton kernels, keyed on device, shape and dtype.

By default no autotuning happens at run time: every launch takes the static heuristic
below, so the first call is not a multi-second tuning sweep and the result is
deterministic (the same config for the same (device, B, C, D, dtype), hence the same
rounding). ``EXPFACE_TRITON_AUTOTUNE=1`` times the candidates at the end of this file
on the first call of each shape bucket instead (autotune.py).
Set ``EXPFACE_TRITON_G_BUDGET_MB`` to change the backward's logits-block budget.
``EXPFACE_TRITON_FP_FUSION=0`` compiles the kernels without FMA contraction (fp_fusion()).

Device kinds
    ``interpreter``  TRITON_INTERPRET=1 (CPU): exact fp32, numpy per program. Few,
                     large programs are fastest; tiles stay small only because the test
                     shapes are small (the tile is padded to a power of two).
    ``hopper``       sm_90 (H100/H200): 228 KB shared memory per SM, 132 SMs, wgmma.
    ``ampere``       sm_80 (A100): 164 KB shared memory per SM, 108 SMs, mma.sync.
    ``consumer``     sm_86/sm_89 (RTX 30xx/40xx, L4, A10): ~100 KB shared memory per SM.
    ``blackwell``    sm_100+: treated like Hopper (same tile shapes are legal; the
                     Triton backend picks the instructions).
    ``other``        anything older: the consumer tiles (fit 64 KB + of shared memory).

Shared-memory arithmetic used below (one GEMM stage = an A tile and a B tile):
    stage bytes = (BM*BK + BN*BK) * elem;  128x128x64 bf16: 32 KB per stage.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


def interpreter_active() -> bool:
    """True when Triton was asked to run kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FP_FUSION_ENV = "EXPFACE_TRITON_FP_FUSION"


def fp_fusion() -> bool:
    """The ``enable_fp_fusion`` every launch passes: True unless EXPFACE_TRITON_FP_FUSION is
    "0" or empty (read at each launch, so that one process can time both settings).

    With it on, LLVM and ptxas may contract an fp32 multiply and the add that uses it into
    one FMA. Triton's own default is on up to 3.9 and off from 3.10; passing it on every
    launch keeps the kernels' rounding and instructions what was measured. On, because
    (triton_kernels/README.md, "FP fusion"; compile_check --fp-fusion on off, sm_90 and
    sm_80, Triton 3.6 and 3.9): the G kernel's per-logit exponent ``acc * a - lse2`` and
    the dW projection become FMAs -- 6-10% fewer SASS instructions in the G kernel, ~3% in
    the dW/dX kernel, epilogues bound by instruction issue -- and so does the in-loop
    sum of W's squares (the forward's K loop on sm_80 and for fp16/fp32 on sm_90: 131 vs
    145 instructions a step); and the fused exponent is rounded once, after the
    subtraction, over 10x closer to float64 for the probabilities that carry the gradient
    at s = 64 (fp_fusion.exponent_rounding). The forward's epilogue is the same either way
    (``z = acc * a`` also feeds the row max: a product with two uses is not contracted)."""
    return os.environ.get(FP_FUSION_ENV, "1") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class GemmTile:
    """One kernel's tile: BLOCK_M x BLOCK_N output, BLOCK_K reduction step."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ForwardConfig:
    """``lse_partials``: tile (rows x classes x features) and the number of class splits.

    ``target_programs``: how many programs the grid should have; the class range is cut
    into ``splits = ceil(target_programs / row_tiles)`` contiguous splits (at most one
    per class tile). Each program walks its split's class tiles in order, so the
    programs of one split (consecutive program ids, the row tiles) read the same W tile
    at about the same time: W comes from HBM once, its re-reads hit L2.

    ``norms_in_loop``: W's row norms from the GEMM's own W tiles (True), or from a
    separate pass over W before the GEMM (False: one more read of W -- the extension's
    equivalent pass took 0.28 ms at C = 2^20, D = 512 bf16 on an H200 -- and a K loop
    that is a plain GEMM; on Hopper the in-loop form races, see forward_config).

    """

    tile: GemmTile
    target_programs: int
    norms_in_loop: bool = True


@dataclass(frozen=True)
class GradsConfig:
    """``grads``: three kernels per class chunk (GemmTile's M x N output, K reduction).

    g_tile:  G^T = f(W @ x_hat^T): M = classes, N = rows, K over D (the forward's GEMM).
    dw_tile: grad_W chunk = G^T @ x_hat: M = classes, N = features, K over B.
    dx_tile: grad_x^T += W_hat^T @ G^T: M = features, N = rows, K over the chunk's classes.
    chunk_bytes: budget of the (B, chunk) G buffer -- the one bounded block of logits.
    target_programs: grid size the dx kernel's split-K aims at (its output B x D is
        small: without splitting the classes it would occupy a handful of SMs).
    max_dx_partial_bytes: cap of the (splits, B, D) fp32 grad_x partial buffers.
    scale_g: the G buffer holds G_ij / ||W_j|| (bf16 and fp32 operands; fp16 keeps G for
        its range), so that the dX GEMM multiplies raw W tiles -- for a 16-bit W straight
        from shared memory -- instead of normalising each W tile in registers first
        (grads_backward's docstring has the instruction counts).
    """

    g_tile: GemmTile
    dw_tile: GemmTile
    dx_tile: GemmTile
    chunk_bytes: int
    target_programs: int
    max_dx_partial_bytes: int
    scale_g: bool = True


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[str, int, int]:
    """(kind, SM count, L2 bytes) of a CUDA device."""
    p = torch.cuda.get_device_properties(index)
    major = p.major
    if major == 9:
        kind = "hopper"
    elif major >= 10:
        kind = "blackwell"
    elif (p.major, p.minor) == (8, 0):
        kind = "ampere"
    elif major == 8:
        kind = "consumer"
    else:
        kind = "other"
    return kind, int(p.multi_processor_count), int(getattr(p, "L2_cache_size", 40 << 20))


def device_kind(device: torch.device) -> tuple[str, int, int]:
    """(kind, SM count, L2 bytes) for ``device`` under the current Triton mode."""
    if interpreter_active() or device.type != "cuda":
        # The interpreter runs programs one after the other: the "SM count" only sets how
        # many splits the tests exercise (2+ so the finalize merge is always tested).
        return "interpreter", 2, 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _device_facts(idx)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_config(device: torch.device, B: int, C: int, D: int,
                   dot_dtype: torch.dtype, load_bytes: int = 0) -> ForwardConfig:
    """Config of ``_lse_partials_kernel`` for x_hat (B, D) against W (C, D).

    ``load_bytes``: the largest element size among the loaded operands (4 for the fp32 W
    of fp16-x/fp32-W, whose tiles sit in shared memory as fp32 before the cast);
    default: the dot dtype's.
    """
    kind, sms, _ = device_kind(device)
    if kind == "interpreter":
        # One row tile covers the test batches (<= 32 rows); 32 classes per tile makes
        # C=130 span 5 tiles (a ragged last one) and 2 splits, so the online update,
        # the masking and the merge all run. BLOCK_K=16 makes D=33 take 3 steps.
        bm = min(32, max(16, _next_pow2(B)))
        return ForwardConfig(GemmTile(bm, 32, 16, 4, 1), target_programs=2)
    # 16-bit operands in shared memory: K step 64; any fp32 operand (tf32, or the fp32 W
    # of a mixed pair): K step 32, so that a 128x128 stage stays <= 32 KB (compiled for
    # sm_90 with the bundled ptxas: K step 64 with an fp32 W takes 128 KB and spills).
    half = max(_elem(dot_dtype), load_bytes) == 2
    # Exact fp32 (torch's default allow_tf32=False): tl.dot runs on FMA units, whose
    # operand fragments live in registers -- K step 16 for 128x128 tiles (K step 32
    # spilled on sm_80/sm_90 in compile_check). At K step 16 the forward is
    # spill-free; the G and dW/dX kernels still spill 4-44 bytes (sm_80/sm_90, Triton
    # 3.6 and 3.8, B = 512, 2026-12-02; 4-128, the forward included, before the loads
    # lost their M/N masks).
    # Exact fp32 runs on FMA units at a small fraction of the tensor-core rate anyway.
    fma = dot_dtype == torch.float32 and dot_input_precision(dot_dtype, device) == "ieee"
    # Rows: the batch is small (<= a few thousand); 128-row tiles for B >= 128 are the
    # wgmma/mma sweet spot; smaller batches get a smaller M (>= 16, tl.dot's minimum) so
    # that padding rows do not waste most of the tensor-core work.
    bm = 128 if B >= 128 else max(16, _next_pow2(B))
    norms_in_loop = True
    if kind in ("hopper", "blackwell"):
        # The W row norms. Squaring the W tile in the K loop gives it a register use, and
        # then Triton 3.6-3.8 keeps one buffer too few in its shared-memory ring while an
        # asynchronous wgmma reads it: a race (compile_check.ring_hazard has the
        # details). Seen on an H200: the loss error of the same kernel and inputs moved
        # between runs (7.6e-6, 8.9e-6, 1.1e-5 at B=512, C=2^20, D=512, bf16), one
        # low-precision gradient test failed once, and with 256-wide tiles (longer
        # wgmmas) the loss was wrong at 3.2e-4 and grad_x off by 5-18%. Wherever the
        # wgmma runs asynchronously from shared memory (16-bit operands, tf32), the
        # norms therefore come from a separate pass over W (_row_inv_norm_kernel) and
        # the K loop is a plain GEMM (3-deep rings, no race in compile_check). The fp32
        # W of a mixed pair is cast in registers first, its wgmma waits each step, and
        # exact fp32 runs on FMA units: no race there, the norms stay in the loop.
        async_wgmma = half or (dot_dtype == torch.float32 and not fma)  # 16-bit or tf32
        norms_in_loop = not async_wgmma
        # 16-bit operands: 128x256 class tiles (wgmma m64n256 x 2 warpgroups = 8 warps),
        # K step 64, 3 stages: 144 KB of shared memory, 212 registers, no spills
        # (compile_check). Measured on an H200 (Triton 3.6, B=512, C=2^20, D=512, bf16,
        # `python -m bench.run profile --parts variants`, the norm pass included): 1.67 ms, against 2.93
        # ms for 128x128 with the norm pass and 2.04 / 1.80 ms for the racy in-loop
        # 128x128 / 128x256. One 8-warp program per SM (registers), ~2 waves of long
        # programs (thousands of class tiles each at C = 2^20). Other dtypes keep the
        # 128x128 tile: K step 32 for any fp32 operand, 16 for exact-fp32 FMA.
        if half:
            tile = GemmTile(bm, 256, 64, 8, 3)
        else:
            tile = GemmTile(bm, 128, 16 if fma else 32, 8, 3)
    elif kind == "ampere":
        # A100: mma.sync m16n8k16; 128x128 tile, K step 32, 4 stages = 48-96 KB of the
        # 164 KB; ~230-250 registers at 8 warps (no spills): one program per SM.
        tile = GemmTile(bm, 128, 16 if fma else 32, 8 if bm >= 128 else 4, 4)
    else:
        # ~100 KB smem and 64K registers (sm_86/89): 64-class tiles, 3 stages of
        # 128x64x32 bf16 = 24 KB; exact fp32 needs 8 warps to stay spill-free.
        tile = GemmTile(bm, 64, 16 if fma else 32, 8 if fma else 4, 3)
    # Two resident programs' worth per SM on every kind; the class splits are long
    # (thousands of tiles at C = 2^20) so the tail of the last wave is short.
    return ForwardConfig(tile, target_programs=2 * sms, norms_in_loop=norms_in_loop)


def grads_config(device: torch.device, B: int, C: int, D: int,
                 dot_dtype: torch.dtype, load_bytes: int = 0) -> GradsConfig:
    """Config of the three backward kernels."""
    kind, sms, l2 = device_kind(device)
    env_mb = os.environ.get("EXPFACE_TRITON_G_BUDGET_MB")
    if kind == "interpreter":
        # Tiny chunk budget so the tests' C=130 runs several chunks (the chunk loop, the
        # grad_x partial accumulation across launches and the ragged last chunk).
        bm = min(32, max(16, _next_pow2(B)))
        budget = int(float(env_mb) * (1 << 20)) if env_mb else 64 * bm * 4
        return GradsConfig(GemmTile(32, bm, 16, 4, 1), GemmTile(32, 16, 16, 4, 1),
                           GemmTile(16, bm, 16, 4, 1), chunk_bytes=budget, target_programs=4,
                           max_dx_partial_bytes=1 << 20)
    half = max(_elem(dot_dtype), load_bytes) == 2
    fma = dot_dtype == torch.float32 and dot_input_precision(dot_dtype, device) == "ieee"
    bm = 128 if B >= 128 else max(16, _next_pow2(B))
    fwd = forward_config(device, B, C, D, dot_dtype, load_bytes).tile
    # The G kernel is the forward's GEMM transposed (classes x rows) with a cheaper
    # epilogue (no norms): the forward's tile with M and N swapped, at most 128 classes
    # (it writes a (classes, rows) G tile and keeps more per-element state than the
    # forward: 225 registers at 128x128 on sm_90 in compile_check; the 2.24 ms it took
    # per step on an H200 were measured with 128 classes).
    g = GemmTile(min(fwd.BLOCK_N, 128), fwd.BLOCK_M, fwd.BLOCK_K, fwd.num_warps, fwd.num_stages)
    if kind == "hopper" and half and g.num_stages == 3:
        # 4 stages (128 KB of shared memory at 128x128x64): the backward 5.37 / 5.43 ms
        # against 5.49 / 5.56 ms with the forward's 3, in two runs on fresh H200
        # machines (B = 512, C = 2^20, D = 512, bf16, gpu_profile --parts variants,
        # 2026-12-04); the same config's two runs differed by 0.06-0.07 ms.
        g = GemmTile(g.BLOCK_M, g.BLOCK_N, g.BLOCK_K, g.num_warps, 4)
    if kind in ("hopper", "blackwell", "ampere"):
        # dW: (classes x features) output, K = B (~512-1024): a plain GEMM, 128x128 with K
        # step 64 (half on Hopper: 3 stages x 32 KB) / 32 (tf32, Ampere: 4 stages x 16 KB);
        # dX likewise (features x rows) with K over the chunk's classes.
        k = 64 if (half and kind != "ampere") else (16 if fma else 32)
        stages = 3 if kind != "ampere" else 4
        dw = GemmTile(128, 128, k, 8, stages)
        dx = GemmTile(128, bm, k, 8 if bm >= 128 else 4, stages)
    else:
        dw = GemmTile(64, 64, 16 if fma else 32, 4, 3)
        dx = GemmTile(64, min(bm, 64), 16 if fma else 32, 4, 3)
    if env_mb:
        budget = int(float(env_mb) * (1 << 20))
    else:
        # G^T of 24576 classes per chunk, at most 32 MiB (24 MiB at B = 512 bf16; 16384
        # classes = 32 MiB at B = 1024): it stays in the L2 of an H100 (50 MB) / A100
        # (40 MB) between the G kernel that writes it and the dW/dX launch that reads it.
        # Chunks this long keep the GPU ahead of Python: each chunk costs 2 launches
        # (~30 us of host time) against ~55-75 us of GEMMs on an H100 (3 x 2*B*chunk*D
        # flops) -- C = 2^20 is 43 chunks at B = 512, 64 at B = 1024.
        # Extra memory of a backward: this buffer + the grad_x partials below + the
        # C floats of w_inv_norm -- ~33 MiB at B = 512 and ~40 MiB at B = 1024, C = 2^20,
        # under 1% of the naive loss's (several GB there).
        budget = min(32 << 20, B * 24576 * _elem(dot_dtype))
    # grad_x partials: (splits, B, D) fp32, capped at 4 MiB (4 splits at B = D = 512, 2 at
    # B = 1024): the dW tiles of the same launch (chunk/128 x D/128 of them) already fill
    # the GPU, the split-K only has to keep the dX tiles from being the tail.
    # G kernel: one program per tile. A persistent variant (one program per SM looping
    # over tiles in a flattened, pipelined loop) measured 8% slower on an H200 with
    # Triton 3.6 (backward 6.81 vs 6.28 ms at B=512, C=2^20, bf16) and spilled with fp32
    # operands, so it is not kept.
    return GradsConfig(g, dw, dx, chunk_bytes=budget, target_programs=2 * sms,
                       max_dx_partial_bytes=4 << 20)


def dot_input_precision(dot_dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot``'s input_precision for fp32 operands.

    Under the interpreter "ieee" (exact fp32, which is what numpy does anyway). On a GPU
    fp32 operands follow PyTorch's own matmul setting: TF32 tensor cores when
    ``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision('high')``
    allow it, exact "ieee" FMA otherwise -- the same numbers a user would get from
    ``x @ w.t()``. (For fp16/bf16 operands the setting is ignored by Triton.)
    """
    if interpreter_active() or device.type != "cuda":
        return "ieee"
    if dot_dtype != torch.float32:
        return "tf32"  # Triton's default; only fp32 operands read it
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --- candidates for the optional run-time autotuner (autotune.py) ---------------------


def forward_candidates(device: torch.device, B: int, C: int, D: int, dot_dtype: torch.dtype,
                       load_bytes: int = 0) -> list[ForwardConfig]:
    """The default first, then a few variations of tile width, K step, warps and stages,
    all with the default's norm placement (see forward_config: the in-loop norms race
    on Hopper's asynchronous wgmma). No candidate keeps the default's tile on 4 warps:
    that doubles the fp32 accumulator a thread holds (256 for 128x256), and every such
    compile spilled (60-2,936 bytes on sm_80/sm_90, bf16 and fp16/fp32, compile_check
    --candidates, 2026-12-02); 128x64 on 4 warps is the two-programs-per-SM variant.
    128x128 on 4 warps/4 stages is a Hopper-only candidate: 1.88 ms against 2.05 for
    128x128 on 8 warps/3 stages (H200, bf16, B=512, C=2^20, 2026-11-28, when W's norms
    were still squared in the K loop; bench/RESULTS.md "Launch-config variants"); it
    compiles to 252 registers and no spill on sm_90 for 16-bit operands, but spilled
    60-260 bytes on sm_80 (and on sm_90 with fp32 operands)."""
    base = forward_config(device, B, C, D, dot_dtype, load_bytes)
    t = base.tile
    out = [base]
    shapes = [(128, t.BLOCK_K, 8, 3), (64, t.BLOCK_K, 4, 4),
              (t.BLOCK_N, 2 * t.BLOCK_K, 8, 2), (t.BLOCK_N, t.BLOCK_K, 8, 4)]
    if device_kind(device)[0] == "hopper" and dot_dtype != torch.float32:
        # (With tf32 / exact fp32 operands it spilled 28 / 608 bytes on sm_90, Triton 3.6.)
        shapes.append((128, t.BLOCK_K, 4, 4))
    for bn, bk, warps, stages in shapes:
        cand = ForwardConfig(GemmTile(t.BLOCK_M, bn, bk, warps, stages), base.target_programs,
                             norms_in_loop=base.norms_in_loop)
        if cand not in out:
            out.append(cand)
    out.append(ForwardConfig(t, base.target_programs * 2, norms_in_loop=base.norms_in_loop))
    # (A warp-specialized TMA forward was a Hopper candidate until 2026-12-04: wrong on
    # an H200 -- lse error 0.37-0.41, results differing between identical calls, Triton
    # 3.6 -- for 1.25-1.45 ms against the default's 1.41; removed, see bench/RESULTS.md.)
    return out


def grads_candidates(device: torch.device, B: int, C: int, D: int, dot_dtype: torch.dtype,
                     load_bytes: int = 0) -> list[GradsConfig]:
    """The default first, then G tile / dW-dX tile / chunk-size variations."""
    base = grads_config(device, B, C, D, dot_dtype, load_bytes)
    out = [base]
    g, dw, dx = base.g_tile, base.dw_tile, base.dx_tile
    # Two programs per SM: 64-row G / dW / dX tiles on 4 warps (sm_90 bf16: 247 / 180
    # registers, 72 KB of shared memory each in compile_check, Triton 3.6), so that one
    # program's epilogue overlaps the other's MMAs -- at one 8-warp program per SM the
    # G kernel's ~1,200-instruction epilogue runs while the tensor cores idle.
    two = dict(g_tile=GemmTile(g.BLOCK_M, min(g.BLOCK_N, 64), g.BLOCK_K, 4, g.num_stages),
               dw_tile=GemmTile(dw.BLOCK_M, min(dw.BLOCK_N, 64), dw.BLOCK_K, 4, dw.num_stages),
               dx_tile=GemmTile(dx.BLOCK_M, min(dx.BLOCK_N, 64), dx.BLOCK_K, 4, dx.num_stages))
    variants = [
        dict(scale_g=not base.scale_g),  # the other dX operand path (register-scaled W)
        dict(chunk_bytes=base.chunk_bytes * 2),
        dict(chunk_bytes=max(1 << 20, base.chunk_bytes // 2)),
        # one stage more, or (Hopper 16-bit, 4 by default) the 3 it had before
        dict(g_tile=GemmTile(g.BLOCK_M, g.BLOCK_N, g.BLOCK_K, g.num_warps,
                             g.num_stages + 1 if g.num_stages < 4 else 3)),
        {"g_tile": two["g_tile"]},
        {"dw_tile": two["dw_tile"], "dx_tile": two["dx_tile"]},
        two,
        # (The dW/dX tiles of the default on 4 warps spilled 396-1,328 bytes in
        # compile_check on sm_80/sm_90, 2026-12-02: dropped; "two" is the 4-warp variant.)
        dict(max_dx_partial_bytes=base.max_dx_partial_bytes * 2),
    ]
    for v in variants:
        cand = GradsConfig(**{**base.__dict__, **v})
        if cand not in out:
            out.append(cand)
    return out
