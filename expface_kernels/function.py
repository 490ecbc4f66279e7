"""The ONE torch.autograd.Function every backend runs under.

Forward:
  1. normalise x (B×D, cheap) — the primitives only ever see x̂;
  2. prologue on B numbers: the target cosine c_iy (a gathered dot product), then
     target_logit = s·ψ(c_iy) and target_factor = ∂z_iy/∂c_iy (margins.py); steps 1-2
     are two ops of the extension where it is built (prologue.py), else PyTorch ops;
  3. the class loop: the backend's ``lse_partials`` over the block, merged across ranks
     with all-reduce MAX/SUM when a process group is given; or, on one device with
     gradients needed and reduction mean/sum, the backend's ``fused_forward_grads``,
     which forms the gradients in the same pass (3 GEMMs instead of 4);
  4. loss_i = lse_i − target_logit_i, zero on ignored rows, reduced as F.cross_entropy.
Backward:
  target_grad = grad_row·target_factor·expm1(target_logit − lse) (B numbers, here, so
  kernels need neither the margin nor expm1), the backend's ``grads``, then x's
  normalisation chained by hand (prologue.normalize_backward).

The class block is ``[offset, offset + C_local)``; with ``group`` set the returned
embedding gradient is this rank's block's contribution (the caller's all-gather sums
the ranks' contributions in its backward).

Under ``torch.autocast`` (see :func:`autocast_operand_dtype`) x̂ enters the class loop in
the autocast dtype; everything else runs as without autocast, which the Function turns
off inside (so that no backend's own matmuls are recast by it).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import prologue
from .contract import Backend
from .margins import MARGINS, MarginParam


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def autocast_operand_dtype(x: Tensor, w: Tensor) -> Optional[torch.dtype]:
    """The dtype x̂ takes in the class loop under an enabled ``torch.autocast``, or None.

    Inside ``torch.autocast(x.device.type)`` an fp16/bf16/fp32 x̂ -- normalised in x's own
    dtype -- is cast to the autocast dtype before the class loop: what autocast does to
    the GEMM of ``F.linear(F.normalize(x), F.normalize(W))`` in insightface's heads, and
    what makes an fp32 model under autocast take the fast mixed path (16-bit x̂ with the
    fp32 W, cast tile by tile on a GPU; no C×D copy of W, which autocast's F.linear would
    make). W is used as stored; the target cosine is taken with the rounded x̂, as every
    other cosine (so the gradient is that of the loss the forward computed); accumulation,
    the loss's dtype (fp32) and the gradients' dtypes are as without autocast.

    None: autocast is off for this device type, x or w is float64 (which autocast leaves
    alone too), or x already has the autocast dtype.
    """
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or torch.float64 in (x.dtype, w.dtype):
        return None
    dtype = torch.get_autocast_dtype(dev)
    return None if x.dtype == dtype else dtype


def _autocast_off(device_type: str):
    """A context with autocast off for ``device_type``; a no-op context when it is off
    already (entering torch.autocast costs ~5 us of host time a call, 0.3 us the check)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the gradients through and raises when they are differentiated.

    What backward returns under create_graph=True, the only case in which the engine
    runs it in grad mode: ``torch.func.grad`` always passes it, so raising there would
    refuse first-order torch.func, and returning the kernel outputs as they are would let
    a gradient penalty silently lose this loss's second-order terms (the extension did so
    before). Tied to the Function's input ``anchor`` (which requires grad), the outputs
    are differentiable and differentiating them raises. (torch's ``once_differentiable``
    attaches its error only when grad_out requires grad, which a penalty's
    ``torch.autograd.grad(loss, x, create_graph=True)`` does not.)
    """

    @staticmethod
    def forward(anchor: Tensor, gx: Tensor, gw: Tensor):
        return gx.view_as(gx), gw.view_as(gw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "margin_softmax_loss: double backward is not supported: every backend's backward "
            "is hand-written (kernels, in-place PyTorch ops) and not itself differentiable")


class LossOptions(NamedTuple):
    """Everything but the tensors that the Function needs: one argument of it.

    A NamedTuple, not a dataclass: Dynamo builds and reads one inside a compiled region
    (torch.compile(fullgraph=True), dynamic=True: ``s`` may arrive as a symbolic float).
    """

    backend: Backend
    """Already resolved by backends.select_backend for these tensors."""
    margin: str
    """A margins.MARGINS name."""
    m: MarginParam
    """The margin's parameter, resolved (margins.resolve_margin)."""
    s: float
    margin_grad: str
    reduction: str
    ignore_index: int
    offset: int = 0
    """The block's first class: the block is ``[offset, offset + C_local)``."""
    group: object = None
    """A process group whose ranks hold the other blocks, or None."""
    operand_dtype: Optional[torch.dtype] = None
    """x̂'s dtype in the class loop when not x's: under autocast, autocast_operand_dtype."""


