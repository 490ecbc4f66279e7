"""The backend contract and :class:`Backend`, the record of one implementation of it.

This module imports nothing of the package, so that every backend module can import
``Backend`` from it while the registry (backends.py) imports the backend modules.

The contract (DESIGN §3, as implemented here; every backend follows it exactly).
"acc" is float64 for float64 inputs, else float32. All tensors on one device.

``lse_partials(x_hat, w, target_logit, labels, s, offset)``
    -> ``(row_max[B] acc, row_sumexp[B] acc, w_inv_norm[C_local] acc)``

    x_hat (B, D) normalised embeddings; w (C_local, D) raw class centres of the block
    ``[offset, offset + C_local)``; target_logit (B,) acc = s·ψ(c_iy); labels (B,) int64
    global labels with ignored rows set to −1. Logits z_ij = s·x̂_i·W_j·w_inv_norm_j,
    except z_iy = target_logit_i at column ``labels[i] − offset`` when it lies in the
    block (substituted inside the tile). ``w_inv_norm_j = 1/max(‖W_j‖, 1e-12)``.

``grads(x_hat, w, w_inv_norm, labels, lse, target_grad, grad_row, s, offset)``
    -> ``(grad_x_hat[B, D] acc, grad_w[C_local, D] w.dtype)``

    G_ij = grad_row_i·s·exp(s·c_ij − lse_i) off target, G_iy = target_grad_i, where
    target_grad_i = grad_row_i·target_factor_i·expm1(target_logit_i − lse_i) is formed
    by the caller (deviation from DESIGN's ``target_factor`` argument: it keeps expm1 and
    the margin out of the kernels). grad_x_hat = Σ_j G_ij·ŵ_j (this block's part);
    grad_w_j = w_inv_norm_j·(g_j − ŵ_j(ŵ_j·g_j)) with g_j = Σ_i G_ij·x̂_i (no projection
    when ‖W_j‖ < 1e-12, as F.normalize's backward).

``fused_forward_grads(x_hat, w, target_logit, target_factor, labels, grad_row, s)``
    -> ``(lse[B] acc, grad_x_hat[B, D] acc, grad_w[C, D] w.dtype, w_inv_norm[C] acc)``

    Optional, single device: blocks of rows against all classes, so each row's
    logsumexp is final before its gradient is formed (3 GEMMs instead of 4). Used only
    for tensors on a device type in ``fused_device_types``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

ReasonsFn = Callable[[Tensor, Tensor], "list[str]"]


@dataclass(frozen=True)
class Backend:
    """One implementation of the contract.

    ``unsupported_reasons(x_hat, w)`` returns why this backend cannot run these
    tensors (empty list: it can). ``fused_device_types``: the device types ("cpu",
    "cuda") on which the Function takes ``fused_forward_grads`` when it can.
    """

    name: str
    lse_partials: Callable
    grads: Callable
    unsupported_reasons: ReasonsFn
    fused_forward_grads: Optional[Callable] = None
    fused_device_types: tuple[str, ...] = ("cpu", "cuda")
