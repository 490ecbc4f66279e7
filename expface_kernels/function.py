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
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, prologue
from .margins import MARGINS


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


class MarginSoftmaxFunction(torch.autograd.Function):
    """Margin-softmax cross-entropy over one class block (see the module docstring).

    Call it through :func:`margin_softmax` (which passes the grad mode); arguments there.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, labels: Tensor, backend: str, margin: str, m,
                s: float, margin_grad: str, reduction: str, ignore_index: int, offset: int,
                group, grad_enabled: bool, operand_dtype: Optional[torch.dtype]):
        # Autocast off inside: the class loop's dtypes are decided by operand_dtype (see
        # autocast_operand_dtype), not by autocast re-casting some backends' matmuls.
        # Before, CPU autocast turned the chunked and reference backends' logits into bf16
        # (loss error 3.9e-5 against the extension's 2.8e-8; B=16, C=300, D=64, fp32).
        with _autocast_off(x.device.type):
            return MarginSoftmaxFunction._forward(ctx, x, w, labels, backend, margin, m, s, margin_grad,
                                                  reduction, ignore_index, offset, group, grad_enabled,
                                                  operand_dtype)

    @staticmethod
    def _forward(ctx, x, w, labels, backend, margin, m, s, margin_grad, reduction, ignore_index,
                 offset, group, grad_enabled, operand_dtype):
        be = backends.loaded_backend(backend)
        # Prologue (one op each with the extension built, see prologue.py): x̂, the cleaned
        # labels and c_iy from x̂ and the gathered centre (zero where the label is in
        # another rank's block, so that a SUM all-reduce assembles it), then the margin.
        # x̂ in the class loop's operand dtype, x's or autocast's: rounded once from the
        # x̂ formed in x's dtype, and the target cosine taken with it, as the loop's are.
        x_hat, x_inv, labels, kept, c_t = prologue.target_cosine(x, w, labels, offset, ignore_index,
                                                                 operand_dtype)
        c_t = _all_reduce(c_t, dist.ReduceOp.SUM, group)
        target_logit, target_factor = prologue.target_terms(c_t, MARGINS[margin], m, s, margin_grad)

        n_kept = kept.sum()
        if reduction == "mean":
            # Every row ignored: the loss is 0/0 = NaN below and the gradients are 0, as
            # F.cross_entropy's (its backward gives ignored rows 0 whatever the count); a
            # NaN gradient would reach the weights through the optimiser step.
            grad_row = kept / n_kept.clamp_min(1)
        else:
            grad_row = kept
        # needs_input_grad is True under torch.no_grad() too: without grad_enabled an
        # eval-mode call would form (and keep) the fused pass's gradients for nothing.
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        fused = (need_grad and group is None and reduction != "none"
                 and be.fused_forward_grads is not None
                 and x.device.type in be.fused_device_types)
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

        ctx.backend, ctx.s, ctx.offset, ctx.group = backend, s, offset, group
        # The fused pass's gradients live on ctx, not in save_for_backward: backward
        # takes them out and scales them in place, so that autograd can hand grad_w to
        # w.grad without a copy (a saved tensor stays referenced, and AccumulateGrad then
        # clones it: one extra weight-sized buffer, 2x the weight's gradient in all).
        ctx.fused = fused
        ctx.fused_grads = [gx_hat, gw] if fused else None
        if need_grad:
            # Enough to recompute the gradients should backward run a second time.
            ctx.save_for_backward(x, x_inv, x_hat, w, w_inv, labels, lse, target_logit,
                                  target_factor, grad_row)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            # backward(create_graph=True): the engine runs this in grad mode only then. The
            # gradients below are kernel outputs, not differentiable: returned as they are,
            # a gradient penalty built on them would silently lose this loss's terms (the
            # extension returned them so; chunked / reference failed on an in-place op).
            raise RuntimeError(
                "margin_softmax_loss: double backward (create_graph=True) is not supported: "
                "every backend's backward is hand-written (kernels, in-place PyTorch ops) and "
                "not itself differentiable")
        # On CPU the engine runs this on the caller's thread, inside its autocast if any.
        with _autocast_off(grad_out.device.type):
            return MarginSoftmaxFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        (x, x_inv, x_hat, w, w_inv, labels, lse, target_logit, target_factor,
         grad_row) = ctx.saved_tensors
        if ctx.fused:
            if ctx.fused_grads is not None:
                gx_hat, gw = ctx.fused_grads
                ctx.fused_grads = None
            else:  # a second backward (retain_graph): the same pass again, same bits
                be = backends.loaded_backend(ctx.backend)
                _, gx_hat, gw, _ = be.fused_forward_grads(
                    x_hat, w, target_logit, target_factor, labels, grad_row, ctx.s)
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
                be = backends.loaded_backend(ctx.backend)
                gx_hat, gw = be.grads(x_hat, w, w_inv, labels, lse, target_grad, grad_row,
                                      ctx.s, ctx.offset)
        gx = prologue.normalize_backward(x, x_inv, gx_hat)
        return gx, gw, None, None, None, None, None, None, None, None, None, None, None, None


def margin_softmax(x: Tensor, w: Tensor, labels: Tensor, backend: str, margin: str, m, s: float,
                   margin_grad: str, reduction: str, ignore_index: int, offset: int = 0,
                   group=None, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The loss over one class block through :class:`MarginSoftmaxFunction`.

    Args:
        x: (B, D) float embeddings; w: (C_local, D) float centres of the block
            ``[offset, offset + C_local)``; labels: (B,) int32/int64, already validated.
        backend: a name already resolved by :func:`backends.select_backend`.
        margin, m: a margins.MARGINS name and its resolved parameter.
        group: a process group whose ranks hold the other blocks, or None.
        operand_dtype: x̂'s dtype in the class loop when not x's -- under autocast,
            :func:`autocast_operand_dtype`, which the backend was selected for.
    Returns:
        The loss in the accumulation dtype ((B,) for ``reduction="none"``).
    """
    return MarginSoftmaxFunction.apply(x, w, labels, backend, margin, m, s, margin_grad, reduction,
                                       ignore_index, offset, group, torch.is_grad_enabled(), operand_dtype)
