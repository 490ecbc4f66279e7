"""No B×C buffer in the chunked backend; the nn.Module heads."""

import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import expface_kernels as ek
from expface_kernels import chunked

from util import ground_truth, loss_and_grads, make_inputs


def largest_allocation(fn) -> int:
    """Bytes of the largest net CPU allocation of any single op while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_chunked_never_holds_b_by_c(monkeypatch):
    b, c, d = 64, 20000, 8
    monkeypatch.setattr(chunked, "TILE_BYTES", b * 512 * 4)
    x, w, y = make_inputs(b, c, d, dtype=torch.float32)
    logits_bytes = b * c * 4
    peak_ref = largest_allocation(lambda: ek.margin_softmax_loss(x, w, y, backend="reference").backward())
    peak = largest_allocation(lambda: ek.margin_softmax_loss(x, w, y, backend="chunked").backward())
    assert peak_ref >= logits_bytes  # the probe sees a B×C buffer where there is one
    # The largest buffers left are grad_w (C×D, the gradient itself) and one tile.
    # (+10%: the backward node also owns a few (B,) and (B, D) buffers.)
    assert peak <= 1.1 * max(c * d * 4, 4 * b * 512 * 4) < logits_bytes // 4, peak


@pytest.mark.parametrize("cls,margin,m", [
    (ek.ExpFaceLoss, "expface", 0.7), (ek.ArcFaceLoss, "arcface", 0.5),
    (ek.CosFaceLoss, "cosface", 0.35), (ek.SphereFaceLoss, "sphereface", 1.7),
])
def test_heads_match_function(cls, margin, m):
    torch.manual_seed(0)
    head = cls(23, 6, backend="chunked", dtype=torch.float64)
    assert head.weight.shape == (23, 6) and head.m == m and head.margin == margin
    assert 0.005 < float(head.weight.detach().std()) < 0.02  # N(0, 0.01²) initialisation
    x, _, y = make_inputs(5, 23, 6)
    loss, gx, gw = loss_and_grads(lambda: head(x, y), x, head.weight)
    want = ground_truth(x, head.weight, y, margin, m)
    for a, b in zip((loss, gx, gw), want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert margin in repr(head)


def test_head_repr_shows_every_option():
    head = ek.ArcFaceLoss(10, 4, reduction="sum", ignore_index=-100, margin_grad="straight_through")
    assert repr(head) == ("ArcFaceLoss(num_classes=10, embedding_size=4, margin='arcface', s=64.0, "
                          "m=0.5, margin_grad='straight_through', reduction='sum', ignore_index=-100, "
                          "backend='auto')")


def test_generic_head_combined_and_training_step():
    torch.manual_seed(0)
    head = ek.MarginSoftmaxLoss(50, 16, margin="combined", m=(1.0, 0.3, 0.2), backend="chunked")
    net = torch.nn.Linear(32, 16)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.5)
    x = torch.randn(64, 32)
    y = torch.randint(0, 50, (64,))
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = head(net(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_fused_pass_only_when_gradients_are_wanted(monkeypatch):
    """The fused forward (which forms the gradients) runs for a training step, never
    under torch.no_grad() or for reduction='none' (whose grad_output is per row)."""
    from expface_kernels import backends

    calls = []

    def fused(x_hat, w, target_logit, target_factor, labels, grad_row, s):
        calls.append(1)
        raise RuntimeError("fused pass used")

    plain = backends.get_backend("chunked")
    monkeypatch.setitem(backends._loaded, "chunked",
                        backends.Backend("chunked", plain.lse_partials, plain.grads,
                                         plain.unsupported_reasons, fused))
    x, w, y = make_inputs(3, 7, 4)
    with torch.no_grad():
        ek.margin_softmax_loss(x, w, y, backend="chunked")
    ek.margin_softmax_loss(x, w, y, backend="chunked", reduction="none").sum().backward()
    ek.margin_softmax_loss(x.detach(), w.detach(), y, backend="chunked")
    assert calls == []
    with pytest.raises(RuntimeError, match="fused pass used"):
        ek.margin_softmax_loss(x, w, y, backend="chunked")


@pytest.mark.skipif(ek.available_backends("cpu")["extension"] is not None,
                    reason="needs the extension (its CPU backend has the fused pass)")
def test_fused_weight_gradient_reaches_w_grad_without_a_copy(monkeypatch):
    """The fused pass's grad_w becomes w.grad itself (AccumulateGrad steals it): kept on
    ctx rather than saved, it has no second reference that would make autograd clone a
    weight-sized buffer."""
    from expface_kernels import backends

    plain = backends.get_backend("extension")
    made = []

    def fused(*args):
        out = plain.fused_forward_grads(*args)
        made.append(out[2].data_ptr())
        return out

    monkeypatch.setitem(backends._loaded, "extension",
                        dataclasses.replace(plain, fused_forward_grads=fused))
    x, w, y = make_inputs(5, 40, 8, dtype=torch.float32, ignore=(2,))
    ek.margin_softmax_loss(x, w, y, backend="extension").backward()
    assert len(made) == 1 and w.grad.data_ptr() == made[0]


@pytest.mark.parametrize("backend", [n for n, why in ek.available_backends("cpu").items() if why is None])
def test_head_under_torch_func_functional_call(backend):
    """torch.func.grad over functional_call(head, params, ...): the .backward() gradient."""
    head = ek.ArcFaceLoss(37, 8, backend=backend)
    x, _, y = make_inputs(5, 37, 8, dtype=torch.float32)
    x = x.detach()
    params = {k: v.detach() for k, v in head.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(head, p, (x, y)))(params)
    head(x, y).backward()
    assert torch.equal(got["weight"], head.weight.grad)
