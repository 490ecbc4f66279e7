"""The ``extension`` backend: the compiled C++/CUDA ops of ``expface_kernels._C``.

``expface_kernels._C`` registers the three operators of the backend contract (and the three
per-row ops of :mod:`expface_kernels.prologue`) with ``TORCH_LIBRARY(expface_kernels)``
(csrc/ops.cpp), with CPU kernels (csrc/cpu) and, when built with a CUDA toolkit, CUDA
kernels (csrc/cuda); one device-agnostic driver (csrc/ek_driver.cpp: a GEMM per block
through at::mm, one fused epilogue, the gradient GEMMs) and one math header
(csrc/ek_math.h) serve both devices. This module registers their fake (meta)
implementations, so that ``torch.compile`` and ``torch.library.opcheck`` can trace them,
and wraps them as the backend contract of :mod:`expface_kernels.backends`::

    lse_partials(x_hat, w, target_logit, labels, s, offset)
        -> row_max (B,) acc, row_sumexp (B,) acc, w_inv_norm (C_local,) acc
    grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset)
        -> grad_x_hat (B, D) acc, grad_w (C_local, D) w.dtype
    fused_forward_grads(x_hat, w, target_logit, target_factor, labels, grad_row, s)
        -> lse (B,) acc, grad_x_hat (B, D) acc, grad_w (C, D) w.dtype, w_inv_norm (C,) acc

x_hat (B, D) and w (C_local, D) are float16 / bfloat16 / float32 (float64 on CPU), may
differ in dtype (the GEMMs run in ``torch.promote_types`` of the two, except on CUDA,
where a 16-bit x_hat with an fp32 w takes the 16-bit dtype: ek_driver.cpp
compute_dtype; fp16 GEMMs take W's normalised rows: gemm_operand there); "acc" is
float64 when that is float64, else float32. labels (B,) int64 or int32, ignored rows -1.

Importing this module loads the extension built for the running torch
(:func:`extension_build.load`: the installed ``_C`` when its build record matches, else
a cached first-use build) and raises ImportError with the reason and the fix when there
is none; the registry turns that into the backend's unavailability reason.

On a GPU the CUDA ops run only where the carried code can (:func:`cuda_unusable_reason`:
SASS of the GPU's family or PTX no newer than it); elsewhere the backend reports why and
:mod:`expface_kernels.prologue` runs its PyTorch code.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import extension_build
from .contract import Backend
from .torch_math import acc_dtype

_C, BUILD_RECORD = extension_build.load(os.path.dirname(os.path.abspath(__file__)))
"""The loaded extension module and its build record (extension_build.make_record)."""

_ops = torch.ops.expface_kernels

BLOCK_BYTES = 0
"""Bound of the kernels' logits buffer in bytes; 0 takes the C++ default
(env EXPFACE_EXT_BLOCK_BYTES, else 32 MiB on CPU; on CUDA chunks of 24576 classes,
i.e. B x 24576 x the element size, within [24, 96] MiB). Tests lower it to force many
blocks."""


def built_with_cuda() -> bool:
    """True if this build of ``_C`` contains the CUDA kernels."""
    return bool(_C.built_with_cuda())


def _device_info(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of cuda:index (tests replace it to mock a GPU)."""
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


_CUDA_REASONS: dict[int, Optional[str]] = {}


@torch.compiler.assume_constant_result
def cuda_unusable_reason(index: int) -> Optional[str]:
    """None if this build's CUDA code runs on cuda:index, else why and how to rebuild.

    Computed once per device (a constant to torch.compile: the build and the GPU do not
    change within a process).
    """
    if index not in _CUDA_REASONS:
        if not built_with_cuda():
            why = ("expface_kernels._C was built without CUDA (rebuild with a CUDA toolkit: "
                   "`FORCE_CUDA=1 pip install --no-build-isolation .`)")
        else:
            name, cap = _device_info(index)
            archs = BUILD_RECORD.get("cuda_archs") or "unknown"
            why = None if extension_build.code_runs_on(cap, archs) else (
                f"cuda:{index} ({name}, compute capability {cap[0]}.{cap[1]}) has no code in this build of "
                f"expface_kernels._C (TORCH_CUDA_ARCH_LIST={archs}); add {cap[0]}.{cap[1]} to "
                f"TORCH_CUDA_ARCH_LIST and {extension_build.REBUILD_HINT}")
        _CUDA_REASONS[index] = why
    return _CUDA_REASONS[index]


# ---------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("expface_kernels::lse_partials")
def _lse_partials_fake(x_hat, w, target_logit, labels, s, offset, block_bytes=0):
    acc = acc_dtype(x_hat, w)
    b, c = x_hat.shape[0], w.shape[0]
    return (x_hat.new_empty((b,), dtype=acc), x_hat.new_empty((b,), dtype=acc),
            x_hat.new_empty((c,), dtype=acc))


