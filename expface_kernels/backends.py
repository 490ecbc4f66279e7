"""Backend registry: name -> why it cannot run -> the contract's primitives.

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

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
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


# Optional backends live in modules that may fail to import (no Triton, extension not
# built); each exposes a module attribute ``BACKEND``.
_LAZY_MODULES = {
    "triton": "expface_kernels.triton_kernels.backend",
    "extension": "expface_kernels.extension",
}
BACKEND_NAMES = ("reference", "chunked", "triton", "extension")

# Fastest first, per device type. Triton under the CPU interpreter is exact but orders
# of magnitude slower than BLAS, so "auto" never picks it for CPU tensors. CUDA: the
# extension first -- on an H200 (ExpFace, C=2^20, D=512, fwd+bwd, 2026-12-04;
# bench/RESULTS.md) it took 12.2 ms against Triton's 13.4 at B=1024 bf16 and 11.0 / 15.4
# ms against 13.4 / 23.6 for fp16 x with an fp32 W at B=512 / 1024; at B=512 bf16 the two
# are within run-to-run spread (7.2-8.1 ms against 7.8-8.7 over three runs).
_AUTO_ORDER = {
    "cuda": ("extension", "triton", "chunked"),
    "cpu": ("extension", "chunked"),
}

_loaded: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The Backend, or the reason its module cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    if name == "reference":
        from . import reference as mod
    elif name == "chunked":
        from . import chunked as mod
    else:
        try:
            mod = importlib.import_module(_LAZY_MODULES[name])
        except Exception as exc:  # ImportError, or a broken build raising OSError
            _loaded[name] = f"cannot import {_LAZY_MODULES[name]}: {type(exc).__name__}: {exc}"
            return _loaded[name]
    _loaded[name] = mod.BACKEND
    return mod.BACKEND


def check_backend_name(name) -> None:
    """Raise ValueError unless ``name`` is ``"auto"`` or one of BACKEND_NAMES."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {name!r}")


def get_backend(name: str) -> Backend:
    """The Backend named ``name``; raises RuntimeError with the reason if unusable here."""
    if name not in BACKEND_NAMES:  # "auto" included: it names no one Backend
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    b = _load(name)
    if isinstance(b, str):
        raise RuntimeError(f"backend {name!r} is not available: {b}")
    return b


def load_all() -> None:
    """Import every backend now (failures are kept as their reasons).

    Called when the package is imported: ``torch.compile`` cannot trace
    ``importlib.import_module``, so a first call of the loss inside a compiled region
    must find every backend already loaded.
    """
    for name in BACKEND_NAMES:
        _load(name)


def importable(name: str) -> bool:
    """True if the backend's module imports here (see :func:`available_backends` for why not)."""
    return not isinstance(_load(name), str)


def loaded_backend(name: str) -> Backend:
    """A backend already resolved by :func:`select_backend` (a plain lookup, cheap to trace)."""
    return _loaded[name]


def _reasons(name: str, x_hat: Tensor, w: Tensor) -> list[str]:
    b = _load(name)
    if isinstance(b, str):
        return [b]
    return b.unsupported_reasons(x_hat, w)


def select_backend(name: str, x_hat: Tensor, w: Tensor,
                   x_dtype: Optional[torch.dtype] = None) -> Backend:
    """Resolve ``backend=`` for these tensors.

    ``"auto"`` takes the first usable backend of the device's order; an explicit name
    that cannot run raises RuntimeError with its reasons (every candidate's reasons
    for ``"auto"``). ``x_dtype``: the dtype the class loop will take x̂ in when it is
    not x_hat's (under autocast, function.autocast_operand_dtype); the backends are
    asked about that dtype.
    """
    note = ""
    if x_dtype is not None and x_dtype != x_hat.dtype:
        x_hat = x_hat.new_empty((0, x_hat.shape[-1]), dtype=x_dtype)  # a probe: no data
        note = f" (under torch.autocast the embeddings enter the class loop in {x_dtype})"
    if name == "auto":
        order = _AUTO_ORDER.get(x_hat.device.type, ("chunked",))
        why = {}
        for cand in order:
            r = _reasons(cand, x_hat, w)
            if not r:
                return _load(cand)
            why[cand] = r
        lines = "; ".join(f"{k}: {' / '.join(v)}" for k, v in why.items())
        raise RuntimeError(f"no backend can run these inputs ({lines}){note}")
    check_backend_name(name)
    r = _reasons(name, x_hat, w)
    if r:
        raise RuntimeError(f"backend {name!r} cannot run these inputs: " + " / ".join(r) + note)
    return _load(name)


def available_backends(device: str | torch.device | None = None) -> dict[str, str | None]:
    """Every backend's name -> None if it can run float32 tensors on ``device``, else why.

    ``device`` defaults to CUDA when a GPU is present, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {n: "no CUDA device is available" for n in BACKEND_NAMES}
    # a fake tensor: the reasons read only the device and the dtype, and the query
    # allocates nothing on the device
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        probe = torch.empty(1, 1, device=device)
    out = {}
    for n in BACKEND_NAMES:
        r = _reasons(n, probe, probe)
        out[n] = " / ".join(r) if r else None
    return out

