"""What the benchmark measures: the library's backends and its peers, behind one interface.

Every candidate turns the same inputs ``x`` (B, D), ``w`` (C, D), ``y`` (B,) into a
:class:`Prepared` closure that computes the mean loss, plus the leaf tensors whose
gradients the fwd+bwd measurement produces. A candidate that cannot run here has a
reason instead (printed by the runner, never silently dropped).

Library backends (``ek.margin_softmax_loss(..., backend=NAME)``):
    ``reference``, ``chunked``, ``triton`` (never timed on CPU: there it runs only in
    the interpreter, whose timings mean nothing), ``extension``.

Peers:
    ``naive``          the loss as a user writes it, eager, in the inputs' dtype:
                       F.normalize both, the (B, C) cosine GEMM, the margin on the gathered
                       target cosine (autograd through ψ: the exact gradient),
                       F.cross_entropy. It is ``ek.reference_loss`` with ``compute_dtype``
                       = the promoted dtype of x and W (bf16 inputs: bf16 math; fp16 x with
                       an fp32 W: fp32, as ``x @ W.t()`` would need). Why the inputs' dtype
                       and not fp32: a user with bf16 tensors gets bf16 logits from
                       F.linear, and that is the loss they would replace.
    ``naive_compile``  ``torch.compile(naive, dynamic=False)``: one graph specialised to
                       each shape and dtype, what a training loop with fixed B, C, D
                       compiles; compilation happens in the warm-up and is never timed.
    ``pml``            pytorch-metric-learning's ArcFaceLoss / CosFaceLoss (margins
                       arcface, cosface; it owns W as (D, C), so it gets a transposed copy).
    ``torch_lce``      ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``
                       (torch's own chunked path) on ŵ and s·x̂ — margin ``none``.
    ``liger``, ``cce`` Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy,
                       GPU only, margin ``none``, fed s·x̂ and ŵ (normalisation included
                       in the timed call so that all candidates compute the same loss).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import expface_kernels as ek
from expface_kernels.margins import MARGINS, resolve_margin

LIBRARY_BACKENDS = ("reference", "chunked", "triton", "extension")
PEERS = ("naive", "naive_compile", "pml", "torch_lce", "liger", "cce")
ALL_CANDIDATES = LIBRARY_BACKENDS + PEERS
ALL_MARGINS = tuple(MARGINS)  # the library's order: expface first


@dataclass
class Prepared:
    """A ready-to-call loss: ``loss_fn()`` returns the scalar mean loss.

    ``leaves`` are the tensors whose ``.grad`` a fwd+bwd run fills (the runner sets them
    to None before each run, as ``zero_grad(set_to_none=True)`` does).
    """

    loss_fn: Callable[[], Tensor]
    leaves: list
    margin: str


@dataclass
class Candidate:
    """One measurable implementation.

    ``margins``: the margins it computes (None: every library margin). ``prepare``
    builds a :class:`Prepared` for given inputs and margin.
    """

    name: str
    kind: str  # "library" or "peer"
    margins: Optional[tuple]
    prepare: Callable[..., Prepared]
    note: str = ""
    state: dict = field(default_factory=dict)

    def margin_for(self, wanted: str) -> str:
        """``wanted`` if this candidate computes it, else its own first margin."""
        if self.margins is None or wanted in self.margins:
            return wanted
        return self.margins[0]


def _leaves(*ts: Tensor) -> list:
    return [t for t in ts if t.requires_grad]


# --- library backends ---------------------------------------------------------------

def _library(name: str) -> Candidate:
    def prepare(x, w, y, margin, m, s):
        def loss_fn():
            return ek.margin_softmax_loss(x, w, y, margin, s=s, m=m, backend=name)
        return Prepared(loss_fn, _leaves(x, w), margin)
    return Candidate(name, "library", None, prepare, f"ek.margin_softmax_loss(backend={name!r})")


# --- the naive loss and its compiled twin -------------------------------------------

def naive_loss(x: Tensor, w: Tensor, y: Tensor, margin: str = "expface", m=None, s: float = 64.0) -> Tensor:
    """The naive eager loss: materialises the (B, C) logits in the inputs' promoted dtype.

    x (B, D), w (C, D) float; y (B,) int. Returns the scalar mean loss in that dtype.
    """
    return ek.reference_loss(x, w, y, margin, s=s, m=m,
                             compute_dtype=torch.promote_types(x.dtype, w.dtype))


def _naive() -> Candidate:
    def prepare(x, w, y, margin, m, s):
        return Prepared(lambda: naive_loss(x, w, y, margin, m, s), _leaves(x, w), margin)
    return Candidate("naive", "peer", None, prepare,
                     "eager, inputs' dtype: F.normalize, x̂ŵᵀ, psi, F.cross_entropy")


# Every (margin, shape, dtype) the benchmark compiles is a recompilation of the same code
# object; torch's default limit (8) would silently fall back to eager past the gpu
# preset's 4 class counts x 2 dtypes (and the margin sweep's margins).
_RECOMPILE_LIMIT = 64


def _naive_compile() -> Candidate:
    cache: dict = {}
    import torch._dynamo.config as dynamo_config
    for knob in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, knob, _RECOMPILE_LIMIT) < _RECOMPILE_LIMIT:
            setattr(dynamo_config, knob, _RECOMPILE_LIMIT)

    def prepare(x, w, y, margin, m, s):
        key = (margin, m, s)
        if key not in cache:
            def f(x, w, y):
                return naive_loss(x, w, y, margin, m, s)
            # dynamic=False: a training loop has fixed B, C, D, so the graph a user's
            # torch.compile runs there is the static one; the benchmark's cost is one
            # compilation per shape in its warm-up round.
            cache[key] = torch.compile(f, dynamic=False)
        fn = cache[key]
        return Prepared(lambda: fn(x, w, y), _leaves(x, w), margin)
    return Candidate("naive_compile", "peer", None, prepare, "torch.compile(naive, dynamic=False)")


# --- pytorch-metric-learning ---------------------------------------------------------

def _pml() -> Candidate | str:
    try:
        losses = importlib.import_module("pytorch_metric_learning.losses")
    except Exception as exc:
        return f"pytorch-metric-learning is not installed ({type(exc).__name__}); pip install pytorch-metric-learning"

    def prepare(x, w, y, margin, m, s):
        c, d = w.shape
        if margin == "arcface":
            mv = resolve_margin("arcface", m)[1]
            mod = losses.ArcFaceLoss(c, d, margin=math.degrees(mv), scale=s)  # pml takes degrees
        elif margin == "cosface":
            mv = resolve_margin("cosface", m)[1]
            mod = losses.CosFaceLoss(c, d, margin=mv, scale=s)
        else:
            raise ValueError(f"pml has no {margin!r} margin")
        mod = mod.to(device=w.device)
        # pml owns its centres as W (D, C): give it a copy of ours in that layout.
        mod.W = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        return Prepared(lambda: mod(x, y), _leaves(x, mod.W), margin)
    return Candidate("pml", "peer", ("arcface", "cosface"), prepare,
                     "pytorch_metric_learning.losses.ArcFaceLoss/CosFaceLoss")


# --- torch's own fused linear cross-entropy -------------------------------------------

def _torch_lce() -> Candidate | str:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    opts = torch.nn.LinearCrossEntropyOptions()

    def prepare(x, w, y, margin, m, s):
        def loss_fn():
            return F.linear_cross_entropy(s * F.normalize(x, dim=1), F.normalize(w, dim=1), y,
                                          options=opts)
        return Prepared(loss_fn, _leaves(x, w), "none")
    return Candidate("torch_lce", "peer", ("none",), prepare,
                     "F.linear_cross_entropy(s*x_hat, w_hat, options=LinearCrossEntropyOptions())")


# --- GPU-only fused linear cross-entropies ----------------------------------------------

def _liger(device: torch.device) -> Candidate | str:
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        mod = importlib.import_module("liger_kernel.transformers")
        lce = mod.LigerFusedLinearCrossEntropyLoss()
    except Exception as exc:
        return f"liger-kernel is not installed ({type(exc).__name__}: {exc})"

    def prepare(x, w, y, margin, m, s):
        def loss_fn():
            return lce(F.normalize(w, dim=1), s * F.normalize(x, dim=1), y)
        return Prepared(loss_fn, _leaves(x, w), "none")
    return Candidate("liger", "peer", ("none",), prepare, "LigerFusedLinearCrossEntropyLoss(w_hat, s*x_hat)")


def _cce(device: torch.device) -> Candidate | str:
    if device.type != "cuda":
        return "Cut Cross-Entropy runs on CUDA only"
    try:
        mod = importlib.import_module("cut_cross_entropy")
    except Exception as exc:
        return f"cut-cross-entropy is not installed ({type(exc).__name__}: {exc})"

    def prepare(x, w, y, margin, m, s):
        def loss_fn():
            return mod.linear_cross_entropy(s * F.normalize(x, dim=1), F.normalize(w, dim=1), y)
        return Prepared(loss_fn, _leaves(x, w), "none")
    return Candidate("cce", "peer", ("none",), prepare, "cut_cross_entropy.linear_cross_entropy(s*x_hat, w_hat)")


# --- resolution ------------------------------------------------------------------------

def resolve(names, device) -> tuple[dict, dict]:
    """Candidates by name for ``device``: ``(usable: name -> Candidate, skipped: name -> reason)``."""
    device = torch.device(device)
    usable, skipped = {}, {}
    avail = ek.available_backends(device)
    for name in names:
        if name not in ALL_CANDIDATES:
            raise ValueError(f"unknown backend/peer {name!r}; choose from {list(ALL_CANDIDATES)}")
        if name in LIBRARY_BACKENDS:
            if name == "triton" and device.type == "cpu":
                skipped[name] = "Triton on CPU runs only in the interpreter: its timings mean nothing"
                continue
            if avail.get(name) is not None:
                skipped[name] = avail[name]
                continue
            usable[name] = _library(name)
            continue
        made = {"naive": _naive, "naive_compile": _naive_compile, "pml": _pml,
                "torch_lce": _torch_lce}.get(name)
        cand = made() if made else (_liger(device) if name == "liger" else _cce(device))
        if isinstance(cand, str):
            skipped[name] = cand
        else:
            usable[name] = cand
    return usable, skipped

