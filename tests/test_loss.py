"""Every CPU backend against the float64 autograd reference (reference_loss).

Triton has its own file (tests/test_triton.py): under the CPU interpreter it is too slow
for this whole matrix.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import expface_kernels as ek
from expface_kernels import chunked

from util import MARGIN_CASES, ground_truth, loss_and_grads, make_inputs, max_rel_err

CPU_BACKENDS = [n for n, why in ek.available_backends("cpu").items() if why is None and n != "triton"]
SHAPES = [(1, 1, 1), (1, 5, 3), (3, 37, 7), (17, 130, 33), (8, 700, 5)]


def run(backend, x, w, y, margin="expface", m=None, **kw):
    return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, margin, m=m, backend=backend, **kw), x, w)


def assert_close_to_truth(got, truth, tol=1e-9, equal_nan=False):
    for a, b, what in zip(got, truth, ("loss", "grad_x", "grad_w")):
        assert a.dtype == b.dtype or what != "loss"
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, equal_nan=equal_nan, msg=what)


def test_cpu_backends_listed():
    assert {"reference", "chunked"} <= set(CPU_BACKENDS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("margin,m", MARGIN_CASES)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_margins_and_modes(backend, margin, m, margin_grad):
    x, w, y = make_inputs(6, 41, 9, ignore=(2,))
    got = run(backend, x, w, y, margin, m, margin_grad=margin_grad)
    assert_close_to_truth(got, ground_truth(x, w, y, margin, m, margin_grad=margin_grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b,c,d", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_and_reductions(backend, b, c, d, reduction):
    x, w, y = make_inputs(b, c, d, seed=b * c + d, ignore=(0,) if b > 2 else ())
    got = run(backend, x, w, y, reduction=reduction)
    assert_close_to_truth(got, ground_truth(x, w, y, "expface", reduction=reduction))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_chunks(backend, monkeypatch):
    """C spans several chunks, the last one partial; targets in every chunk."""
    monkeypatch.setattr(chunked, "TILE_BYTES", 5 * 8 * 256)  # 256 classes a chunk at B=5
    x, w, y = make_inputs(5, 256 * 3 + 77, 4)
    y[:4] = torch.tensor([0, 255, 256, 256 * 3 + 76])
    got = run(backend, x, w, y, "arcface")
    assert_close_to_truth(got, ground_truth(x, w, y, "arcface"))


@settings(max_examples=25, deadline=None)
# d >= 2: with D = 1 every cosine is ±1 up to an ulp, where θ = acos(c) amplifies the
# ulp that two equally right ways of computing c differ by to ~1e-8 (D = 1 is covered
# by SHAPES, at angles where that does not bite, and by the exact-hit test).
# Ignored rows: none, one, or all (mean: a NaN loss, zero gradients); ignore_index 0 is
# a valid class, which F.cross_entropy allows too.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(b=st.integers(1, 9), c=st.integers(1, 300), d=st.integers(2, 40),
       margin=st.sampled_from([m for m, _ in MARGIN_CASES]), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       margin_grad=st.sampled_from(["exact", "straight_through"]),
       s=st.sampled_from([1.0, 30.0, 64.0, 100.0]), ignored=st.sampled_from(["none", "one", "all"]),
       ignore_index=st.sampled_from([-1, -100, 0]),
       label_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_random_shapes(backend, b, c, d, margin, seed, reduction, margin_grad, s, ignored,
                       ignore_index, label_dtype):
    x, w, y = make_inputs(b, c, d, seed=seed, label_dtype=label_dtype)
    y[{"none": slice(0), "one": slice(b // 2, b // 2 + 1), "all": slice(None)}[ignored]] = ignore_index
    kw = dict(s=s, reduction=reduction, margin_grad=margin_grad, ignore_index=ignore_index)
    got = run(backend, x, w, y, margin, **kw)
    want = ground_truth(x, w, y.long(), margin, **kw)
    # Away from the derivative clamp the exact mode equals autograd of the formula; NaN only
    # as the loss of a mean over no rows.
    assert_close_to_truth(got, want, tol=1e-8, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("margin,m", MARGIN_CASES)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_gradcheck(backend, margin, m, margin_grad):
    """Finite differences of the forward against the backward, float64.

    Straight-through is by design not the derivative of its forward unless ψ' = 1
    (cosface, none); for the other margins its backward is checked against autograd of
    the surrogate (test_margins_and_modes, test_straight_through_equals_insightface_recipe)
    and here against the finite differences of the margin-free loss it must equal."""
    x, w, y = make_inputs(3, 11, 5, ignore=(1,))
    if margin_grad == "straight_through" and margin not in ("cosface", "none"):
        check_straight_through_by_finite_differences(backend, x, w, y, margin, m)
        return
    torch.autograd.gradcheck(
        lambda a, b: ek.margin_softmax_loss(a, b, y, margin, m=m, s=8.0, margin_grad=margin_grad,
                                            backend=backend),
        (x, w))


def check_straight_through_by_finite_differences(backend, x, w, y, margin, m, s=8.0):
    """ST gradient at (x, w) == the true gradient of the loss whose target logit is
    s·c_iy + δ_i with δ_i = s·(ψ(c_iy) − c_iy) frozen at (x, w). That loss is
    margin 'none' with a per-row additive shift, which F.cross_entropy expresses via a
    one-hot shifted logit matrix; its gradient comes from central finite differences."""
    spec, mv = ek.margins.resolve_margin(margin, m)
    with torch.no_grad():
        c = F.normalize(x) @ F.normalize(w).t()
        keep = y != -1
        c_t = c[torch.arange(len(y)), y.clamp_min(0)]
        delta = torch.where(keep, s * (spec.psi(c_t, mv) - c_t), torch.zeros_like(c_t))
        shift = torch.zeros_like(c).scatter(1, y.clamp_min(0).unsqueeze(1), delta.unsqueeze(1))

    def surrogate(a, b):
        logits = s * F.normalize(a) @ F.normalize(b).t() + shift
        return F.cross_entropy(logits, y, ignore_index=-1)

    a0, b0 = x.detach().clone(), w.detach().clone()
    _, gx, gw = run(backend, x, w, y, margin, m, s=s, margin_grad="straight_through")
    for t, got in ((a0, gx), (b0, gw)):
        num = torch.empty_like(t)
        for k in range(t.numel()):
            old = t.view(-1)[k].item()
            t.view(-1)[k] = old + 1e-6
            up = surrogate(a0, b0)
            t.view(-1)[k] = old - 1e-6
            down = surrogate(a0, b0)
            t.view(-1)[k] = old
            num.view(-1)[k] = (up - down) / 2e-6
        torch.testing.assert_close(got, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_reduction_none(backend):
    x, w, y = make_inputs(4, 9, 3)
    torch.autograd.gradcheck(
        lambda a, b: ek.margin_softmax_loss(a, b, y, "expface", s=4.0, reduction="none", backend=backend),
        (x, w))


# --- F.cross_entropy semantics ---------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_margin_none_is_cross_entropy(backend, reduction, ignore_index):
    """margin='none' is F.cross_entropy over s·cos, with ignore_index and reductions."""
    x, w, y = make_inputs(7, 13, 6)
    y[[1, 4]] = ignore_index
    logits = 30.0 * F.normalize(x.detach()) @ F.normalize(w.detach()).t()
    want = F.cross_entropy(logits, y, reduction=reduction, ignore_index=ignore_index)
    got = ek.margin_softmax_loss(x, w, y, "none", s=30.0, reduction=reduction,
                                 ignore_index=ignore_index, backend=backend)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_rows_have_zero_gradient(backend):
    x, w, y = make_inputs(5, 9, 4, ignore=(0, 3))
    _, gx, _ = run(backend, x, w, y)
    assert gx[[0, 3]].abs().max() == 0 and gx[[1, 2, 4]].abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction):
    """Every row ignored: as F.cross_entropy, a NaN loss for "mean" (0/0), 0 otherwise,
    and zero gradients in every case (a NaN there would reach the weights)."""
    x, w, y = make_inputs(3, 5, 4, ignore=(0, 1, 2))
    loss, gx, gw = run(backend, x, w, y, reduction=reduction)
    z = (x @ w.t()).detach().requires_grad_()
    want = F.cross_entropy(z, y, ignore_index=-1, reduction=reduction)
    want.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    torch.testing.assert_close(loss, want.detach(), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_labels(backend):
    x, w, y = make_inputs(6, 20, 5, label_dtype=torch.int32, ignore=(2,))
    got = run(backend, x, w, y)
    assert_close_to_truth(got, ground_truth(x, w, y.long(), "expface"))


# --- dtypes ----------------------------------------------------------------------------

LOW = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
       (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", LOW)
def test_low_precision_error_bound(backend, x_dtype, w_dtype):
    """Error vs float64 at most 2x that of the reference computed in the same low
    precision (DESIGN §5); output dtypes as the contract says."""
    x, w, y = make_inputs(16, 300, 64, dtype=x_dtype, w_dtype=w_dtype, seed=3, ignore=(5,))
    got = run(backend, x, w, y, s=32.0)
    truth = ground_truth(x, w, y, "expface", s=32.0)
    # "The same low precision" for mixed inputs is the lower one: what autocast would
    # run the naive loss in (fp16 x with fp32 W -> fp16).
    low = x_dtype if torch.finfo(x_dtype).bits < torch.finfo(w_dtype).bits else w_dtype
    xl, wl = x.detach().to(low).requires_grad_(), w.detach().to(low).requires_grad_()
    yard = loss_and_grads(lambda: ek.reference_loss(xl, wl, y, "expface", s=32.0, compute_dtype=low), xl, wl)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == x_dtype and got[2].dtype == w_dtype
    for g, t, r, what in zip(got, truth, yard, ("loss", "grad_x", "grad_w")):
        bound = 2 * max_rel_err(r, t) + 1e-6
        assert max_rel_err(g, t) <= bound, (what, max_rel_err(g, t), bound)


def check_fp16_small_rows(backend, reduction, device="cpu", w_dtype=torch.float16):
    """fp16 x against a W whose rows have norms ~3.4e-4 (entries near fp16's smallest
    normal, 6.1e-5): dL/dW_j grows as 1/‖W_j‖ -- to 7.9e3 here with reduction mean,
    6.3e4 with sum, just under fp16's 65504 -- and the naive fp16 loss's gradients stay
    finite. chunked and the extension gave NaN gradients here while their fp16 GEMMs took
    raw W (logits of size ‖W_j‖, G·1/‖W_j‖ past 65504); they take the normalised rows
    now (chunked._w_operand, ek_driver.cpp gemm_operand). Bound: finite, and within 2x
    the naive fp16 loss's error (as test_low_precision_error_bound)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, generator=g).half().to(device).requires_grad_()
    w = (torch.randn(37, 128, generator=g) * 3e-5).to(w_dtype).to(device).requires_grad_()
    y = torch.randint(0, 37, (8,), generator=g).to(device)
    got = run(backend, x, w, y, reduction=reduction)
    truth = ground_truth(x, w, y, "expface", reduction=reduction)
    assert truth[2].abs().max() > 1e3  # the regime the test is about: large dL/dW
    xl = x.detach().clone().requires_grad_()
    wl = w.detach().half().requires_grad_()  # "the same loss in fp16": W rounded as autocast would
    yard = loss_and_grads(lambda: ek.reference_loss(xl, wl, y, "expface", reduction=reduction,
                                                    compute_dtype=torch.float16), xl, wl)
    for gt, t, r, what in zip(got, truth, yard, ("loss", "grad_x", "grad_w")):
        assert torch.isfinite(r).all(), what  # the naive fp16 loss holds these gradients
        assert torch.isfinite(gt).all(), what
        bound = 2 * max_rel_err(r, t) + 1e-6
        assert max_rel_err(gt, t) <= bound, (what, max_rel_err(gt, t), bound)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp16_weight_with_small_rows(backend, reduction):
    check_fp16_small_rows(backend, reduction)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["chunked", "triton", "extension"])
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32], ids=["fp16_w", "fp32_w"])
def test_cuda_fp16_small_rows(backend, w_dtype):
    """On a GPU: also the mixed path (fp16 x, fp32 W), whose GEMMs run in fp16 there.
    Reduction mean only: with sum the gradients (6.3e4) sit within 4% of fp16's
    65504, where another device's rounding could overflow the naive yardstick itself."""
    check_fp16_small_rows(backend, "mean", "cuda", w_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_mixed_is_float64(backend):
    x, w, y = make_inputs(3, 7, 4, dtype=torch.float32, w_dtype=torch.float64)
    loss, gx, gw = run(backend, x, w, y)
    assert loss.dtype == torch.float64 and gx.dtype == torch.float32 and gw.dtype == torch.float64


# --- special values ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "w"])
def test_nonfinite_input_gives_nan_loss(backend, bad, where):
    x, w, y = make_inputs(4, 6, 3, dtype=torch.float32)
    with torch.no_grad():
        (x if where == "x" else w)[1, 2] = bad
    loss = ek.margin_softmax_loss(x, w, y, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("margin,m", MARGIN_CASES)
def test_zero_vectors_and_exact_hits_are_finite(backend, margin, m):
    """A zero embedding, a zero centre, and an embedding exactly on its centre (c = 1,
    where ψ' is singular) give a finite loss and finite gradients."""
    x, w, y = make_inputs(4, 6, 3, dtype=torch.float32)
    with torch.no_grad():
        x[0] = 0
        w[y[1]] = 0
        x[2] = w[y[2]] * 3.0
        x[3] = -w[y[3]]
    loss, gx, gw = run(backend, x, w, y, margin, m)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


# --- the training recipe of insightface / the ExpFace authors -------------------------------

def insightface_recipe(x, w, y, s, m):
    """Written independently of the library: normalise, linear, then the margin applied
    IN PLACE under torch.no_grad() on the target logits, as arcface_torch's
    CombinedMarginLoss and the ExpFace release do; then F.cross_entropy."""
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    idx = torch.where(y != -1)[0]
    with torch.no_grad():
        t = logits[idx, y[idx]]
        theta = torch.arccos(t)
        logits[idx, y[idx]] = torch.cos(math.pi * torch.pow(theta / math.pi, m))
    return F.cross_entropy(logits * s, y, ignore_index=-1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_straight_through_equals_insightface_recipe(backend):
    x, w, y = make_inputs(9, 50, 16, ignore=(4,))
    want = loss_and_grads(lambda: insightface_recipe(x, w, y, 64.0, 0.7), x, w)
    got = run(backend, x, w, y, "expface", 0.7, margin_grad="straight_through")
    assert_close_to_truth(got, want)


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    x, w, y = make_inputs(5, 300, 8, dtype=torch.float32, ignore=(1,))
    fn = torch.compile(lambda a, b, t: ek.margin_softmax_loss(a, b, t, "expface", backend=backend),
                       fullgraph=True, backend="inductor")
    got = loss_and_grads(lambda: fn(x, w, y), x, w)
    want = run(backend, x, w, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_dynamic_shapes(backend):
    """torch.compile(dynamic=True), batch size changing between calls: Dynamo traces the
    keyword defaults s=64.0 and m=0.7 of expface_loss as symbolic floats, and the argument
    checks must take them (math.isfinite could not: "torch.* op returned non-Tensor")."""
    fn = torch.compile(lambda a, b, t: ek.expface_loss(a, b, t, backend=backend),
                       fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (5, 9):
        x, w, y = make_inputs(b, 300, 8, dtype=torch.float32, ignore=(1,), seed=b)
        got = loss_and_grads(lambda: fn(x, w, y), x, w)
        want = run(backend, x, w, y)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# --- torch.func ------------------------------------------------------------------------------

def check_torch_func_grad_and_vjp(backend, reduction, device="cpu"):
    """torch.func's gradients against .backward()'s: the same bits on the CPU; on a GPU
    within 1e-5 (cuBLAS does not promise the same bits for two calls)."""
    same = torch.equal if device == "cpu" else (
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())))
    x, w, y = make_inputs(5, 37, 7, dtype=torch.float32, ignore=(1,), device=device)
    x, w = x.detach(), w.detach()
    weights = torch.linspace(0.5, 2.0, x.shape[0], device=device)

    def f(a, b):
        loss = ek.margin_softmax_loss(a, b, y, backend=backend, reduction=reduction)
        return (loss * weights).sum() if reduction == "none" else loss

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    f(xr, wr).backward()
    gx, gw = torch.func.grad(f, argnums=(0, 1))(x, w)
    assert same(gx, xr.grad) and same(gw, wr.grad)
    loss, vjp = torch.func.vjp(lambda b: f(x, b), w)
    (gw_vjp,) = vjp(torch.ones_like(loss))
    assert same(gw_vjp, wr.grad)


@pytest.mark.parametrize("backend", [n for n, why in ek.available_backends("cpu").items() if why is None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_grad_and_vjp(backend, reduction):
    """torch.func.grad / vjp (first order; torch.func runs backward with create_graph=True)
    give the gradients .backward() gives, bit for bit, on every CPU backend (triton under
    the interpreter). vmap-based transforms (jacrev, hessian) are not supported."""
    check_torch_func_grad_and_vjp(backend, reduction)


@pytest.mark.parametrize("backend", [n for n, why in ek.available_backends("cpu").items() if why is None])
def test_checkpoint_with_create_graph(backend):
    """Under torch.utils.checkpoint (non-reentrant), create_graph=True -- torch.func's
    mode -- gives the plain gradients: backward unpacks the saved tensors once (a second
    unpack raised CheckpointError there)."""
    from torch.utils.checkpoint import checkpoint

    x, w, y = make_inputs(5, 37, 7, dtype=torch.float32, ignore=(1,))
    want = torch.autograd.grad(ek.margin_softmax_loss(x, w, y, backend=backend), (x, w))
    loss = checkpoint(lambda a, b: ek.margin_softmax_loss(a, b, y, backend=backend), x, w,
                      use_reentrant=False)
    got = torch.autograd.grad(loss, (x, w), create_graph=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "extension"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_torch_func_grad_and_vjp(backend, reduction):
    """The same on a GPU, where the Triton and extension kernels launch through custom ops."""
    if ek.available_backends("cuda")[backend] is not None:
        pytest.skip(ek.available_backends("cuda")[backend])
    check_torch_func_grad_and_vjp(backend, reduction, device="cuda")
