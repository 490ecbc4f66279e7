"""expface_kernels: fused, memory-flat margin-softmax cross-entropy (ExpFace, ArcFace, ...).

See README.md and docs/. Public API::

    margin_softmax_loss, expface_loss, available_backends,
    MarginSoftmaxLoss, ExpFaceLoss, ArcFaceLoss, CosFaceLoss, SphereFaceLoss
"""

from . import backends as _backends
from .api import expface_loss, margin_softmax_loss
from .backends import available_backends
from .margins import MARGINS, THETA_EPS
from .modules import ArcFaceLoss, CosFaceLoss, ExpFaceLoss, MarginSoftmaxLoss, SphereFaceLoss
from .reference import reference_loss

_backends.load_all()  # before any torch.compile region can call the loss (backends.load_all)

__version__ = "0.1.0"

__all__ = [
    "margin_softmax_loss", "expface_loss", "available_backends", "reference_loss",
    "MarginSoftmaxLoss", "ExpFaceLoss", "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss",
    "MARGINS", "THETA_EPS",
]
