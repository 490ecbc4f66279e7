"""The one contract suite: every backend of the registry against the float64 reference.

Parametrized over ``backends.BACKEND_NAMES``: a backend that cannot run CPU tensors here
(the extension not built, Triton without TRITON_INTERPRET) is skipped with its reason --
except under CI=true, where it fails with it. Each backend runs in its exact dtype:
float64 where it takes float64 (reference, chunked, extension), else float32 (Triton's
interpreter) with a float32 tolerance. The interpreter is exact but slow, so Triton's
share of the matrix is smaller (``INTERPRETED``: one reduction in the margin matrix, a
subset of the shapes, no hypothesis search); its kernels have their own tests in
tests/test_triton.py, the extension's primitives in tests/test_extension.py.

``blocks="small"`` shrinks a backend's class-block budget (chunked.TILE_BYTES,
extension.BLOCK_BYTES) so that small shapes cross many block edges.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import expface_kernels as ek
from expface_kernels import backends, chunked

from util import MARGIN_CASES, ground_truth, loss_and_grads, make_inputs, max_rel_err

CPU_WHY = ek.available_backends("cpu")
_IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
INTERPRETED = {"triton"}
"""Backends that run CPU tensors in an interpreter (Triton): a smaller matrix."""


def _takes_float64(name: str) -> bool:
    if CPU_WHY[name] is not None:
        return name != "triton"  # not runnable here: skipped anyway
    probe = torch.zeros(1, 1, dtype=torch.float64)
    return not backends.get_backend(name).unsupported_reasons(probe, probe)


EXACT_DTYPE = {n: torch.float64 if _takes_float64(n) else torch.float32 for n in backends.BACKEND_NAMES}
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def _param(name, *values):
    why = CPU_WHY[name]
    marks = [pytest.mark.skipif(why is not None and not _IN_CI, reason=f"{name}: {why}")]
    return pytest.param(name, *values, marks=marks, id="-".join([name] + [str(v) for v in values]))


ALL = [_param(n) for n in backends.BACKEND_NAMES]
COMPILED = [_param(n) for n in backends.BACKEND_NAMES if n not in INTERPRETED]
FLOAT64 = [_param(n) for n in backends.BACKEND_NAMES if EXACT_DTYPE[n] == torch.float64]


def _set_small_blocks(backend, monkeypatch):
    if backend == "chunked":
        monkeypatch.setattr(chunked, "TILE_BYTES", 1)  # the minimum chunk: 256 classes
    elif backend == "extension":
        from expface_kernels import extension
        monkeypatch.setattr(extension, "BLOCK_BYTES", 512)  # a few rows x classes per block


BLOCK_KNOB = ("chunked", "extension")


def with_blocks(names):
    """(backend, blocks) params: "small" too for the backends with a block budget."""
    return [_param(n, b) for n in names for b in (("default", "small") if n in BLOCK_KNOB else ("default",))]


def inputs(backend, b, c, d, **kw):
    """make_inputs in the backend's exact dtype (unless ``dtype`` is given)."""
    kw.setdefault("dtype", EXACT_DTYPE[backend])
    return make_inputs(b, c, d, **kw)


def tol(backend):
    return TOL[EXACT_DTYPE[backend]]


def run(backend, x, w, y, margin="expface", m=None, **kw):
    return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, margin, m=m, backend=backend, **kw), x, w)


def assert_close_to_truth(got, truth, tol=1e-9, equal_nan=False):
    """loss, grad_x, grad_w against the float64 truth. Float64 results: elementwise,
    rtol = atol = tol. Float32 results (the interpreter's): the largest error relative to
    the largest |truth| of the tensor (max_rel_err), as float32 rounding of a sum of
    large terms is relative to those terms, not to each small element."""
    for a, b, what in zip(got, truth, ("loss", "grad_x", "grad_w")):
        if a.dtype == torch.float64 or equal_nan:
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, equal_nan=equal_nan, msg=what)
        else:
            err = max_rel_err(a, b)
            assert err <= tol, f"{what}: max rel err {err:.3g} > {tol}"


