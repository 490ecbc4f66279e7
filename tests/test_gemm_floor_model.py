"""The GEMM-floor decomposition (expface_kernels/gemm_floor_model.py) against the float64
reference: the fixed offset, the running-max fallback, G' and c', chunks and tiles.

The model runs as a backend of the contract under the package's own autograd.Function
(prologue, margins, reductions, ignored rows), so only the class loop is the model's.
"""

import functools
import math

import pytest
import torch

from expface_kernels import backends, function, gemm_floor_model as gfm, reference
from expface_kernels.contract import Backend
from expface_kernels.margins import resolve_margin
from expface_kernels.torch_math import inv_norm

from util import MARGIN_CASES, ground_truth, loss_and_grads, make_inputs

NAME = "gemm_floor_model_test"


@pytest.fixture
def model_backend(monkeypatch):
    """Installs the model, with small tiles and chunks, under a test-only backend name."""

    def install(tile_n=4, chunk=3, fixed="auto", store_dtype=None):
        be = Backend(NAME,
                              functools.partial(gfm.lse_partials, tile_n=tile_n, fixed=fixed),
                              functools.partial(gfm.grads, chunk=chunk, store_dtype=store_dtype),
                              gfm._unsupported)
        monkeypatch.setitem(backends._loaded, NAME, be)

    return install


def run_model(x, w, y, margin="expface", m=None, *, s=64.0, margin_grad="exact",
              reduction="mean", ignore_index=-1):
    _, mv = resolve_margin(margin, m)
    opts = function.LossOptions(backends._loaded[NAME], margin, mv, s, margin_grad, reduction, ignore_index)
    return loss_and_grads(lambda: function.margin_softmax(x, w, y, opts), x, w)


def assert_truth(got, truth, tol=1e-10):
    for a, b, what in zip(got, truth, ("loss", "grad_x", "grad_w")):
        assert a.dtype == b.dtype == torch.float64, what
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


# --- fact (a): the fixed offset -------------------------------------------------------

def test_fixed_offset_condition():
    # The numbers: s = 64, C = 2^20 -> s + ln C = 77.9 < 88: no offset needed.
    assert 64 + math.log(2**20) == pytest.approx(77.86, abs=0.01)
    assert gfm.fixed_offset(64.0, 2**20) == 0.0
    # Past 88 a positive offset keeps the sum finite while the terms stay normal fp32.
    o = gfm.fixed_offset(80.0, 2**20)
    assert o == pytest.approx(80 + math.log(2**20) - 88)
    assert 80 - o + math.log(2**20) <= gfm.LN_SUM_MAX and -80 - o >= gfm.LN_TERM_MIN
    # Huge s: no constant fits (the smallest term exp(-2s) is not a normal fp32 number).
    assert gfm.fixed_offset(100.0, 2) is None
    assert gfm.fixed_offset(88.0, 1) is None
    with pytest.raises(ValueError, match="num_classes"):
        gfm.fixed_offset(64.0, 0)


def test_fixed_offset_bounds_are_fp32_facts():
    # The worst row of the fixed path: C terms at the largest logit, and one at the smallest.
    s, c = 64.0, 2**20
    o = gfm.fixed_offset(s, c)
    worst_sum = torch.tensor(c, dtype=torch.float32) * torch.exp(torch.tensor(s - o, dtype=torch.float32))
    assert torch.isfinite(worst_sum)
    smallest = torch.exp(torch.tensor(-s - o, dtype=torch.float32))
    assert smallest >= torch.finfo(torch.float32).tiny
    # ... and what breaks outside the bounds.
    assert not torch.isfinite(torch.exp(torch.tensor(89.0, dtype=torch.float32)))
    assert torch.exp(torch.tensor(-2 * 100.0, dtype=torch.float32)) == 0


def _partials_case(b, c, d, s, seed=0):
    x, w, y = make_inputs(b, c, d, seed=seed)
    x_hat = torch.nn.functional.normalize(x.detach(), dim=1)
    w = w.detach()
    tl = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * s / 3
    return x_hat, w, tl, y


