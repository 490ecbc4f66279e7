"""The ``triton`` backend object read by expface_kernels/backends.py (``BACKEND``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import Backend
from . import ops
from .lse_forward import _lse_partials_kernel

# Decided once, at import: @triton.jit built interpreter kernels iff TRITON_INTERPRET was
# set when this package was imported; setting it later changes nothing.
_INTERPRETED = type(_lse_partials_kernel).__name__ == "InterpretedFunction"
_CUDA = torch.cuda.is_available()
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reasons(x_hat: Tensor, w: Tensor) -> list[str]:
    """Why these tensors cannot run on the Triton kernels (empty list: they can)."""
    why = []
    dev = x_hat.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            why.append("CPU tensors need TRITON_INTERPRET=1 set before triton and "
                       "expface_kernels are imported")
    elif dev == "cuda":
        if not _CUDA:
            why.append("CUDA is not available")
    else:
        why.append(f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                   f"not on {dev}")
    for name, t in (("embeddings", x_hat), ("weight", w)):
        if t.dtype == torch.float64:
            why.append(f"float64 {name} are not supported by the Triton kernels "
                       f"(use backend='chunked' or 'reference')")
        elif t.dtype not in _SUPPORTED:
            why.append(f"{t.dtype} {name} are not supported by the Triton kernels")
        elif t.dtype == torch.bfloat16 and (_INTERPRETED or dev == "cpu"):
            why.append(f"bfloat16 {name} are not supported by the Triton interpreter")
    return why


BACKEND = Backend(
    name="triton",
    lse_partials=ops.lse_partials,
    grads=ops.grads,
    unsupported_reasons=unsupported_reasons,
    fused_forward_grads=None,
)
