"""The per-row ops around the class loop (expface_kernels.prologue; csrc/ek_prologue.h).

Each op of the extension is held to the PyTorch code it replaces (``prologue.USE_EXTENSION
= False``) and, for the margin, to the float64 formulas of margins.py; the loss through
either path must agree for every backend; opcheck on each op; error paths; and the op
count of one forward, the reason the ops exist (host time on a GPU).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import expface_kernels as ek
from expface_kernels import prologue
from expface_kernels.margins import MARGINS, resolve_margin, target_terms

ext = pytest.importorskip("expface_kernels.extension",
                          reason="expface_kernels._C not built (pip install --no-build-isolation -e .)")

from util import MARGIN_CASES, loss_and_grads, make_inputs, max_rel_err  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host_overhead import ops_of_one_step  # noqa: E402  (the one op counter, shared with the benchmark)

OPS = torch.ops.expface_kernels
HAS_CUDA = torch.cuda.is_available() and ext.built_with_cuda()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of expface_kernels._C")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _torch_ref(fn, *args):
    old = prologue.USE_EXTENSION
    prologue.USE_EXTENSION = False
    try:
        return fn(*args)
    finally:
        prologue.USE_EXTENSION = old


def test_ops_are_used_where_built():
    assert "cpu" in prologue.OPS_DEVICES
    assert ("cuda" in prologue.OPS_DEVICES) == ext.built_with_cuda()


# ------------------------------------------------------------------ target_cosine
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("b,c,d,offset", [(1, 1, 1, 0), (9, 13, 7, 0), (33, 20, 65, 5), (6, 0, 4, 3)])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("x_hat_dtype", [None, torch.bfloat16, torch.float16])
def test_target_cosine_matches_torch(device, x_dtype, w_dtype, b, c, d, offset, label_dtype, x_hat_dtype):
    """x_hat_dtype: x̂ rounded to another dtype than x's (the class loop's operand under
    autocast), c_t then taken with that rounded x̂."""
    g = torch.Generator().manual_seed(b * 100 + c)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(device=device, dtype=x_dtype)
    w = (torch.randn(c, d, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=w_dtype)
    y = torch.randint(0, c + offset + 4, (b,), generator=g)  # below, inside and past the block
    if b > 2:
        y[1] = -100  # ignored
        y[2] = -1    # not ignored (ignore_index=-100) and in no block
    if b > 3:
        x[3] = 0     # a zero embedding: x_inv = 1e12, x_hat = 0
    y = y.to(device=device, dtype=label_dtype)
    got = prologue.target_cosine(x, w, y, offset, -100, x_hat_dtype)
    want = _torch_ref(prologue.target_cosine, x, w, y, offset, -100, x_hat_dtype)
    names = ("x_hat", "x_inv", "labels", "kept", "c_t")
    for a, e, name in zip(got, want, names):
        assert a.dtype == e.dtype and a.shape == e.shape and a.device == e.device, name
    assert got[0].dtype == (x_hat_dtype or x_dtype)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[got[1].dtype]
    rounding = 1e-2 if got[0].dtype in (torch.float16, torch.bfloat16) else tol  # x_hat's last bit may differ
    assert max_rel_err(got[0], want[0]) <= rounding, "x_hat"
    assert max_rel_err(got[1], want[1]) <= tol, "x_inv"
    assert max_rel_err(got[4], want[4]) <= max(rounding, tol), "c_t"
    outside = (y.long() == -100) | (y.long() - offset < 0) | (y.long() - offset >= c)
    assert (got[4][outside] == 0).all(), "c_t must be 0 outside the block"


# ------------------------------------------------------------------ target_terms
def _cosines(dtype, device):
    c = torch.cat([torch.linspace(-1, 1, 201, dtype=torch.float64),
                   torch.tensor([1.0, -1.0, 1 - 1e-9, -1 + 1e-9, 1.5, -1.5, 0.0])])
    return c.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin,m", MARGIN_CASES + [("sphereface", 3.0), ("arcface", 0.0)])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_target_terms_match_margins(device, margin, m, margin_grad, dtype):
    spec, mv = resolve_margin(margin, m)
    c = _cosines(dtype, device)
    got = prologue.target_terms(c, spec, mv, 64.0, margin_grad)
    same_dtype = target_terms(c, spec, mv, 64.0, margin_grad)  # margins.py, the PyTorch path
    f64 = target_terms(c.double(), spec, mv, 64.0, margin_grad)
    # float32 vs float64: the angle clamp pi - 1e-3 rounds to float32, and sin there has a
    # condition number of ~1e3 (ArcFace's factor at c = -1: 8e-5 apart).
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    tol64 = 1e-12 if dtype == torch.float64 else 2e-4
    for a, e, e64, name in zip(got, same_dtype, f64, ("target_logit", "target_factor")):
        assert a.dtype == dtype and a.shape == c.shape
        assert max_rel_err(a, e) <= tol, f"{name} vs the PyTorch path: {max_rel_err(a, e):.3g}"
        assert max_rel_err(a, e64) <= tol64, f"{name} vs float64: {max_rel_err(a, e64):.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_target_terms_nan_propagates(device):
    c = torch.tensor([float("nan"), 0.5], device=device)
    for name in MARGINS:
        spec, mv = resolve_margin(name, None)
        logit, factor = prologue.target_terms(c, spec, mv, 30.0, "exact")
        assert torch.isnan(logit[0]) and torch.isfinite(logit[1]), name
        if spec.psi_theta is not None:
            assert torch.isnan(factor[0]), name


def test_margin_codes_cover_every_margin():
    assert set(prologue.MARGIN_CODES) == set(MARGINS)
    assert sorted(prologue.MARGIN_CODES.values()) == list(range(len(MARGINS)))


# ------------------------------------------------------------------ normalize_backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                         (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("b,d", [(1, 1), (7, 33), (40, 512)])
def test_normalize_backward_matches_torch(device, x_dtype, acc, b, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(device=device, dtype=x_dtype)
    x[0, :] = 0  # below the norm floor: a plain scale by 1e12
    gx_hat = torch.randn(b, d, generator=g, dtype=torch.float64).to(device=device, dtype=acc) * 1e-9
    x_inv = _torch_ref(prologue.target_cosine, x, x[:0], torch.zeros(b, dtype=torch.int64, device=device), 0, -1)[1]
    got = prologue.normalize_backward(x, x_inv, gx_hat)
    want = _torch_ref(prologue.normalize_backward, x, x_inv, gx_hat)
    assert got.dtype == x_dtype and got.shape == x.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x_dtype]
    assert max_rel_err(got, want) <= tol
    # against autograd through F.normalize in float64
    x64 = x.double().requires_grad_()
    torch.nn.functional.normalize(x64, dim=1, eps=1e-12).backward(gx_hat.double())
    assert max_rel_err(got, x64.grad) <= max(tol, 1e-5)


# ------------------------------------------------------------------ the loss through both paths
@pytest.mark.parametrize("backend", ["chunked", "extension", "reference"])
@pytest.mark.parametrize("margin,m", MARGIN_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_same_through_ops_and_torch(backend, margin, m, reduction):
    x, w, y = make_inputs(11, 29, 9, dtype=torch.float32, seed=3, ignore=(2,))

    def run():
        return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, margin, m=m, backend=backend,
                                                             reduction=reduction), x, w)

    got = run()
    want = _torch_ref(run)
    for a, b_, name in zip(got, want, ("loss", "grad_x", "grad_w")):
        assert max_rel_err(a, b_) <= 2e-5, name


def test_gradcheck_through_ops():
    x, w, y = make_inputs(5, 12, 6, dtype=torch.float64, seed=1, ignore=(4,))
    assert torch.autograd.gradcheck(
        lambda a, b: ek.margin_softmax_loss(a, b, y, "expface", backend="extension"), (x, w))


# ------------------------------------------------------------------ opcheck, errors
def _opcheck_cases(device="cpu"):
    x = torch.randn(6, 5, device=device, dtype=torch.bfloat16)
    w = torch.randn(9, 5, device=device)
    y = torch.tensor([0, 3, -1, 8, 12, 2], device=device)
    yield "prologue", (x, w, y, 2, -1)
    yield "prologue", (x.double(), w.double(), y.int(), 0, 3)
    yield "prologue", (x.float(), w, y, 1, -1, torch.bfloat16)
    c = torch.rand(6, device=device) * 2 - 1
    yield "margin_terms", (c, 3, 0.7, 0.0, 0.0, 64.0, True)
    yield "margin_terms", (c.double(), 5, 1.0, 0.5, 0.2, 30.0, False)
    yield "normalize_backward", (x, torch.rand(6, device=device) + 0.5, torch.randn(6, 5, device=device))


@pytest.mark.parametrize("case", range(6))
def test_opcheck_cpu(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_cuda
def test_opcheck_cuda():
    for name, args in _opcheck_cases("cuda"):
        torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("call,match", [
    (lambda: OPS.prologue(torch.randn(3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 0, -1),
     "x must be a 2-D tensor"),
    (lambda: OPS.prologue(torch.randn(3, 2), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 0, -1),
     r"w must have shape \(C_local, D\)"),
    (lambda: OPS.prologue(torch.randn(3, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), 0, -1),
     r"labels must have shape \(B,\)"),
    (lambda: OPS.prologue(torch.randn(3, 3), torch.randn(4, 3), torch.zeros(3), 0, -1),
     "labels must be int64 or int32"),
    (lambda: OPS.prologue(torch.randn(3, 3), torch.randn(4, 3).int(), torch.zeros(3, dtype=torch.long), 0, -1),
     "w must be float16"),
    (lambda: OPS.prologue(torch.randn(3, 3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), -1, -1),
     "offset must be >= 0"),
    (lambda: OPS.prologue(torch.randn(3, 3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 0, -1, torch.int32),
     "x_hat_dtype must be float16"),
    (lambda: OPS.margin_terms(torch.rand(3), 6, 0.5, 0.0, 0.0, 64.0, True), "margin must be a code"),
    (lambda: OPS.margin_terms(torch.rand(3).half(), 3, 0.5, 0.0, 0.0, 64.0, True), "c_t must be float32"),
    (lambda: OPS.margin_terms(torch.rand(3), 3, 0.5, 0.0, 0.0, 0.0, True), "s must be a finite positive"),
    (lambda: OPS.margin_terms(torch.rand(3), 3, math.nan, 0.0, 0.0, 64.0, True), "margin parameters must be finite"),
    (lambda: OPS.normalize_backward(torch.randn(3, 2), torch.rand(3), torch.randn(3, 3)),
     "grad_x_hat must have x's shape"),
    (lambda: OPS.normalize_backward(torch.randn(3, 2), torch.rand(3).double(), torch.randn(3, 2)),
     r"x_inv must have shape \(B,\)"),
    (lambda: OPS.normalize_backward(torch.randn(3, 2), torch.rand(3), torch.randn(3, 2).half()),
     "grad_x_hat must be float32 or float64"),
])
def test_op_errors_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ------------------------------------------------------------------ why: the ops issued per step
def _ops_of_one_step(backend):
    x, w, y = make_inputs(8, 50, 16, dtype=torch.float32, seed=0, ignore=(1,))
    return ops_of_one_step(x, w, y, backend)


def test_ops_per_step_with_and_without_the_extension_prologue(monkeypatch):
    """Dispatcher ops of one ExpFace step through the extension backend (on a GPU, each
    is a kernel launch and its host-side dispatch). Measured when written: 18 forward + 6
    backward with the ops, 62 + 17 as PyTorch ops."""
    fwd, bwd = _ops_of_one_step("extension")
    monkeypatch.setattr(prologue, "USE_EXTENSION", False)
    fwd_t, bwd_t = _ops_of_one_step("extension")
    assert fwd <= 20 and bwd <= 8, (fwd, bwd)
    assert fwd_t >= 3 * fwd, (fwd_t, fwd)


@needs_cuda
def test_cuda_op_errors_name_the_argument():
    x = torch.randn(3, 4, device="cuda")
    y = torch.zeros(3, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="w is on cpu but x is on cuda"):
        OPS.prologue(x, torch.randn(5, 4), y, 0, -1)
    with pytest.raises(RuntimeError, match="labels is on cpu but x is on cuda"):
        OPS.prologue(x, torch.randn(5, 4, device="cuda"), y.cpu(), 0, -1)
    with pytest.raises(RuntimeError, match="margin must be a code"):
        OPS.margin_terms(torch.rand(3, device="cuda"), 9, 0.5, 0.0, 0.0, 64.0, True)
    with pytest.raises(RuntimeError, match="grad_x_hat is on cpu but x is on cuda"):
        OPS.normalize_backward(x, torch.rand(3, device="cuda"), torch.randn(3, 4))
