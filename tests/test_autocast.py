"""The loss under ``torch.autocast`` (function.autocast_operand_dtype).

The rule: inside an enabled autocast for the inputs' device type, x̂ (normalised in
x's own dtype, then rounded once) enters the class loop -- the target cosine included --
in the autocast dtype; W is used as stored, and accumulation, the loss's dtype and the
gradients' dtypes are as without autocast -- on every backend alike. Before this rule
the chunked and reference backends had their matmuls recast by autocast (bf16 logits: a
loss error of 3.9e-5 against float64 where the extension, which ignored autocast, had
2.8e-8; B=16, C=300, D=64, fp32 inputs).
"""

import pytest
import torch
import torch.nn.functional as F

import expface_kernels as ek
from expface_kernels import prologue
from expface_kernels.distributed import ShardedMarginSoftmaxLoss
from expface_kernels.margins import resolve_margin

from util import ground_truth, loss_and_grads, make_inputs, max_rel_err

CPU_BACKENDS = [n for n, why in ek.available_backends("cpu").items() if why is None and n != "triton"]
AC = torch.bfloat16  # CPU autocast's default dtype


def autocast_truth(x, w, y, margin="expface", m=None, s=64.0, dtype=AC, reduction="mean",
                   ignore_index=-1):
    """float64 autograd of the rule above: (loss, grad_x, grad_w).

    x̂ is the fp32 x̂ rounded to ``dtype``, passed straight through for the gradient (a
    cast's backward).
    """
    spec, mv = resolve_margin(margin, m)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()

    def loss():
        xh = F.normalize(x64, dim=1)
        rounded = F.normalize(x.detach().float(), dim=1).to(dtype).double()
        xh_loop = xh + (rounded - xh).detach()
        wh = F.normalize(w64, dim=1)
        keep = y != ignore_index
        safe = torch.where(keep, y, torch.zeros_like(y)).long()
        c_t = (xh_loop * wh[safe]).sum(1)
        logits = (s * (xh_loop @ wh.t())).scatter(1, safe[:, None], (s * spec.psi(c_t, mv))[:, None])
        return F.cross_entropy(logits, y.long(), ignore_index=ignore_index, reduction=reduction)

    return loss_and_grads(loss, x64, w64)


def run(backend, x, w, y, **kw):
    return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, backend=backend, **kw), x, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prologue_ops", [True, False])
def test_cpu_autocast_rounds_x_hat_once_on_every_backend(backend, reduction, prologue_ops, monkeypatch):
    """prologue_ops: x̂ formed by the extension's op, or by the PyTorch code."""
    monkeypatch.setattr(prologue, "USE_EXTENSION", prologue_ops)
    x, w, y = make_inputs(16, 300, 64, dtype=torch.float32, seed=5, ignore=(3,))
    with torch.autocast("cpu", dtype=AC):
        got = run(backend, x, w, y, reduction=reduction)
    want = autocast_truth(x, w, y, reduction=reduction)
    plain = run(backend, x, w, y, reduction=reduction)
    assert got[0].dtype == torch.float32 and got[1].dtype == x.dtype and got[2].dtype == w.dtype
    for g, t, p, what in zip(got, want, plain, ("loss", "grad_x", "grad_w")):
        # measured 2e-8 .. 1.1e-6 on every backend; the fp32 run (no autocast) is 2.7e-5
        # (mean loss) .. 2.4e-3 (grad_w) away from this truth
        assert max_rel_err(g, t) <= 4e-6, (what, max_rel_err(g, t))
        assert max_rel_err(p, t) > 5 * 4e-6, (what, max_rel_err(p, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_backward_inside_the_region_is_the_same(backend):
    """On CPU the engine runs backward on the caller's thread, inside its autocast."""
    x, w, y = make_inputs(5, 70, 9, dtype=torch.float32, seed=1)
    with torch.autocast("cpu", dtype=AC):
        inside = run(backend, x, w, y)
        loss = ek.margin_softmax_loss(x, w, y, backend=backend)
    x.grad = w.grad = None
    loss.backward()
    for a, b in zip(inside, (loss.detach(), x.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float64),
                                             (AC, torch.float32)])
def test_cpu_autocast_leaves_float64_and_autocast_dtype_inputs_alone(backend, x_dtype, w_dtype):
    x, w, y = make_inputs(6, 40, 8, dtype=x_dtype, w_dtype=w_dtype, seed=2)
    plain = run(backend, x, w, y)
    with torch.autocast("cpu", dtype=AC):
        got = run(backend, x, w, y)
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_autocast_sharded_loss_matches_the_single_device_loss():
    x, w, y = make_inputs(8, 50, 16, dtype=torch.float32, seed=4)
    head = ShardedMarginSoftmaxLoss(50, 16, "expface", backend="chunked")
    with torch.no_grad():
        head.weight.copy_(w)
    with torch.autocast("cpu", dtype=AC):
        got = loss_and_grads(lambda: head(x, y), x, head.weight)
        want = run("chunked", x, w, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_cpu_autocast_compile_fullgraph(backend):
    """Inductor, like eager. (emulate_precision_casts: should x̂ be formed by PyTorch ops
    -- no extension -- Inductor would otherwise fuse its bf16 rounding away, and the
    chunked backend would see the fp32 x̂: 1.2e-4 off the rule's loss, 1.8e-3 off its
    gradients.)"""
    import torch._inductor.config as inductor_config

    x, w, y = make_inputs(5, 300, 8, dtype=torch.float32, seed=6)
    fn = torch.compile(lambda a, b, t: ek.margin_softmax_loss(a, b, t, backend=backend), fullgraph=True)
    # config.patch, not monkeypatch: pytest >= 9.2 undoes a setattr(raising=False) by
    # deleting the attribute, which hid this config entry from every later test
    with inductor_config.patch(emulate_precision_casts=True), torch.autocast("cpu", dtype=AC):
        got = loss_and_grads(lambda: fn(x, w, y), x, w)
    want = autocast_truth(x, w, y)
    for g, t, what in zip(got, want, ("loss", "grad_x", "grad_w")):
        assert max_rel_err(g, t) <= 2e-5, (what, max_rel_err(g, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["chunked", "triton", "extension"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_within_twice_the_low_precision_reference(backend, dtype):
    """fp32 x and W under CUDA autocast: the GEMMs take the 16-bit x̂ with the fp32 W
    (which the triton and extension backends cast tile by tile for the tensor cores):
    error vs float64 at most 2x that of the naive loss in that dtype (DESIGN §5), and
    fp32 outputs."""
    why = ek.available_backends("cuda")[backend]
    if why is not None:
        pytest.skip(why)
    x, w, y = make_inputs(64, 3000, 128, dtype=torch.float32, seed=7, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        got = run(backend, x, w, y)
    truth = ground_truth(x, w, y, "expface")
    xl, wl = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    yard = loss_and_grads(lambda: ek.reference_loss(xl, wl, y, compute_dtype=dtype), xl, wl)
    assert [t.dtype for t in got] == [torch.float32] * 3
    for g, t, r, what in zip(got, truth, yard, ("loss", "grad_x", "grad_w")):
        bound = 2 * max_rel_err(r, t) + 1e-6
        assert max_rel_err(g, t) <= bound, (what, max_rel_err(g, t), bound)
