"""Public functions: argument checks, backend dispatch, the autograd.Function call."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .function import LossOptions, autocast_operand_dtype, margin_softmax
from .margins import MARGIN_GRADS, MARGINS, is_finite_number, resolve_margin

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("mean", "sum", "none")


def _check_float_2d(t, name: str, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got shape {tuple(t.shape)}")


def label_errors(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B,) bool, on labels' device: True where a label lies outside [0, num_classes) and
    is not ignore_index. No sync."""
    return ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)


def raise_label_errors(bad: Tensor, labels: Tensor, num_classes: int, ignore_index: int,
                       name: str = "labels") -> None:
    """Raise ValueError naming the first bad label, if any (one device→host bool copy)."""
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(labels[i])} is outside [0, {num_classes}) "
                         f"and is not ignore_index={ignore_index}")


def check_labels(labels: Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Raise ValueError if a label lies outside [0, num_classes) and is not ignore_index.

    On CUDA tensors this costs one device→host copy of a bool (the only sync of a
    step): DESIGN §2 asks for an exception rather than a device-side assert. Inside
    torch.compile it becomes an asynchronous assert (no graph break).
    """
    bad = label_errors(labels, num_classes, ignore_index)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{name} must lie in [0, {num_classes}) or equal ignore_index")
        return
    raise_label_errors(bad, labels, num_classes, ignore_index, name)


def validate_options(s, margin_grad, reduction, ignore_index) -> None:
    """The scalar keywords' checks of DESIGN §2: per call (validate_inputs) and when a
    loss head is built, so that a bad keyword raises at construction, not at step one."""
    if not (is_finite_number(s) and s > 0):
        raise ValueError(f"s must be a finite number > 0, got {s!r}")
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"margin_grad must be one of {list(MARGIN_GRADS)}, got {margin_grad!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    # numbers.Integral takes numpy ints too (reached only when not an int: see
    # margins.is_finite_number on why Dynamo must not see it for ints).
    if not (isinstance(ignore_index, int) or isinstance(ignore_index, numbers.Integral)) \
            or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def validate_inputs(embeddings, weight, labels, s, margin_grad, reduction, ignore_index,
                    num_classes: Optional[int] = None,
                    defer_labels: bool = False) -> Optional[Tensor]:
    """Every input check of DESIGN §2 except the margin's (margins.resolve_margin).

    ``num_classes`` is the range of valid labels (default weight.shape[0]; the sharded
    loss passes the global count). ``defer_labels``: for CUDA labels outside
    torch.compile, return the :func:`label_errors` mask instead of checking it here; the
    caller passes it to :func:`raise_label_errors` once its kernels are queued (the one
    sync then waits for them, instead of idling the GPU while the host queues them).
    Returns that mask, or None when the labels were checked here.
    """
    _check_float_2d(embeddings, "embeddings", "(B, D)")
    _check_float_2d(weight, "weight", "(C, D)")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    b, d = embeddings.shape
    if b == 0:
        raise ValueError("embeddings must have at least one row, got shape (0, D)")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (row), got shape (0, D)")
    if weight.shape[1] != d:
        raise ValueError(f"weight must have D={d} columns like embeddings (B, D)={tuple(embeddings.shape)}, "
                         f"got weight shape {tuple(weight.shape)}")
    if d == 0:
        raise ValueError("embeddings must have D >= 1 features")
    if labels.shape != (b,):
        raise ValueError(f"labels must have shape (B,)=({b},), got {tuple(labels.shape)}")
    if weight.device != embeddings.device:
        raise ValueError(f"weight is on {weight.device} but embeddings are on {embeddings.device}")
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but embeddings are on {embeddings.device}")
    validate_options(s, margin_grad, reduction, ignore_index)
    n = weight.shape[0] if num_classes is None else num_classes
    if defer_labels and labels.is_cuda and not torch.compiler.is_compiling():
        return label_errors(labels, n, ignore_index)
    check_labels(labels, n, ignore_index)
    return None


def margin_softmax_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: str = "expface",
                        *, s: float = 64.0, m=None, margin_grad: str = "exact",
                        reduction: str = "mean", ignore_index: int = -1,
                        backend: str = "auto") -> Tensor:
    """Margin-softmax cross-entropy without materialising the B×C logits.

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64.
        weight: (C, D) class centres (nn.Linear layout); its dtype may differ from
            the embeddings' (fp16 embeddings with fp32 weight is common).
        labels: (B,) int64 or int32 in [0, C), or ``ignore_index``.
        margin: ``"expface"``, ``"arcface"``, ``"cosface"``, ``"sphereface"``,
            ``"combined"`` or ``"none"`` (DESIGN §1).
        s: the scale (> 0). m: the margin's parameter (float; ``(m1, m2, m3)`` for
            ``"combined"``); None takes the margin's default.
        margin_grad: ``"exact"`` (true ψ', evaluated at an angle clamped into
            [1e-3, π − 1e-3]) or ``"straight_through"`` (∂z_y/∂c_y = s, the
            insightface / ExpFace-authors training recipe).
        reduction, ignore_index: as ``F.cross_entropy``.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"`` or ``"extension"``.

    Returns:
        float32 loss (float64 when an input is float64): a scalar, or (B,) for
        ``reduction="none"``. Gradients have their inputs' dtypes.

    Under ``torch.autocast`` for the inputs' device, the normalised embeddings enter
    the class loop's GEMMs in the autocast dtype (the weight as stored, cast tile by
    tile); accumulation and the loss stay fp32 (function.autocast_operand_dtype).
    """
    spec, mv = resolve_margin(margin, m)
    bad = validate_inputs(embeddings, weight, labels, s, margin_grad, reduction, ignore_index,
                          defer_labels=True)
    x = embeddings.contiguous()
    w = weight.contiguous()
    operand_dtype = autocast_operand_dtype(x, w)
    be = backends.select_backend(backend, x, w, x_dtype=operand_dtype)
    # Bad labels are memory-safe in every backend (they are only compared with class
    # columns, and the target gather clamps its index), so on CUDA the loss is queued
    # first and the labels checked after: the check's sync then waits for the loss's
    # kernels instead of draining the queue before the host has issued them (in training,
    # the backbone's work ahead of the loss keeps the GPU busy meanwhile). On an H200
    # (triton, B=512, C=2^20, bf16, the loss alone): forward 3.6 ms of GPU time with the
    # check first, 2.0 ms of it the class kernel; step 10.75 -> 10.09 ms in
    # `python -m bench.run profile --parts split`, 9.78 vs 9.91 ms in the sweep (within its noise).
    opts = LossOptions(be, spec.name, mv, float(s), margin_grad, reduction, int(ignore_index),
                       operand_dtype=operand_dtype)
    loss = margin_softmax(x, w, labels.contiguous(), opts)
    if bad is not None:
        raise_label_errors(bad, labels, weight.shape[0], ignore_index)
    return loss


def expface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 64.0,
                 m: float = MARGINS["expface"].default, **kwargs) -> Tensor:
    """ExpFace: target logit s·cos(π·(θ/π)^m). Same keywords as :func:`margin_softmax_loss`."""
    return margin_softmax_loss(embeddings, weight, labels, "expface", s=s, m=m, **kwargs)
