"""torch.library custom ops around the Triton launches, so torch.compile can trace them.

Each op is a ``torch.library.custom_op`` whose real implementation launches the
kernels and whose ``register_fake`` gives output shapes/dtypes from the inputs'. This
compiles with ``torch.compile(fullgraph=True)`` both on a GPU and on CPU under
TRITON_INTERPRET=1; ``torch.library.triton_op`` does not trace under the interpreter
(fake tensors have no data pointer -- DESIGN §5). Dynamo treats the op as opaque, so
the launches run eagerly inside the compiled graph, with the static launch configs.

Namespace ``expface_triton`` (not ``expface_kernels``, which the C++ extension's
TORCH_LIBRARY block owns).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import grads_backward, lse_forward

_NS = "expface_triton"


def on_device_of(t: Tensor):
    """Make ``t``'s CUDA device current for the launches: Triton launches on the current
    device and its stream whatever device the tensors are on (the extension's ops take
    a CUDAGuard for the same reason). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op(f"{_NS}::lse_partials", mutates_args=())
def lse_partials(x_hat: Tensor, w: Tensor, target_logit: Tensor, labels: Tensor, s: float,
                 offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row_max (B,) f32, row_sumexp (B,) f32, w_inv_norm (C_local,) f32); see lse_forward."""
    with on_device_of(x_hat):
        return lse_forward.lse_partials(x_hat, w, target_logit, labels, s, offset)


@lse_partials.register_fake
def _lse_partials_fake(x_hat, w, target_logit, labels, s, offset):
    b, c = x_hat.shape[0], w.shape[0]
    f32 = torch.float32
    return (x_hat.new_empty((b,), dtype=f32), x_hat.new_empty((b,), dtype=f32),
            w.new_empty((c,), dtype=f32))


@torch.library.custom_op(f"{_NS}::grads", mutates_args=())
def grads(x_hat: Tensor, w: Tensor, w_inv_norm: Tensor, labels: Tensor, lse: Tensor,
          target_grad: Tensor, grad_row: Tensor, s: float, offset: int) -> tuple[Tensor, Tensor]:
    """(grad_x_hat (B, D) f32, grad_w (C_local, D) w.dtype); see grads_backward."""
    with on_device_of(x_hat):
        return grads_backward.grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset)


@grads.register_fake
def _grads_fake(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset):
    return x_hat.new_empty(x_hat.shape, dtype=torch.float32), torch.empty_like(w)
