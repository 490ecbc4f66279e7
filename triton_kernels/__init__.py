"""Triton backend of expface_kernels (installed as ``expface_kernels.triton_kernels``).

Modules:
    configs         launch configurations keyed on device, shape and dtype
    common          GEMM operand dtype rules and the in-kernel cast
    lse_forward     ``lse_partials``: row (max, sum-exp) partials + finalize, W row norms
    grads_backward  ``grads``: G per class chunk, grad_W (rows owned), grad_x (split-K)
    ops             torch.library custom ops (torch.compile-traceable)
    backend         ``BACKEND`` for expface_kernels.backends

Kernels are built when this package is imported: for CPU tensors set
TRITON_INTERPRET=1 before importing triton / expface_kernels.
"""

from .grads_backward import grads
from .lse_forward import lse_partials

__all__ = ["lse_partials", "grads"]
