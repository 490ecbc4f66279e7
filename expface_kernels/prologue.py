"""The per-row work around the class loop, one compiled op each where the extension runs.

Around the B×C class loop the loss does B×D and B-sized work: normalise x, clean the
labels, gather each row's target centre and its cosine, the margin (acos, pow, cos,
sin), and in backward x's normalisation. As PyTorch ops that is 46 of the 62 ops of one
ExpFace forward through the extension backend (and 12 of the backward's 17); on a GPU
each costs a launch and its dispatch on the host, and the GPU waited ~1.7 ms for the
first GEMM of a 9 ms step (H200, B=512, C=2^20, bf16; bench/RESULTS.md). With
``expface_kernels._C`` built (for CUDA tensors: built with CUDA) each function below is
ONE op of the extension (csrc/ek_prologue.h), whatever the backend of the class loop;
otherwise -- no extension, or a GPU its build carries no code for -- it is the PyTorch
code, which is also the specification the tests hold the ops to.

Shapes: x (B, D) any float dtype; w (C_local, D) the block ``[offset, offset +
C_local)``; "acc" is float64 when x or w is float64, else float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .margins import Margin, MarginParam, target_terms as torch_target_terms
from .torch_math import NORM_EPS, acc_dtype, block_target_index, inv_norm

USE_EXTENSION = True
"""False forces the PyTorch code (tests compare both; benchmarks time both)."""

MARGIN_CODES = {"none": 0, "cosface": 1, "arcface": 2, "expface": 3, "sphereface": 4, "combined": 5}
"""margins.MARGINS name -> the ``margin`` code of the margin_terms op (ek_math.h MarginKind)."""


def _extension_module():
    if not backends.importable("extension"):
        return None
    from . import extension
    return extension


_EXTENSION = _extension_module()
"""expface_kernels.extension, or None where it is not built (decided at import)."""

OPS_DEVICES = frozenset() if _EXTENSION is None else frozenset(
    ("cpu", "cuda") if _EXTENSION.built_with_cuda() else ("cpu",))
"""Device types on which the extension's ops run (decided at import: a constant to trace)."""


def _use_ops(t: Tensor) -> bool:
    """The extension's op for this tensor's device? On a GPU only where the build carries
    code for it (extension.cuda_unusable_reason); elsewhere the PyTorch code below."""
    if not USE_EXTENSION or t.device.type not in OPS_DEVICES:
        return False
    if t.device.type == "cuda":
        return _EXTENSION.cuda_unusable_reason(t.device.index if t.device.index is not None else 0) is None
    return True


def target_cosine(x: Tensor, w: Tensor, labels: Tensor, offset: int, ignore_index: int,
                  x_hat_dtype: Optional[torch.dtype] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalise x and gather each row's target cosine in this block.

    Args:
        labels: (B,) int64/int32 global labels (ignore_index on ignored rows).
        x_hat_dtype: the dtype x̂ is rounded to, default x's (the class loop's operand:
            autocast's dtype under autocast, function.autocast_operand_dtype).
    Returns:
        x_hat (B, D) x_hat_dtype, x_inv (B,) acc (1/max(‖x_i‖, 1e-12)), labels (B,) int64
        with −1 on ignored rows, kept (B,) acc (0 on ignored rows, else 1), c_t (B,) acc:
        x̂_i·W_col/max(‖W_col‖, 1e-12) with the rounded x̂, 0 where the label is not in
        the block (another rank's class, or an ignored row).
    """
    if _use_ops(x):
        return torch.ops.expface_kernels.prologue(x, w, labels, int(offset), int(ignore_index), x_hat_dtype)
    acc = acc_dtype(x, w)
    x_acc = x.to(acc)
    x_inv = inv_norm(x_acc, acc)
    x_hat = (x_acc * x_inv.unsqueeze(1)).to(x_hat_dtype or x.dtype)
    labels = labels.long()
    ignored = labels == ignore_index
    labels = torch.where(ignored, torch.full_like(labels, -1), labels)
    kept = (~ignored).to(acc)
    if w.shape[0] == 0:  # a rank that sampled no class this step (sharded loss)
        return x_hat, x_inv, labels, kept, torch.zeros(x.shape[0], dtype=acc, device=x.device)
    in_block, col = block_target_index(labels, offset, w.shape[0])
    w_t = w[col].to(acc)
    c_t = (x_hat.to(acc) * w_t).sum(1) * inv_norm(w_t, acc)
    return x_hat, x_inv, labels, kept, torch.where(in_block, c_t, torch.zeros_like(c_t))


def target_terms(c_t: Tensor, spec: Margin, m: MarginParam, s: float,
                 margin_grad: str) -> tuple[Tensor, Tensor]:
    """target_logit (B,) = s·ψ(c_t) and target_factor (B,) = ∂z/∂c (margins.target_terms)."""
    if _use_ops(c_t):
        m1, m2, m3 = m if isinstance(m, tuple) else (m, 0.0, 0.0)
        return torch.ops.expface_kernels.margin_terms(c_t, MARGIN_CODES[spec.name], float(m1), float(m2),
                                                      float(m3), float(s), margin_grad == "exact")
    return torch_target_terms(c_t, spec, m, s, margin_grad)


def normalize_backward(x: Tensor, x_inv: Tensor, grad_x_hat: Tensor) -> Tensor:
    """∂L/∂x (B, D) in x's dtype through x̂ = x/max(‖x‖, 1e-12) (F.normalize's backward).

    grad_x_hat (B, D) acc; x_inv (B,) acc: ``(g − x̂(x̂·g))/‖x‖``, or ``g/1e-12`` for rows
    below the norm floor.
    """
    if _use_ops(x):
        return torch.ops.expface_kernels.normalize_backward(x, x_inv, grad_x_hat)
    x_hat = x.to(grad_x_hat.dtype) * x_inv.unsqueeze(1)
    radial = (x_hat * grad_x_hat).sum(1, keepdim=True)
    radial = torch.where((x_inv < 1.0 / NORM_EPS).unsqueeze(1), radial, torch.zeros_like(radial))
    return ((grad_x_hat - x_hat * radial) * x_inv.unsqueeze(1)).to(x.dtype)
