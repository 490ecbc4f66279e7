"""nn.Module wrappers that own the class centres."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .api import margin_softmax_loss
from .margins import resolve_margin

INIT_STD = 0.01
"""weight ~ N(0, 0.01²), insightface's Partial FC initialisation. Only the direction of
each row matters to the loss (rows are normalised); a small scale keeps weight decay
and the normalisation's 1/‖W‖ gradient factor in the range insightface trains with."""


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
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        _, self.m = resolve_margin(margin, m)
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
                f"m={self.m}, margin_grad={self.margin_grad!r}, backend={self.backend!r}")


class ExpFaceLoss(MarginSoftmaxLoss):
    """ExpFace head (s=64, m=0.7): target logit s·cos(π·(θ/π)^m)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.7, **kw):
        super().__init__(num_classes, embedding_size, "expface", s=s, m=m, **kw)


class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace head (s=64, m=0.5): target logit s·cos(θ + m)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, **kw):
        super().__init__(num_classes, embedding_size, "arcface", s=s, m=m, **kw)


class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace head (s=64, m=0.35): target logit s·(cos θ − m)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, **kw):
        super().__init__(num_classes, embedding_size, "cosface", s=s, m=m, **kw)


class SphereFaceLoss(MarginSoftmaxLoss):
    """SphereFace-R head (s=64, m=1.7): target logit s·((−1)^k cos(mθ) − 2k)."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 1.7, **kw):
        super().__init__(num_classes, embedding_size, "sphereface", s=s, m=m, **kw)
