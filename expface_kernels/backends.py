"""Backend registry: name -> why it cannot run here -> the contract's primitives.

The contract itself and the :class:`~expface_kernels.contract.Backend` record are in
contract.py (which imports nothing of the package: the backend modules import it, and
this registry imports them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import Backend

BACKEND_NAMES = ("reference", "chunked", "triton", "extension")

# Fastest first, per device type. Triton under the CPU interpreter is exact but orders
# of magnitude slower than BLAS, so "auto" never picks it for CPU tensors. CUDA: the
# extension first -- on an H200 it was faster than Triton at B=1024 bf16 and with fp16 x
# and an fp32 W, and within run-to-run spread of it at B=512 bf16 (ExpFace, C=2^20,
# D=512, fwd+bwd; the numbers: bench/RESULTS.md, "GPU -- NVIDIA H200", 2026-12-04).
_AUTO_ORDER = {
    "cuda": ("extension", "triton", "chunked"),
    "cpu": ("extension", "chunked"),
}

_loaded: dict[str, Backend | str] = {}


def _import_backend_module(name: str):
    """The module whose ``BACKEND`` attribute is backend ``name``'s.

    Imports written out (not importlib with a table of names) so that the package's
    import graph, which tests/test_imports.py builds from these sources, sees them.
    Triton and the extension may fail to import (no Triton, extension not built).
    """
    if name == "reference":
        from . import reference as mod
    elif name == "chunked":
        from . import chunked as mod
    elif name == "triton":
        from .triton_kernels import backend as mod
    else:
        from . import extension as mod
    return mod


def _load(name: str) -> Backend | str:
    """The Backend, or the reason its module cannot be imported."""
    if name in _loaded:
        return _loaded[name]
    try:
        mod = _import_backend_module(name)
    except Exception as exc:  # ImportError, or a broken build raising OSError
        _loaded[name] = f"cannot import the {name} backend: {type(exc).__name__}: {exc}"
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

    Called when the package is imported: ``torch.compile`` cannot trace an import, so a first call of the loss inside a compiled region
    must find every backend already loaded.
    """
    for name in BACKEND_NAMES:
        _load(name)


def importable(name: str) -> bool:
    """True if the backend's module imports here (see :func:`available_backends` for why not)."""
    return not isinstance(_load(name), str)


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

