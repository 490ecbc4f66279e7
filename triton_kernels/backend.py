"""The ``triton`` backend object read by expface_kernels/backends.py (``BACKEND``)."""

from __future__ import annotations

import re

import numpy
import torch
import triton
from torch import Tensor

from ..contract import Backend
from . import ops
from .lse_forward import _lse_partials_kernel

# Decided once, at import: @triton.jit built interpreter kernels iff TRITON_INTERPRET was
# set when this package was imported; setting it later changes nothing.
_INTERPRETED = type(_lse_partials_kernel).__name__ == "InterpretedFunction"
_CUDA = torch.cuda.is_available()
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def interpreter_numpy_conflict(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton interpreter cannot run the kernels with this NumPy, or None.

    Triton <= 3.6's interpreter turns a loop bound that depends on ``tl.program_id``
    into a Python int with ``int()`` of a 1-element NumPy array, which NumPy >= 2.4
    refuses (TypeError "only 0-dimensional arrays can be converted to Python
    scalars"): every kernel here failed that way (Triton 3.6.0 + NumPy 2.4.6; with
    NumPy 2.3.5 the same tests pass). Triton 3.7 squeezes the array first.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"the interpreter of Triton {triton_version} cannot run these kernels with "
                f"NumPy {numpy_version} (Triton < 3.7 needs numpy<2.4; or upgrade Triton)")
    return None


# Versions do not change in a process: decided once, not on every dispatch.
_INTERPRETER_CONFLICT = (interpreter_numpy_conflict(triton.__version__, numpy.__version__)
                         if _INTERPRETED else None)


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
    if _INTERPRETER_CONFLICT:  # None unless interpreted (CPU or CUDA tensors alike)
        why.append(_INTERPRETER_CONFLICT)
    for name, t in (("embeddings", x_hat), ("weight", w)):
        if t.dtype == torch.float64:
            why.append(f"{name} dtype float64 is not supported by the Triton kernels "
                       f"(use backend='chunked' or 'reference')")
        elif t.dtype not in _SUPPORTED:
            why.append(f"{name} dtype {t.dtype} is not supported by the Triton kernels")
        elif t.dtype == torch.bfloat16 and (_INTERPRETED or dev == "cpu"):
            why.append(f"{name} dtype bfloat16 is not supported by the Triton interpreter")
    return why


BACKEND = Backend(
    name="triton",
    lse_partials=ops.lse_partials,
    grads=ops.grads,
    unsupported_reasons=unsupported_reasons,
    fused_forward_grads=None,
)
