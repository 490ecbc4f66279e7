"""nn.Module wrappers that own the class centres."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backends
from .api import FLOAT_DTYPES, margin_softmax_loss, validate_options
from .margins import MARGINS, resolve_margin

INIT_STD = 0.01
"""weight ~ N(0, 0.01²), insightface's Partial FC initialisation. Only the direction of
each row matters to the loss (rows are normalised); a small scale keeps weight decay
and the normalisation's 1/‖W‖ gradient factor in the range insightface trains with."""


def _is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_head_arguments(num_classes, embedding_size, margin, m, s, margin_grad, reduction,
                         ignore_index, backend, dtype):
    """Every constructor argument check shared by the loss heads (this module's and
    distributed.ShardedMarginSoftmaxLoss): a bad keyword raises when the head is built,
    with the message the loss call would give. Returns resolve_margin's (spec, m)."""
    if not _is_positive_int(num_classes):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not _is_positive_int(embedding_size):
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    backends.check_backend_name(backend)
    validate_options(s, margin_grad, reduction, ignore_index)
    return resolve_margin(margin, m)


class MarginSoftmaxLoss(nn.Module):
    """Margin-softmax loss head owning ``weight`` of shape (num_classes, embedding_size).

    ``forward(embeddings (B, D), labels (B,)) -> loss``; keywords as
    :func:`expface_kernels.margin_softmax_loss`. ``weight`` is initialised from
    N(0, 0.01²) (see INIT_STD); pass ``device``/``dtype`` to place it.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: str = "expface", *,
                 s: float = 64.0, m=None, margin_grad: str = "exact", reduction: str = "mean",
                 ignore_index: int = -1, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        _, self.m = check_head_arguments(num_classes, embedding_size, margin, m, s, margin_grad,
                                         reduction, ignore_index, backend, dtype)
        self.margin, self.s, self.margin_grad = margin, s, margin_grad
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, INIT_STD)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return margin_softmax_loss(embeddings, self.weight, labels, self.margin, s=self.s, m=self.m,
                                   margin_grad=self.margin_grad, reduction=self.reduction,
                                   ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return (f"num_classes={c}, embedding_size={d}, margin={self.margin!r}, s={self.s}, "
                f"m={self.m}, margin_grad={self.margin_grad!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")


def _margin_head(name: str, margin: str, formula: str) -> type:
    """A MarginSoftmaxLoss subclass fixed to one margin, whose ``m`` defaults to the
    margin's default in margins.MARGINS: ``Name(num_classes, embedding_size, s=64.0,
    m=default, **kw)``, keywords as :class:`MarginSoftmaxLoss`."""
    default_m = MARGINS[margin].default

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = default_m, **kw):
        MarginSoftmaxLoss.__init__(self, num_classes, embedding_size, margin, s=s, m=m, **kw)

    doc = f"{name[:-4]} head (s=64, m={default_m}): target logit {formula}."
    __init__.__qualname__ = f"{name}.__init__"
    return type(name, (MarginSoftmaxLoss,), {"__init__": __init__, "__doc__": doc,
                                             "__module__": __name__, "__qualname__": name})


ExpFaceLoss = _margin_head("ExpFaceLoss", "expface", "s·cos(π·(θ/π)^m)")
ArcFaceLoss = _margin_head("ArcFaceLoss", "arcface", "s·cos(θ + m)")
CosFaceLoss = _margin_head("CosFaceLoss", "cosface", "s·(cos θ − m)")
SphereFaceLoss = _margin_head("SphereFaceLoss", "sphereface", "s·((−1)^k cos(mθ) − 2k) (SphereFace-R)")