@pytest.mark.parametrize("b,c,d,tile_n", [(1, 1, 1, 4), (5, 37, 7, 4), (9, 130, 33, 128), (3, 8, 5, 8)])
def test_lse_matches_reference(b, c, d, tile_n):
    x_hat, w, tl, y = _partials_case(b, c, d, 64.0)
    m_ref, s_ref, inv_ref = reference.lse_partials(x_hat, w, tl, y, 64.0, 0)
    lse_ref = m_ref + torch.log(s_ref)
    for fixed in ("auto", None):
        m, sm, inv = gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, fixed=fixed, tile_n=tile_n)
        torch.testing.assert_close(m + torch.log(sm), lse_ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(inv, inv_ref, rtol=0, atol=0)
    m, _, _ = gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, tile_n=tile_n)
    assert (m == 0).all()  # the fixed path was taken (s + ln C < 88)


def test_lse_block_offset_and_foreign_labels():
    """A class block [offset, offset + C_local): targets elsewhere do not enter."""
    x_hat, w, tl, _ = _partials_case(6, 23, 5, 30.0)
    y = torch.tensor([100, 101, 110, 122, 3, -1])  # rows 0-3 in the block (offset 100)
    m_ref, s_ref, _ = reference.lse_partials(x_hat, w, tl, y, 30.0, 100)
    m, sm, _ = gfm.lse_partials(x_hat, w, tl, y, 30.0, 100, tile_n=5)
    torch.testing.assert_close(m + torch.log(sm), m_ref + torch.log(s_ref), rtol=1e-13, atol=1e-13)


def test_fixed_offset_in_fp32_sums():
    """The kernel's fp32 registers: the fixed path is as exact as fp32 when the condition
    holds, overflows when forced outside it, and 'auto' falls back to the running max."""
    x_hat, w, tl, y = _partials_case(4, 50, 6, 64.0, seed=3)
    m_ref, s_ref, _ = reference.lse_partials(x_hat, w, tl, y, 64.0, 0)
    m, sm, _ = gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, sum_dtype=torch.float32)
    torch.testing.assert_close(m + torch.log(sm), m_ref + torch.log(s_ref), rtol=1e-6, atol=1e-5)

    # Huge s: make one logit per row sit at +s (x̂ equal to a centre, label elsewhere).
    s = 100.0
    w2 = w.clone()
    w2[:4] = x_hat * 3.0
    y2 = torch.tensor([10, 11, 12, 13])
    tl2 = torch.zeros(4, dtype=torch.float64)
    assert gfm.fixed_offset(s, 50) is None
    m_ref, s_ref, _ = reference.lse_partials(x_hat, w2, tl2, y2, s, 0)
    lse_ref = m_ref + torch.log(s_ref)
    assert (lse_ref > 99).all()
    m, sm, _ = gfm.lse_partials(x_hat, w2, tl2, y2, s, 0, fixed=0.0, sum_dtype=torch.float32)
    assert torch.isinf(m + torch.log(sm)).all()  # exp(100) overflows fp32
    m, sm, _ = gfm.lse_partials(x_hat, w2, tl2, y2, s, 0, sum_dtype=torch.float32)
    torch.testing.assert_close(m + torch.log(sm), lse_ref, rtol=1e-6, atol=1e-5)


def test_fixed_offset_underflow_when_forced():
    """The other bound: with every cosine −1 and a large forced offset, all terms flush
    to zero in fp32 (ln 0 = −inf), which is why LN_TERM_MIN is part of the condition."""
    x_hat = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    tl = torch.tensor([-64.0], dtype=torch.float64)
    m, sm, _ = gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, fixed=64.0, sum_dtype=torch.float32)
    assert sm.item() == 0.0
    m, sm, _ = gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, sum_dtype=torch.float32)
    assert (m + torch.log(sm)).item() == pytest.approx(-64 + math.log(2), rel=1e-6)