def test_registry_backends_are_all_in_the_suite():
    assert [p.values[0] for p in ALL] == list(backends.BACKEND_NAMES)
    assert CPU_WHY["reference"] is None and CPU_WHY["chunked"] is None


def _margin_cases():
    out = []
    for p in with_blocks(backends.BACKEND_NAMES):
        name, blocks = p.values
        for margin, m in MARGIN_CASES:
            for mode in ("exact", "straight_through"):
                for red in (("mean",) if name in INTERPRETED else ("mean", "sum", "none")):
                    out.append(pytest.param(name, blocks, margin, m, mode, red, marks=p.marks,
                                            id=f"{p.id}-{margin}-{m}-{mode}-{red}"))
    return out


@pytest.mark.parametrize("backend,blocks,margin,m,margin_grad,reduction", _margin_cases())
def test_margins_modes_reductions(backend, blocks, margin, m, margin_grad, reduction, monkeypatch):
    """Every margin x gradient mode x reduction, with an ignored row (the interpreter:
    reduction mean only). Away from the derivative clamp "exact" equals autograd of the
    formula, which the float64 reference has unclamped."""
    if blocks == "small":
        _set_small_blocks(backend, monkeypatch)
    x, w, y = inputs(backend, 7, 61, 9, seed=11, ignore=(2,))
    got = run(backend, x, w, y, margin, m, margin_grad=margin_grad, reduction=reduction)
    want = ground_truth(x, w, y, margin, m, margin_grad=margin_grad, reduction=reduction)
    assert_close_to_truth(got, want, tol(backend))


SHAPES = [(1, 1, 1), (1, 5, 3), (3, 37, 7), (3, 5, 33), (17, 130, 7), (17, 130, 33), (1, 130, 33),
          (8, 700, 5)]
INTERPRETER_SHAPES = [(1, 1, 1), (3, 5, 33), (17, 130, 7), (1, 130, 33)]
"""B = 1, C = 1 (C below every block), D odd, C not a multiple of any block."""


def _shape_cases():
    out = []
    for p in with_blocks(backends.BACKEND_NAMES):
        name = p.values[0]
        for shape in (INTERPRETER_SHAPES if name in INTERPRETED else SHAPES):
            for red in ("mean", "sum", "none"):
                out.append(pytest.param(*p.values, *shape, red, marks=p.marks, id=f"{p.id}-{shape}-{red}"))
    return out


@pytest.mark.parametrize("backend,blocks,b,c,d,reduction", _shape_cases())
def test_odd_shapes_and_reductions(backend, blocks, b, c, d, reduction, monkeypatch):
    if blocks == "small":
        _set_small_blocks(backend, monkeypatch)
    x, w, y = inputs(backend, b, c, d, seed=b * c + d, ignore=(0,) if b > 2 else ())
    # D = 1 in float32: every cosine is +-1 exactly, where the exact derivative of arcface
    # and expface is infinite in the (unclamped) float64 reference; cosface has none.
    margin = "cosface" if d == 1 and x.dtype != torch.float64 else "expface"
    got = run(backend, x, w, y, margin, reduction=reduction)
    assert_close_to_truth(got, ground_truth(x, w, y, margin, reduction=reduction), tol(backend))


@pytest.mark.parametrize("backend", FLOAT64)
def test_many_chunks(backend, monkeypatch):
    """C spans several blocks, the last one partial; targets in the first and last
    column of blocks."""
    _set_small_blocks(backend, monkeypatch)
    x, w, y = make_inputs(5, 256 * 3 + 77, 4)
    y[:4] = torch.tensor([0, 255, 256, 256 * 3 + 76])
    got = run(backend, x, w, y, "arcface")
    assert_close_to_truth(got, ground_truth(x, w, y, "arcface"))


