"""The ``cutlass`` backend: the fused sm_90a GEMMs of csrc/cutlass/ (an opt-in build).

The kernels compute the contract's two primitives (contract.py) as four GEMMs with
their elementwise work in the epilogues; expface_kernels/gemm_floor_model.py is their
executable specification. Their ops (``torch.ops.expface_cutlass``) exist only where
the package was built with them (module ``expface_kernels._cutlass``) or a script has
built and loaded them in-process (bench/gpu_cutlass.py); otherwise every call is
refused with that reason.

Where the fixed offset of gemm_floor_model.fixed_offset does not exist (s + ln C too
large for fp32 without a running max), ``lse_partials`` takes the running-max kernels
of the ``extension`` backend.

Shapes as contract.py; x_hat and w both bfloat16 or both float16, D a multiple of 8,
CUDA tensors on a device of capability 9.0 (the sm_90a code runs nowhere else).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import backends, gemm_floor_model
from .contract import Backend

OPS_MODULE = "expface_kernels._cutlass"


def ops_missing() -> str | None:
    """None when ``torch.ops.expface_cutlass`` has both ops, else why not."""
    try:
        importlib.import_module(OPS_MODULE)
    except Exception as exc:  # not built (the default), or built against another torch
        import_error = f"{type(exc).__name__}: {exc}"
    else:
        import_error = None
    try:
        torch.ops.expface_cutlass.lse_partials
        torch.ops.expface_cutlass.grads
        return None
    except (AttributeError, RuntimeError):
        return ("the CUTLASS kernels are not built (build with EXPFACE_CUTLASS=1 and the "
                f"nvidia-cutlass headers; importing {OPS_MODULE}: {import_error})")


def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Contract primitive: kernel 1 with the fixed offset, else the extension's kernels."""
    o = gemm_floor_model.fixed_offset(s, w.shape[0])
    if o is None:
        return backends.get_backend("extension").lse_partials(x_hat, w, target_logit, labels, s, offset)
    return torch.ops.expface_cutlass.lse_partials(x_hat, w, target_logit, labels, float(s), int(offset), o)


def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int, *,
          chunk: int = gemm_floor_model.BACKWARD_CHUNK) -> tuple[Tensor, Tensor]:
    """Contract primitive: kernels 2-4 over class chunks of ``chunk`` (a multiple of 128)."""
    return torch.ops.expface_cutlass.grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row,
                                           float(s), int(offset), int(chunk))


def _unsupported(x_hat: Tensor, w: Tensor) -> list[str]:
    why = []
    missing = ops_missing()
    if missing:
        why.append(missing)
    if x_hat.device.type != "cuda":
        why.append("CUDA tensors only")
    elif torch.cuda.get_device_capability(x_hat.device) != (9, 0):
        why.append("sm_90a kernels: Hopper GPUs (capability 9.0) only, this one is "
                   f"{torch.cuda.get_device_capability(x_hat.device)}")
    if x_hat.dtype != w.dtype or w.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"embeddings and weight must both be bfloat16 or both float16, got {x_hat.dtype} "
                   f"and {w.dtype}")
    if w.shape[-1] % 8:
        why.append(f"the embedding size must be a multiple of 8 (16-byte TMA rows), got {w.shape[-1]}")
    return why


BACKEND = Backend("cutlass", lse_partials, grads, _unsupported)
