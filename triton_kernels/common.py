"""Pieces shared by the kernels: the GEMM operand dtype and the in-kernel cast.

Tensor-core operand dtype ("dot dtype"), chosen on the host from (x_hat.dtype, w.dtype):

    fp32 + fp32       -> fp32   (tl.dot with input_precision from configs.dot_input_precision:
                                 "tf32" on a GPU when torch allows TF32, else exact "ieee")
    bf16 + bf16       -> bf16   (wgmma/mma bf16, fp32 accumulation)
    fp16 + fp16       -> fp16
    fp16/bf16 + fp32  -> the 16-bit one: the fp32 operand's tile is cast to it in
                         registers after the load (the fp32 W of mixed-precision face
                         recognition runs on fp16 tensor cores at full rate; the W row
                         norms are still taken from the fp32 values before the cast).
                         Caveat: raw |W| entries above 65504 would overflow fp16 -- class
                         centres are O(1) or smaller in every recipe we know.
    fp16 + bf16       -> fp32   (rare; neither 16-bit format holds the other's values)

Every accumulator (GEMM, row max / sum-exp, gradients) is fp32.

The epilogues work in log2 units (z * log2(e)), so that each e^(z - m) is one 2^x: on a
GPU one ``ex2.approx.ftz.f32`` (``exp2``), the same instruction CUDA's ``exp2f`` fast path
and the extension's tile epilogues use.

Masks: every load / store mask is a compare of tensors, or such compares combined with
``&`` -- never combined with a compare of two scalars (``pid_m == 0``); a condition on
scalars is a branch around the access instead. A Triton interpreter bug, not a GPU one:
the interpreter gives a compare the numpy dtype of its operands, so a scalar compare
broadcast against a tensor becomes an int32 array, and ``bool & int32`` stays int32.
Triton 3.6-3.8's interpreter converted such a mask to bool when it loaded or stored;
3.9's (its C++ bindings moved from pybind11 to nanobind, triton-lang/triton#10283)
refuses it: "ValueError: mask has unsupported dtype". The compiled kernel was right
either way (the mask is i1 there), and the branch costs a GPU nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import interpreter_active

DOT_FP32 = 0
DOT_FP16 = 1
DOT_BF16 = 2

_KIND = {torch.float32: DOT_FP32, torch.float16: DOT_FP16, torch.bfloat16: DOT_BF16}


def dot_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The GEMM operand dtype of a pair of input dtypes (table in the module docstring)."""
    if a == b:
        return a
    halves = {torch.float16, torch.bfloat16}
    if a in halves and b in halves:
        return torch.float32
    return a if a in halves else b


def dot_kind(dtype: torch.dtype) -> int:
    """The DOT_KIND constexpr of a dot dtype."""
    return _KIND[dtype]


LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural -> log2 units
LN2 = tl.constexpr(0.6931471805599453)     # ln(2): log2 -> natural units


def fast_exp2(device: torch.device) -> bool:
    """The FAST_EXP2 constexpr: an NVIDIA GPU, where ``exp2`` may use PTX inline assembly
    (not the interpreter, which cannot run it, nor ROCm)."""
    return device.type == "cuda" and not interpreter_active() and torch.version.hip is None


@triton.jit
def exp2(x, FAST: tl.constexpr):
    """2^x of an fp32 tile. FAST: one ex2.approx.ftz.f32 a element (max error 2 ulp;
    results below 2^-126 flush to 0 -- a logit that far below its row's max adds nothing
    to a sum-exp or a gradient). tl.exp2 lowers to the non-ftz ex2.approx.f32, which
    ptxas wraps in a range test and two rescales: 5 instructions an element instead of 1
    (SASS of _grad_logits_kernel, sm_90, Triton 3.8). Not FAST: tl.exp2 (interpreter)."""
    if FAST:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def load_tile(ptrs, mask, MASKED: tl.constexpr):
    """A GEMM operand tile, masked (zeros outside) only where it can be ragged: MASKED is
    False when every dimension of every launch tile is full -- K a multiple of BLOCK_K,
    the contiguous dimension a multiple of its block -- and the strided dimension was
    clamped into range by the caller (its padding rows read a real row whose results are
    never stored). Clamping the contiguous dimension instead would cost the 16-byte
    vector loads (Triton cannot prove a clamped range contiguous). The masks were ~35%
    of the K loops' SASS instructions (sm_90, Triton 3.6: forward loop 125 -> 78, G
    loop 100 -> 63)."""
    if MASKED:
        t = tl.load(ptrs, mask=mask, other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def forward_program_rows(B, num_row_tiles, BLOCK_M: tl.constexpr):
    """The forward's program -> (row tile, split) map (the row tiles of one split are
    consecutive program ids, so they walk the same W tiles together) and its rows:
    (pid_m, split, rows int32, row_ok, rows int64)."""
    pid = tl.program_id(0)
    pid_m = pid % num_row_tiles
    split = pid // num_row_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, split, rows, rows < B, rows.to(tl.int64)


@triton.jit
def block_target_cols(labels_ptr, rows64, row_ok, offset, C):
    """Target column of each row inside the class block [offset, offset + C), int32; -1
    for an ignored row (label -1), a padding row or a target in another block. The label
    arithmetic is int64 (global ids, large offsets); the result fits int32 (< C)."""
    col = tl.load(labels_ptr + rows64, mask=row_ok, other=-1).to(tl.int64) - offset
    return tl.where((col >= 0) & (col < C), col, -1).to(tl.int32)


@triton.jit
def cast_for_dot(t, DOT_KIND: tl.constexpr):
    """Cast a loaded tile to the GEMM operand dtype (resolved at compile time)."""
    if DOT_KIND == 1:
        r = t.to(tl.float16)
    elif DOT_KIND == 2:
        r = t.to(tl.bfloat16)
    else:
        r = t.to(tl.float32)
    return r


def block_targets(labels: torch.Tensor, offset: int, C: int) -> torch.Tensor:
    """(B,) target column of each row inside the class block [offset, offset + C): the
    label minus offset, or -1 for an ignored row (label -1) or one whose class lies in
    another block. int32 when C < 2^31 (the kernels' compares are then 32-bit), else
    int64. Elementwise on the device: no host sync."""
    col = labels.to(torch.int64) - offset
    col = torch.where((col >= 0) & (col < C), col, -1)
    return col.to(torch.int32) if C < 2**31 else col


def check_vectors(B: int, C: int, device, **vectors) -> None:
    """Raise ValueError unless every named 1-D argument has its contract length.

    The kernels index these with row / class offsets: a short vector would be read out
    of bounds, so the host checks lengths (cheap metadata, no sync) before any launch.
    Names ending in ``_c`` must have C elements, the others B (grad_row and target_grad
    may also have 1, broadcast).
    """
    for name, t in vectors.items():
        want = C if name.endswith("_c") else B
        n = t.numel()
        ok = n == want or (name in ("grad_row", "target_grad") and n == 1)
        if not ok:
            raise ValueError(f"{name.removesuffix('_c')} must have {want} elements, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name.removesuffix('_c')} is on {t.device}, expected {device}")