class MarginSoftmaxFunction(torch.autograd.Function):
    """Margin-softmax cross-entropy over one class block (see the module docstring).

    ``apply(x, w, labels, opts, need_grad)``: x (B, D) and w (C_local, D) float, labels
    (B,) int; ``opts`` a :class:`LossOptions`; ``need_grad`` whether gradients will be
    asked for (see :func:`margin_softmax`, the usual way in). forward returns the loss
    first, then what backward needs (none of it differentiable); forward / setup_context
    are apart so that ``torch.func.grad`` (first order) and torch.compile take the Function.
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor, labels: Tensor, opts: LossOptions, need_grad: bool):
        # Autocast off inside: the class loop's dtypes are decided by operand_dtype (see
        # autocast_operand_dtype), not by autocast re-casting some backends' matmuls.
        # Before, CPU autocast turned the chunked and reference backends' logits into bf16
        # (loss error 3.9e-5 against the extension's 2.8e-8; B=16, C=300, D=64, fp32).
        with _autocast_off(x.device.type):
            return MarginSoftmaxFunction._forward(x, w, labels, opts, need_grad)

    @staticmethod
    def _forward(x: Tensor, w: Tensor, labels: Tensor, opts: LossOptions, need_grad: bool):
        be, s, offset, group, reduction = opts.backend, opts.s, opts.offset, opts.group, opts.reduction
        # Prologue (one op each with the extension built, see prologue.py): x̂, the cleaned
        # labels and c_iy from x̂ and the gathered centre (zero where the label is in
        # another rank's block, so that a SUM all-reduce assembles it), then the margin.
        # x̂ in the class loop's operand dtype, x's or autocast's: rounded once from the
        # x̂ formed in x's dtype, and the target cosine taken with it, as the loop's are.
        x_hat, x_inv, labels, kept, c_t = prologue.target_cosine(x, w, labels, offset, opts.ignore_index,
                                                                 opts.operand_dtype)
        c_t = _all_reduce(c_t, dist.ReduceOp.SUM, group)
        target_logit, target_factor = prologue.target_terms(c_t, MARGINS[opts.margin], opts.m, s,
                                                            opts.margin_grad)

        n_kept = kept.sum()
        if reduction == "mean":
            # Every row ignored: the loss is 0/0 = NaN below and the gradients are 0, as
            # F.cross_entropy's (its backward gives ignored rows 0 whatever the count); a
            # NaN gradient would reach the weights through the optimiser step.
            grad_row = kept / n_kept.clamp_min(1)
        else:
            grad_row = kept
        fused = (need_grad and group is None and reduction != "none"
                 and be.fused_forward_grads is not None
                 and x.device.type in be.fused_device_types)
        gx_hat = gw = None
        if fused:
            lse, gx_hat, gw, w_inv = be.fused_forward_grads(
                x_hat, w, target_logit, target_factor, labels, grad_row, s)
        else:
            if w.shape[0] == 0:  # no column (a sharded rank): the neutral partials (max −inf, sum 0)
                row_max = torch.full_like(target_logit, float("-inf"))
                row_sumexp = torch.zeros_like(target_logit)
                w_inv = torch.empty(0, dtype=c_t.dtype, device=w.device)
            else:
                row_max, row_sumexp, w_inv = be.lse_partials(x_hat, w, target_logit, labels, s, offset)
            if group is not None:
                gmax = _all_reduce(row_max.clone(), dist.ReduceOp.MAX, group)
                row_sumexp = _all_reduce(row_sumexp * torch.exp(row_max - gmax), dist.ReduceOp.SUM, group)
                row_max = gmax
            lse = row_max + torch.log(row_sumexp)

        loss_rows = torch.where(kept > 0, lse - target_logit, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss_rows
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / n_kept
        return (loss, x_inv, x_hat, w_inv, labels, lse, target_logit, target_factor, grad_row,
                gx_hat, gw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, opts, need_grad = inputs
        (_, x_inv, x_hat, w_inv, labels, lse, target_logit, target_factor, grad_row,
         gx_hat, gw) = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        ctx.set_materialize_grads(False)
        ctx.opts = opts
        # The fused pass's gradients live on ctx, not in save_for_backward: backward
        # takes them out and scales them in place, so that autograd can hand grad_w to
        # w.grad without a copy (a saved tensor stays referenced, and AccumulateGrad then
        # clones it: one extra weight-sized buffer, 2x the weight's gradient in all).
        ctx.fused = gx_hat is not None
        ctx.fused_grads = [gx_hat, gw] if ctx.fused else None
        if need_grad:
            # Enough to recompute the gradients should backward run a second time.
            ctx.save_for_backward(x, x_inv, x_hat, w, w_inv, labels, lse, target_logit,
                                  target_factor, grad_row)

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], *_):
        # Grads are not materialised (setup_context): the outputs after the loss are not
        # differentiable, and zeros for them would cost a weight-sized buffer for gw.
        if grad_out is None:  # the loss got no gradient (torch.autograd.grad of a sibling)
            return None, None, None, None, None
        # On CPU the engine runs this on the caller's thread, inside its autocast if any;
        # in grad mode only for create_graph=True (see _NoDoubleBackward).
        create_graph = torch.is_grad_enabled()
        # Unpacked once: torch.utils.checkpoint (non-reentrant) refuses a second unpack.
        saved = ctx.saved_tensors
        with torch.no_grad(), _autocast_off(grad_out.device.type):
            gx, gw = MarginSoftmaxFunction._backward(ctx, saved, grad_out)
        if create_graph:
            x, w = saved[0], saved[3]
            gx, gw = _NoDoubleBackward.apply(x if x.requires_grad else w, gx, gw)
        return gx, gw, None, None, None

    @staticmethod
    def _backward(ctx, saved: tuple[Tensor, ...], grad_out: Tensor):
        (x, x_inv, x_hat, w, w_inv, labels, lse, target_logit, target_factor, grad_row) = saved
        if ctx.fused:
            if ctx.fused_grads is not None:
                gx_hat, gw = ctx.fused_grads
                ctx.fused_grads = None
            else:  # a second backward (retain_graph): the same pass again, same bits
                _, gx_hat, gw, _ = ctx.opts.backend.fused_forward_grads(
                    x_hat, w, target_logit, target_factor, labels, grad_row, ctx.opts.s)
            # The fused pass used grad_row = 1/N (mean) or 1 (sum): exact up to this scale.
            gx_hat = gx_hat.mul_(grad_out)
            gw = gw.mul_(grad_out)
        else:
            grad_row = grad_row * grad_out  # (B,) for 'none', a scalar broadcast otherwise
            target_grad = grad_row * target_factor * torch.expm1(target_logit - lse)
            if w.shape[0] == 0:
                gx_hat = torch.zeros(x_hat.shape, dtype=lse.dtype, device=x_hat.device)
                gw = torch.zeros_like(w)
            else:
                gx_hat, gw = ctx.opts.backend.grads(x_hat, w, w_inv, labels, lse, target_grad,
                                                    grad_row, ctx.opts.s, ctx.opts.offset)
        return prologue.normalize_backward(x, x_inv, gx_hat), gw


def margin_softmax(x: Tensor, w: Tensor, labels: Tensor, opts: LossOptions) -> Tensor:
    """The loss over one class block through :class:`MarginSoftmaxFunction`.

    Args:
        x: (B, D) float embeddings; w: (C_local, D) float centres of the block
            ``[opts.offset, opts.offset + C_local)``; labels: (B,) int32/int64, already
            validated.
        opts: the backend (resolved for these tensors) and the loss's options.
    Returns:
        The loss in the accumulation dtype ((B,) for ``reduction="none"``).
    """
    # Whether gradients are needed, decided here: forward has no ctx (setup_context), and
    # needs_input_grad is True under torch.no_grad() too, where an eval-mode call would
    # form (and keep) the fused pass's gradients for nothing.
    need_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    return MarginSoftmaxFunction.apply(x, w, labels, opts, need_grad)[0]