@torch.library.register_fake("expface_kernels::grads")
def _grads_fake(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset, block_bytes=0):
    acc = acc_dtype(x_hat, w)
    return x_hat.new_empty(x_hat.shape, dtype=acc), w.new_empty(w.shape)


@torch.library.register_fake("expface_kernels::fused_forward_grads")
def _fused_fake(x_hat, w, target_logit, target_factor, labels, grad_row, s, block_bytes=0):
    acc = acc_dtype(x_hat, w)
    b, c = x_hat.shape[0], w.shape[0]
    return (x_hat.new_empty((b,), dtype=acc), x_hat.new_empty(x_hat.shape, dtype=acc),
            w.new_empty(w.shape), x_hat.new_empty((c,), dtype=acc))


@torch.library.register_fake("expface_kernels::prologue")
def _prologue_fake(x, w, labels, offset, ignore_index, x_hat_dtype=None):
    acc = acc_dtype(x, w)
    b = x.shape[0]
    return (x.new_empty(x.shape, dtype=x_hat_dtype or x.dtype), x.new_empty((b,), dtype=acc),
            x.new_empty((b,), dtype=torch.int64),
            x.new_empty((b,), dtype=acc), x.new_empty((b,), dtype=acc))


@torch.library.register_fake("expface_kernels::margin_terms")
def _margin_terms_fake(c_t, margin, m1, m2, m3, s, exact):
    return c_t.new_empty(c_t.shape), c_t.new_empty(c_t.shape)


@torch.library.register_fake("expface_kernels::normalize_backward")
def _normalize_backward_fake(x, x_inv, grad_x_hat):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- the contract
def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (max, sum-exp) of the block's logits and the block's W inverse norms.

    Shapes: x_hat (B, D), w (C_local, D), target_logit (B,) acc, labels (B,) global.
    Returns row_max (B,), row_sumexp (B,), w_inv_norm (C_local,), all acc.
    """
    return _ops.lse_partials(x_hat, w, target_logit, labels, float(s), int(offset), BLOCK_BYTES)


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int) -> tuple[Tensor, Tensor]:
    """This block's grad_x_hat (B, D) acc and grad_w (C_local, D) in w.dtype.

    lse (B,) final over all blocks; target_grad (B,) = dL/dc at the target column;
    grad_row (B,) = dL/dloss_i (0 on ignored rows).
    """
    return _ops.grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, float(s), int(offset),
                      BLOCK_BYTES)


def fused_forward_grads(x_hat: Tensor, w: Tensor, target_logit: Tensor, target_factor: Tensor,
                        labels: Tensor, grad_row: Tensor, s: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Single device, all classes: lse (B,), grad_x_hat (B, D), grad_w (C, D), w_inv_norm (C,).

    Blocks of rows against all classes (3 GEMMs); the logits buffer is bounded by
    BLOCK_BYTES. grad_w is in w.dtype, the rest acc.
    """
    return _ops.fused_forward_grads(x_hat, w, target_logit, target_factor, labels, grad_row, float(s),
                                    BLOCK_BYTES)


def unsupported_reasons(x_hat: Tensor, w: Tensor) -> list[str]:
    """Why the extension cannot run these tensors (empty list: it can)."""
    reasons = []
    devs = {x_hat.device.type, w.device.type}
    for dev in sorted(devs):
        if dev == "cuda":
            t = x_hat if x_hat.device.type == "cuda" else w
            why = cuda_unusable_reason(t.device.index if t.device.index is not None else 0)
            if why:
                reasons.append(why)
        elif dev != "cpu":
            reasons.append(f"the extension has CPU and CUDA kernels only, got a {dev} tensor")
    if "cuda" in devs and torch.float64 in (x_hat.dtype, w.dtype):
        reasons.append("float64 runs in the extension on CPU only")
    for name, t in (("x_hat", x_hat), ("w", w)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            reasons.append(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    return reasons


BACKEND = Backend(
    name="extension",
    lse_partials=lse_partials,
    grads=grads,
    unsupported_reasons=unsupported_reasons,
    fused_forward_grads=fused_forward_grads,
    # CPU only. On a GPU a row block against all classes holds few rows within a memory
    # bound of ~1% of the naive loss's (16 rows of 2^20 bf16 classes = 32 MiB), so its
    # GEMMs stream W B/16 times; the class-chunked 4-GEMM path streams W once per GEMM
    # and keeps each (B, chunk) block in L2. On the CPU the fused path is what gives the
    # extension its fwd+bwd time against naive (bench/RESULTS.md, "Quick preset": B=256,
    # C=2^17, D=512, fp32).
    fused_device_types=("cpu",),
)