# --- fact (b): G', c' and the projection in the dW GEMM -------------------------------

@pytest.mark.parametrize("b,c,d,chunk,offset", [(1, 1, 1, 3, 0), (5, 37, 7, 3, 0), (7, 64, 16, 64, 0),
                                                (6, 29, 5, 8, 40)])
def test_grads_match_reference(b, c, d, chunk, offset):
    x_hat, w, _, _ = _partials_case(b, c, d, 64.0, seed=b + c)
    g = torch.Generator().manual_seed(c)
    y = torch.randint(offset - 3, offset + c + 3, (b,), generator=g)
    lse = torch.randn(b, dtype=torch.float64, generator=g) + 40
    tg = torch.randn(b, dtype=torch.float64, generator=g)
    gr = torch.rand(b, dtype=torch.float64, generator=g)
    w_inv = inv_norm(w, torch.float64)
    gx_ref, gw_ref = reference.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, offset)
    gx, gw = gfm.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, offset, chunk=chunk)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_projection_identity_and_zero_norm_rows():
    """grad_W_j = (G'ᵀx̂)_j − c'_j·W_j/‖W_j‖ equals the projected gradient, row by row;
    rows with ‖W_j‖ < 1e-12 are not projected (F.normalize's backward)."""
    x_hat, w, _, y = _partials_case(5, 9, 4, 64.0, seed=7)
    w[2] = 0.0
    w[5] = 1e-14
    w_inv = inv_norm(w, torch.float64)
    lse = torch.full((5,), 30.0, dtype=torch.float64)
    tg = torch.linspace(-1, 1, 5, dtype=torch.float64)
    gr = torch.ones(5, dtype=torch.float64)
    gx_ref, gw_ref = reference.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, 0)
    gx, gw = gfm.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, 0, chunk=4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    in_block = torch.ones(5, dtype=torch.bool)
    g_prime, c_prime = gfm.recompute_chunk(x_hat, w, w_inv, in_block, y, 0, lse, tg, gr, 64.0)
    scale = gfm.projection_scale(c_prime, w_inv)
    assert scale[2] == 0 and scale[5] == 0 and (scale[[0, 1, 3, 4, 6, 7, 8]] != 0).all()
    # Away from zero norms grad_W_j is orthogonal to W_j.
    radial = (gw * w).sum(1)[[0, 1, 3, 4, 6, 7, 8]]
    assert radial.abs().max() < 1e-12 * gw.abs().max() * w.abs().max()


def test_bf16_g_prime_projection_consistent():
    """c' reduced from the stored (bf16) G' keeps grad_W orthogonal to W to float64
    precision, and the rounding error of G' itself stays at bf16's level."""
    x_hat, w, _, y = _partials_case(16, 40, 12, 64.0, seed=11)
    w_inv = inv_norm(w, torch.float64)
    g = torch.Generator().manual_seed(1)
    lse = (torch.randn(16, dtype=torch.float64, generator=g) + 45)
    tg = -torch.rand(16, dtype=torch.float64, generator=g)
    gr = torch.full((16,), 1 / 16, dtype=torch.float64)
    _, gw_ref = reference.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, 0)
    _, gw = gfm.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, 0, chunk=16, store_dtype=torch.bfloat16)
    assert ((gw * w).sum(1).abs() / (gw.norm(dim=1) * w.norm(dim=1))).max() < 1e-12
    rel = (gw - gw_ref).abs().max() / gw_ref.abs().max()
    assert 0 < rel < 2 ** -7


def test_bad_tile_and_chunk():
    x_hat, w, tl, y = _partials_case(2, 3, 2, 64.0)
    with pytest.raises(ValueError, match="tile_n"):
        gfm.lse_partials(x_hat, w, tl, y, 64.0, 0, tile_n=0)
    w_inv = inv_norm(w, torch.float64)
    with pytest.raises(ValueError, match="chunk"):
        gfm.grads(x_hat, w, w_inv, y, tl, tl, tl, 64.0, 0, chunk=0)