@settings(max_examples=25, deadline=None)
# d >= 2: with D = 1 every cosine is ±1 up to an ulp, where θ = acos(c) amplifies the
# ulp that two equally right ways of computing c differ by to ~1e-8 (D = 1 is covered
# by SHAPES, at angles where that does not bite, and by the exact-hit test).
# Ignored rows: none, one, or all (mean: a NaN loss, zero gradients); ignore_index 0 is
# a valid class, which F.cross_entropy allows too. Float64 backends only: a search of
# 25 examples per backend is too slow for the interpreter.
@pytest.mark.parametrize("backend", FLOAT64)
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


def _gradcheck_cases():
    return [pytest.param(*p.values, margin, m, mode, marks=p.marks, id=f"{p.id}-{margin}-{m}-{mode}")
            for p in with_blocks([n for n in backends.BACKEND_NAMES if EXACT_DTYPE[n] == torch.float64])
            for margin, m in MARGIN_CASES for mode in ("exact", "straight_through")]


@pytest.mark.parametrize("backend,blocks,margin,m,margin_grad", _gradcheck_cases())
def test_gradcheck(backend, blocks, margin, m, margin_grad, monkeypatch):
    """Finite differences of the forward against the backward, float64.

    Straight-through is by design not the derivative of its forward unless ψ' = 1
    (cosface, none); for the other margins its backward is checked against autograd of
    the surrogate (test_margins_modes_reductions, test_straight_through_equals_insightface_recipe)
    and here against the finite differences of the margin-free loss it must equal."""
    if blocks == "small":
        _set_small_blocks(backend, monkeypatch)
    x, w, y = make_inputs(3, 11, 5, ignore=(1,))
    if margin_grad == "straight_through" and margin not in ("cosface", "none"):
        check_straight_through_by_finite_differences(backend, x, w, y, margin, m)
        return
    assert torch.autograd.gradcheck(
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


def _gradcheck_none_cases():
    return [pytest.param(*p.values, margin, m, marks=p.marks, id=f"{p.id}-{margin}-{m}")
            for p in with_blocks([n for n in backends.BACKEND_NAMES if EXACT_DTYPE[n] == torch.float64])
            for margin, m in (("expface", None), ("arcface", None), ("sphereface", None),
                              ("combined", (1.2, 0.3, 0.1)), ("cosface", None))]


@pytest.mark.parametrize("backend,blocks,margin,m", _gradcheck_none_cases())
def test_gradcheck_reduction_none(backend, blocks, margin, m, monkeypatch):
    if blocks == "small":
        _set_small_blocks(backend, monkeypatch)
    x, w, y = make_inputs(4, 9, 5, seed=7, ignore=(1,))
    assert torch.autograd.gradcheck(
        lambda a, b: ek.margin_softmax_loss(a, b, y, margin, m=m, s=8.0, reduction="none", backend=backend),
        (x, w))


# --- F.cross_entropy semantics ---------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_margin_none_is_cross_entropy(backend, reduction, ignore_index):
    """margin='none' is F.cross_entropy over s·cos, with ignore_index and reductions
    (ignore_index 3 is a valid class: those rows are left out all the same)."""
    x, w, y = inputs(backend, 7, 13, 6)
    y[[1, 4]] = ignore_index
    x64, w64 = x.detach().double(), w.detach().double()
    logits = 30.0 * F.normalize(x64) @ F.normalize(w64).t()
    want = F.cross_entropy(logits, y, reduction=reduction, ignore_index=ignore_index)
    loss, gx, _ = run(backend, x, w, y, "none", s=30.0, reduction=reduction, ignore_index=ignore_index)
    t = 1e-12 if x.dtype == torch.float64 else tol(backend)
    torch.testing.assert_close(loss.double(), want, rtol=t, atol=t)
    assert gx[[1, 4]].abs().max() == 0


@pytest.mark.parametrize("backend", ALL)
def test_ignored_rows_have_zero_gradient(backend):
    x, w, y = inputs(backend, 5, 9, 4, ignore=(0, 3))
    _, gx, _ = run(backend, x, w, y)
    assert gx[[0, 3]].abs().max() == 0 and gx[[1, 2, 4]].abs().max() > 0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction):
    """Every row ignored: as F.cross_entropy, a NaN loss for "mean" (0/0), 0 otherwise,
    and zero gradients in every case (a NaN there would reach the weights)."""
    x, w, y = inputs(backend, 3, 5, 4, ignore=(0, 1, 2))
    loss, gx, gw = run(backend, x, w, y, reduction=reduction)
    z = (x @ w.t()).detach().to(loss.dtype).requires_grad_()
    want = F.cross_entropy(z, y, ignore_index=-1, reduction=reduction)
    want.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    torch.testing.assert_close(loss, want.detach(), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("b,c,d", [(6, 20, 5), (17, 130, 33)])
def test_int32_labels(backend, b, c, d):
    x, w, y = inputs(backend, b, c, d, seed=15, label_dtype=torch.int32, ignore=(2,))
    got = run(backend, x, w, y, reduction="sum")
    assert_close_to_truth(got, ground_truth(x, w, y.long(), "expface", reduction="sum"), tol(backend))


# --- dtypes ----------------------------------------------------------------------------

LOW = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
       (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


def _runs(backend, x_dtype, w_dtype) -> bool:
    if CPU_WHY[backend] is not None:
        return True  # skipped (or failed, in CI) by its mark
    probe_x, probe_w = torch.zeros(1, 1, dtype=x_dtype), torch.zeros(1, 1, dtype=w_dtype)
    return not backends.get_backend(backend).unsupported_reasons(probe_x, probe_w)


@pytest.mark.parametrize("backend,x_dtype,w_dtype",
                         [_param(n, xd, wd) for n in backends.BACKEND_NAMES for xd, wd in LOW if _runs(n, xd, wd)])
def test_low_precision_error_bound(backend, x_dtype, w_dtype):
    """Error vs float64 at most 2x that of the reference computed in the same low
    precision (DESIGN §5); output dtypes as the contract says. int32 labels. Every dtype
    pair a backend takes (the interpreter: no bfloat16)."""
    x, w, y = make_inputs(16, 300, 64, dtype=x_dtype, w_dtype=w_dtype, seed=3, ignore=(5,),
                          label_dtype=torch.int32)
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


@pytest.mark.parametrize("backend", COMPILED)
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


@pytest.mark.parametrize("backend", FLOAT64)
def test_float64_mixed_is_float64(backend):
    x, w, y = make_inputs(3, 7, 4, dtype=torch.float32, w_dtype=torch.float64)
    loss, gx, gw = run(backend, x, w, y)
    assert loss.dtype == torch.float64 and gx.dtype == torch.float32 and gw.dtype == torch.float64


# --- special values ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "w"])
def test_nonfinite_input_gives_nan_loss(backend, bad, where):
    x, w, y = make_inputs(4, 6, 3, dtype=torch.float32)
    with torch.no_grad():
        (x if where == "x" else w)[1, 2] = bad
    loss = ek.margin_softmax_loss(x, w, y, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", ALL)
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


@pytest.mark.parametrize("backend", ALL)
def test_straight_through_equals_insightface_recipe(backend):
    x, w, y = make_inputs(9, 50, 16, ignore=(4,))
    want = loss_and_grads(lambda: insightface_recipe(x, w, y, 64.0, 0.7), x, w)  # float64
    xb, wb = (t.detach().to(EXACT_DTYPE[backend]).requires_grad_() for t in (x, w))
    got = run(backend, xb, wb, y, "expface", 0.7, margin_grad="straight_through")
    assert_close_to_truth(got, want, tol(backend))


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
def test_compile_fullgraph(backend):
    """Inductor on the CPU, the interpreter's Triton too (~20 s on 2 cores): the custom
    ops' fake impls are traced by Dynamo/AOTAutograd and the real launches run inside
    the graph. Against eager and against the float64 truth."""
    torch._dynamo.reset()
    x, w, y = make_inputs(5, 300 if backend not in INTERPRETED else 37, 8, dtype=torch.float32, ignore=(1,))
    fn = torch.compile(lambda a, b, t: ek.margin_softmax_loss(a, b, t, "expface", backend=backend),
                       fullgraph=True, backend="inductor")
    got = loss_and_grads(lambda: fn(x, w, y), x, w)
    want = run(backend, x, w, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_close_to_truth(got, ground_truth(x, w, y, "expface"), TOL[torch.float32])


@pytest.mark.parametrize("backend", ALL)
def test_compile_fullgraph_dynamic_shapes(backend):
    """torch.compile(dynamic=True), batch size changing between calls: Dynamo traces the
    keyword defaults s=64.0 and m=0.7 of expface_loss as symbolic floats, and the argument
    checks must take them (math.isfinite could not: "torch.* op returned non-Tensor")."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, t: ek.expface_loss(a, b, t, backend=backend),
                       fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (5, 9):
        x, w, y = make_inputs(b, 300 if backend not in INTERPRETED else 37, 8, dtype=torch.float32,
                              ignore=(1,), seed=b)
        got = loss_and_grads(lambda: fn(x, w, y), x, w)
        want = run(backend, x, w, y)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        assert_close_to_truth(got, ground_truth(x, w, y, "expface"), TOL[torch.float32])


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


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_grad_and_vjp(backend, reduction):
    """torch.func.grad / vjp (first order; torch.func runs backward with create_graph=True)
    give the gradients .backward() gives, bit for bit, on every CPU backend (triton under
    the interpreter). vmap-based transforms (jacrev, hessian) are not supported."""
    check_torch_func_grad_and_vjp(backend, reduction)


@pytest.mark.parametrize("backend", ALL)
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


# --- on a GPU: the API matrix the CPU runs above, in float32 ---------------------------------

def _cuda_backends():
    why = ek.available_backends("cuda") if torch.cuda.is_available() else {}
    return [n for n in backends.BACKEND_NAMES if why.get(n, "") is None]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_tol():
    return 2e-5 if not torch.backends.cuda.matmul.allow_tf32 else 5e-3


@needs_cuda
@pytest.mark.parametrize("b,c,d", INTERPRETER_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_odd_shapes_and_reductions(b, c, d, reduction):
    for backend in _cuda_backends():
        x, w, y = make_inputs(b, c, d, dtype=torch.float32, seed=b + c + d, device="cuda",
                              ignore=(0,) if b > 2 else ())
        margin = "arcface" if d > 1 else "cosface"  # D = 1: c == +-1 exactly (see above)
        got = run(backend, x, w, y, margin, reduction=reduction)
        assert_close_to_truth(got, ground_truth(x, w, y, margin, reduction=reduction), _cuda_tol())


@needs_cuda
@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_cuda_ignored_rows_and_int32_labels(ignore_index):
    for backend in _cuda_backends():
        x, w, y = make_inputs(6, 37, 7, dtype=torch.float32, seed=13, device="cuda",
                              label_dtype=torch.int32)
        y[[1, 4]] = ignore_index
        got = run(backend, x, w, y, "cosface", ignore_index=ignore_index)
        want = ground_truth(x, w, y.long(), "cosface", ignore_index=ignore_index)
        assert_close_to_truth(got, want, _cuda_tol())
        assert got[1][[1, 4]].abs().max() == 0
        x, w, y = make_inputs(3, 37, 7, dtype=torch.float32, seed=14, device="cuda", ignore=(0, 1, 2))
        loss, gx, gw = run(backend, x, w, y)
        assert torch.isnan(loss) and not gx.any() and not gw.any()


@needs_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compile_fullgraph(dynamic):
    for backend in _cuda_backends():
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b, t: ek.expface_loss(a, b, t, backend=backend), fullgraph=True,
                           dynamic=dynamic, backend="inductor" if not dynamic else "aot_eager")
        for b in ((5,) if not dynamic else (5, 9)):
            x, w, y = make_inputs(b, 37, 7, dtype=torch.float32, seed=b, device="cuda", ignore=(3,))
            got = loss_and_grads(lambda: fn(x, w, y), x, w)
            assert_close_to_truth(got, ground_truth(x, w, y, "expface"), _cuda_tol())