# --- the whole loss through the package's Function ------------------------------------

@pytest.mark.parametrize("margin,m", MARGIN_CASES)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_every_margin_and_mode(model_backend, margin, m, margin_grad):
    model_backend(tile_n=4, chunk=3)
    x, w, y = make_inputs(6, 41, 9, ignore=(2,))
    got = run_model(x, w, y, margin, m, margin_grad=margin_grad)
    assert_truth(got, ground_truth(x, w, y, margin, m, margin_grad=margin_grad))


@pytest.mark.parametrize("b,c,d", [(1, 1, 1), (1, 5, 3), (3, 37, 7), (17, 130, 33), (8, 700, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_and_reductions(model_backend, b, c, d, reduction):
    model_backend(tile_n=8, chunk=50)
    x, w, y = make_inputs(b, c, d, seed=b * c + d, ignore=(0,) if b > 2 else ())
    got = run_model(x, w, y, reduction=reduction)
    assert_truth(got, ground_truth(x, w, y, "expface", reduction=reduction))


def test_all_rows_ignored(model_backend):
    model_backend()
    x, w, y = make_inputs(3, 10, 4, ignore=(0, 1, 2))
    loss, gx, gw = run_model(x, w, y)
    assert torch.isnan(loss)
    assert (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("margin", ["expface", "sphereface", "cosface"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_huge_scale_takes_running_max(model_backend, margin, margin_grad):
    """s = 100: s + ln C >= 88 and no offset fits; the model takes the running max and
    still matches the reference (where the loss is finite in float64)."""
    model_backend(tile_n=4, chunk=5)
    x, w, y = make_inputs(5, 19, 6, seed=5, ignore=(1,))
    assert gfm.fixed_offset(100.0, 19) is None
    got = run_model(x, w, y, margin, s=100.0, margin_grad=margin_grad)
    assert_truth(got, ground_truth(x, w, y, margin, s=100.0, margin_grad=margin_grad), tol=1e-9)


def test_forced_fixed_offset_matches_in_float64(model_backend):
    """In float64 any constant offset gives the same loss: the offset changes rounding,
    never the value; so the fp32 tests above isolate the range conditions."""
    model_backend(fixed=20.0)
    x, w, y = make_inputs(4, 33, 5, seed=9)
    assert_truth(run_model(x, w, y, "arcface"), ground_truth(x, w, y, "arcface"))


def test_padded_batch_rows_are_inert():
    """The CUTLASS glue pads a ragged batch to a multiple of 8 with zero rows, grad_row 0,
    no target (label -1) and lse 0: their G' is 0, so c', grad_W and the real rows'
    grad_x are unchanged."""
    x_hat, w, _, y = _partials_case(5, 21, 8, 64.0, seed=13)
    w_inv = inv_norm(w, torch.float64)
    g = torch.Generator().manual_seed(2)
    lse = torch.randn(5, dtype=torch.float64, generator=g) + 40
    tg = torch.randn(5, dtype=torch.float64, generator=g)
    gr = torch.rand(5, dtype=torch.float64, generator=g)
    gx, gw = gfm.grads(x_hat, w, w_inv, y, lse, tg, gr, 64.0, 0, chunk=8)
    pad = 3
    z = torch.zeros(pad, dtype=torch.float64)
    gx_p, gw_p = gfm.grads(torch.cat([x_hat, torch.zeros(pad, 8, dtype=torch.float64)]), w, w_inv,
                           torch.cat([y, torch.full((pad,), -1)]), torch.cat([lse, z]), torch.cat([tg, z]),
                           torch.cat([gr, z]), 64.0, 0, chunk=8)
    torch.testing.assert_close(gx_p[:5], gx, rtol=0, atol=0)
    assert (gx_p[5:] == 0).all()
    torch.testing.assert_close(gw_p, gw, rtol=1e-15, atol=0)
