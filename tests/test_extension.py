"""Tests of the C++/CUDA extension (expface_kernels._C, backend "extension").

The primitives are checked against a float64 reference written here from the backend
contract's formulas (independent of expface_kernels' own Python code); the public API
against the ``reference`` backend, gradcheck in float64 on CPU, the registered
operators with torch.library.opcheck. Small ``BLOCK_BYTES`` force many row / class
blocks so that block edges (C not a multiple of a block, C < block, one row per
block) are exercised at small sizes. CUDA tests skip without a GPU or a CUDA build.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import expface_kernels as ek

ext = pytest.importorskip("expface_kernels.extension",
                          reason="expface_kernels._C not built (pip install --no-build-isolation -e .)")

from util import loss_and_grads, make_inputs  # noqa: E402

OPS = torch.ops.expface_kernels
HAS_CUDA = torch.cuda.is_available() and ext.built_with_cuda()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of expface_kernels._C")


@pytest.fixture
def small_blocks(monkeypatch):
    """Logits buffers of 512 bytes: many class chunks / one or few rows per block."""
    monkeypatch.setattr(ext, "BLOCK_BYTES", 512)


# ------------------------------------------------------------------ float64 contract reference
def _inv_norm(w):
    return 1.0 / w.norm(dim=1).clamp_min(1e-12)


def _targets(labels, offset, n):
    t = labels.long() - offset
    ok = (labels >= 0) & (t >= 0) & (t < n)
    return ok, t.clamp(0, max(n - 1, 0))


def ref_lse_partials(x, w, tl, labels, s, offset):
    x, w, tl = x.double(), w.double(), tl.double()
    winv = _inv_norm(w)
    z = s * (x @ w.t()) * winv
    ok, t = _targets(labels, offset, w.shape[0])
    rows = torch.nonzero(ok).squeeze(1)
    z[rows, t[rows]] = tl[rows]
    m = z.max(1).values
    return m, torch.exp(z - m[:, None]).sum(1), winv


def ref_grads(x, w, winv, labels, lse, tg, gr, s, offset):
    x, w, winv, lse, tg, gr = (t.double() for t in (x, w, winv, lse, tg, gr))
    c = (x @ w.t()) * winv
    G = gr[:, None] * s * torch.exp(s * c - lse[:, None])
    ok, t = _targets(labels, offset, w.shape[0])
    rows = torch.nonzero(ok).squeeze(1)
    G[rows, t[rows]] = tg[rows]
    gx = (G * winv) @ w
    g = G.t() @ x
    what = w * winv[:, None]
    proj = g - what * (what * g).sum(1, keepdim=True)
    gw = winv[:, None] * torch.where((winv <= 1e12)[:, None], proj, g)
    return gx, gw


def ref_fused(x, w, tl, tf, labels, gr, s):
    m, S, winv = ref_lse_partials(x, w, tl, labels, s, 0)
    lse = m + torch.log(S)
    ok, _ = _targets(labels, 0, w.shape[0])
    tg = torch.where(ok, gr.double() * tf.double() * torch.expm1(tl.double() - lse), torch.zeros_like(lse))
    gx, gw = ref_grads(x, w, winv, labels, lse, tg, gr, s, 0)
    return lse, gx, gw, winv


def prim_inputs(b, c, d, *, dtype=torch.float64, w_dtype=None, seed=0, device="cpu", offset=0, c_total=None):
    """Inputs of the primitives: x_hat normalised rows, raw w, target terms, labels with
    ignored (-1) rows and, when c_total > c, labels outside this block."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if torch.float64 in (dtype, w_dtype or dtype) else torch.float32
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, 1, generator=g, dtype=torch.float64))
    labels = torch.randint(0, c_total or c, (b,), generator=g) + (0 if c_total else offset)
    if b > 2:
        labels[1] = -1
    s = 30.0
    tl = s * (torch.rand(b, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    tf = 0.5 + torch.rand(b, generator=g, dtype=torch.float64)
    gr = torch.where(labels >= 0, torch.full((b,), 1.0 / b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64))
    cast = dict(device=device)
    return (x.to(dtype=dtype, **cast), w.to(dtype=w_dtype or dtype, **cast), tl.to(dtype=acc, **cast),
            tf.to(dtype=acc, **cast), labels.to(device), gr.to(dtype=acc, **cast), s)


def _tol(dtype, w_dtype=None):
    low = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 1.2e-1}  # GEMM output rounded to the dtype: s*c off by s*2^-9
    return max(low[dtype], low[w_dtype or dtype])


def _close(got, want, tol, what):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs().max() / scale).item()
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |ref| {scale.item():.3g} > {tol}"


# ------------------------------------------------------------------ registration / build
def test_ops_registered_for_cpu_and_cuda():
    for op in ("lse_partials", "grads", "fused_forward_grads"):
        name = f"expface_kernels::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == ext.built_with_cuda(), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"), name  # register_fake


def test_backend_object():
    from expface_kernels.backends import Backend
    assert isinstance(ext.BACKEND, Backend) and ext.BACKEND.name == "extension"
    assert ext.BACKEND.fused_forward_grads is not None
    x = torch.empty(2, 3)
    assert ext.unsupported_reasons(x, x) == []
    assert ext.unsupported_reasons(x.double(), x.double()) == []
    assert ek.available_backends("cpu")["extension"] is None


@pytest.mark.skipif(ext.built_with_cuda(), reason="this build has CUDA kernels")
def test_cpu_only_build_reports_why_for_cuda():
    x = torch.empty(2, 3, device="meta")
    assert any("CPU and CUDA" in r for r in ext.unsupported_reasons(x, x))


@pytest.mark.skipif(not ext.built_with_cuda(), reason="CPU-only build of expface_kernels._C")
def test_cuda_build_carries_the_recorded_archs():
    """The loaded extension's fatbin carries SASS for every arch of its build record and
    PTX for the ones marked +PTX (needs no GPU). Without an explicit TORCH_CUDA_ARCH_LIST
    the record holds the defaults: sm_80, sm_90, sm_100, sm_120 and PTX (the machine
    image of the GPU runs sets the list: there the build carries what it names)."""
    from expface_kernels import extension_build as eb

    archs = ext.BUILD_RECORD["cuda_archs"]
    sass, ptx = eb.parse_arch_list(archs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert archs.endswith(eb.DEFAULT_CUDA_ARCHS), archs
    want = {("sass", int(a.replace(".", "").rstrip("af"))) for a in sass}
    want |= {("ptx", int(a.replace(".", "").rstrip("af"))) for a in ptx}
    got = set(eb.fatbin_entries(ext._C.__file__))
    assert want <= got, (sorted(got), archs)


# ------------------------------------------------------------------ opcheck
def _opcheck_cases(device="cpu"):
    dts = [(torch.float32, None), (torch.float16, torch.float32), (torch.bfloat16, None)]
    if device == "cpu":
        dts.append((torch.float64, None))
    for dt, wdt in dts:
        x, w, tl, tf, y, gr, s = prim_inputs(5, 23, 7, dtype=dt, w_dtype=wdt, device=device)
        m, S, winv = OPS.lse_partials(x, w, tl, y, s, 0)
        lse = m + torch.log(S)
        yield ("lse_partials", (x, w, tl, y, s, 0))
        yield ("lse_partials", (x, w, tl, y, s, 3, 64))
        yield ("grads", (x, w, winv, y, lse, tl * 0.01, gr, s, 0))
        yield ("fused_forward_grads", (x, w, tl, tf, y, gr, s))
        yield ("fused_forward_grads", (x, w, tl, tf, y, gr, s, 64))


@pytest.mark.parametrize("case", range(20))
def test_opcheck_cpu(case):
    cases = list(_opcheck_cases())
    name, args = cases[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_cuda
def test_opcheck_cuda():
    for name, args in _opcheck_cases("cuda"):
        torch.library.opcheck(getattr(OPS, name).default, args)


# ------------------------------------------------------------------ primitives vs float64 contract
SHAPES = [(1, 1, 1), (1, 37, 5), (7, 53, 9), (33, 300, 17), (4, 2, 64)]


@pytest.mark.parametrize("b,c,d", SHAPES)
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float64, None), (torch.float32, None),
                                           (torch.float16, torch.float32), (torch.bfloat16, None),
                                           (torch.float16, None)])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_primitives_match_contract(b, c, d, dtype, w_dtype, blocks, monkeypatch):
    if blocks == "small":
        monkeypatch.setattr(ext, "BLOCK_BYTES", 512)
    tol = _tol(dtype, w_dtype)
    x, w, tl, tf, y, gr, s = prim_inputs(b, c, d, dtype=dtype, w_dtype=w_dtype, seed=b + c)
    acc = tl.dtype
    # lse_partials
    m, S, winv = ext.lse_partials(x, w, tl, y, s, 0)
    rm, rS, rwinv = ref_lse_partials(x, w, tl, y, s, 0)
    assert m.dtype == S.dtype == winv.dtype == acc
    _close(m + torch.log(S), rm + torch.log(rS), tol, "lse")
    _close(winv, rwinv, tol, "w_inv_norm")
    # grads
    lse = (rm + torch.log(rS)).to(acc)
    tg = (gr.double() * tf.double() * torch.expm1(tl.double() - lse.double())).to(acc)
    tg = torch.where(y >= 0, tg, torch.zeros_like(tg))
    gx, gw = ext.grads(x, w, rwinv.to(acc), y, lse, tg, gr, s, 0)
    rgx, rgw = ref_grads(x, w, rwinv, y, lse, tg, gr, s, 0)
    assert gx.dtype == acc and gw.dtype == w.dtype and gx.shape == x.shape and gw.shape == w.shape
    _close(gx, rgx, tol, "grads: grad_x_hat")
    _close(gw, rgw, tol, "grads: grad_w")
    # fused
    flse, fgx, fgw, fwinv = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)
    r = ref_fused(x, w, tl, tf, y, gr, s)
    assert flse.dtype == fgx.dtype == fwinv.dtype == acc and fgw.dtype == w.dtype
    for got, want, what in zip((flse, fgx, fgw, fwinv), r, ("lse", "grad_x_hat", "grad_w", "w_inv_norm")):
        _close(got, want, tol, "fused: " + what)


@pytest.mark.parametrize("offset,c_total", [(0, 120), (40, 120), (80, 120)])
def test_class_blocks_with_offsets(offset, c_total, small_blocks):
    """A block [offset, offset + 40) of 120 classes: labels elsewhere are non-targets here."""
    x, w, tl, tf, y, gr, s = prim_inputs(9, 40, 6, offset=offset, c_total=c_total, seed=offset)
    m, S, winv = ext.lse_partials(x, w, tl, y, s, offset)
    rm, rS, _ = ref_lse_partials(x, w, tl, y, s, offset)
    _close(m + torch.log(S), rm + torch.log(rS), 1e-10, "lse")
    lse = rm + torch.log(rS) + 1.0  # any lse: the primitive must follow the formula
    gx, gw = ext.grads(x, w, winv, y, lse, tl * 1e-3, gr, s, offset)
    rgx, rgw = ref_grads(x, w, winv, y, lse, tl * 1e-3, gr, s, offset)
    _close(gx, rgx, 1e-10, "grad_x_hat")
    _close(gw, rgw, 1e-10, "grad_w")


def test_partials_merge_across_blocks_equals_fused(small_blocks):
    """Splitting the classes into blocks and merging (M, S) gives the single-block lse."""
    x, w, tl, tf, y, gr, s = prim_inputs(6, 77, 5, seed=5)
    parts = [ext.lse_partials(x, w[o:o + 25], tl, y, s, o) for o in range(0, 77, 25)]
    M = torch.stack([p[0] for p in parts]).amax(0)
    S = sum(p[1] * torch.exp(p[0] - M) for p in parts)
    flse = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)[0]
    _close(M + torch.log(S), flse, 1e-12, "merged lse")


def test_zero_and_tiny_rows_of_w():
    """||W_j|| < 1e-12: w_inv_norm = 1e12 and no projection (F.normalize's backward)."""
    x, w, tl, tf, y, gr, s = prim_inputs(4, 6, 3, seed=1)
    w[2] = 0.0
    w[3] = 1e-14
    r = ref_fused(x, w, tl, tf, y, gr, s)
    got = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)
    assert got[3][2].item() == 1e12 and torch.isfinite(got[0]).all()
    for a, b, what in zip(got, r, ("lse", "gx", "gw", "winv")):
        _close(a, b, 1e-10, what)


def test_nan_input_gives_nan_lse():
    x, w, tl, tf, y, gr, s = prim_inputs(3, 10, 4, dtype=torch.float32)
    x[0, 1] = float("nan")
    m, S, _ = ext.lse_partials(x, w, tl, y, s, 0)
    assert torch.isnan(m[0] + torch.log(S[0])) and torch.isfinite(m[1:] + torch.log(S[1:])).all()
    lse = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)[0]
    assert torch.isnan(lse[0]) and torch.isfinite(lse[1:]).all()
    w[4, 0] = float("inf")
    lse = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)[0]
    assert torch.isnan(lse).all()


def test_exp_polynomial_accuracy():
    """The CPU epilogue's vectorised exp (csrc/ek_math.h) against float64 exp, via lse
    of a single non-target column: lse - target = log(exp(z0) + exp(tl)) - tl."""
    z = torch.linspace(-87.0, 0.0, 20001, dtype=torch.float64)
    b = z.numel()
    x = torch.ones(b, 1, dtype=torch.float32)
    w = torch.ones(2, 1, dtype=torch.float32)
    y = torch.ones(b, dtype=torch.long)  # column 1 is the target, column 0 gives z = s = 1
    tl = (1.0 - z).float()  # max is tl (>= 1), the column-0 term is exp(1 - tl) = exp(z)
    m, S, _ = ext.lse_partials(x, w, tl, y, 1.0, 0)
    got = S.double() - 1.0
    want = torch.exp(z.float().double())
    rel = ((got - want).abs() / want).max().item()
    assert rel < 2e-6 or (got - want).abs().max().item() < 1.2e-7, rel


# ------------------------------------------------------------------ public API (its CPU matrix: tests/test_contract.py)
def run(x, w, y, margin, backend, m=None, **kw):
    return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, margin, m=m, backend=backend, **kw), x, w)


# ------------------------------------------------------------------ error paths (TORCH_CHECKs)
def _good():
    return prim_inputs(4, 10, 3, dtype=torch.float32)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(x=a["x"][0]), "x_hat must be 2-D"),
    (lambda a: a.update(w=a["w"][:, :2]), "w must have shape"),
    (lambda a: a.update(w=a["w"].to(torch.int32)), "w must be float16"),
    (lambda a: a.update(x=a["x"].to(torch.int64)), "x_hat must be float16"),
    (lambda a: a.update(tl=a["tl"][:3]), r"target_logit must have shape \(B,\)"),
    (lambda a: a.update(tf=a["tf"][:3]), r"target_factor must have shape \(B,\)"),
    (lambda a: a.update(gr=a["gr"][None]), r"grad_row must have shape \(B,\)"),
    (lambda a: a.update(y=a["y"].float()), "labels must be int64 or int32"),
    (lambda a: a["y"].__setitem__(0, -2), "labels must be >= -1"),
    (lambda a: a["y"].__setitem__(0, 10), "labels must be < C = 10"),
    (lambda a: a.update(s=0.0), "s must be a finite positive"),
    (lambda a: a.update(s=float("nan")), "s must be a finite positive"),
])
def test_fused_errors(mutate, match):
    x, w, tl, tf, y, gr, s = _good()
    a = dict(x=x, w=w, tl=tl, tf=tf, y=y, gr=gr, s=s)
    mutate(a)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=match):
        ext.fused_forward_grads(a["x"], a["w"], a["tl"], a["tf"], a["y"], a["gr"], a["s"])


def test_lse_partials_and_grads_errors():
    x, w, tl, tf, y, gr, s = _good()
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        ext.lse_partials(x, w, tl, y, s, -1)
    # Labels are only compared with columns (no check, so no device sync): -5, or labels
    # beyond this block (other blocks / ranks own them), substitute nothing, like -1.
    none = ext.lse_partials(x, w, tl, torch.full_like(y, -1), s, 0)
    for far in (torch.full_like(y, -5), y + 1000):
        for a, b in zip(ext.lse_partials(x, w, tl, far, s, 0), none):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    m, S, winv = ext.lse_partials(x, w, tl, y, s, 0)
    lse = m + torch.log(S)
    with pytest.raises(RuntimeError, match=r"w_inv_norm must have shape \(C_local,\)"):
        ext.grads(x, w, winv[:-1], y, lse, tl, gr, s, 0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(B,\)"):
        ext.grads(x, w, winv, y, lse[:2], tl, gr, s, 0)
    with pytest.raises(RuntimeError, match="target_grad must be a floating tensor"):
        ext.grads(x, w, winv, y, lse, y, gr, s, 0)


def test_block_bytes_env_is_validated():
    code = ("import torch, expface_kernels.extension as e; x=torch.randn(2,3); "
            "e.lse_partials(x, x, torch.zeros(2), torch.zeros(2, dtype=torch.long), 1.0, 0)")
    env = dict(os.environ, EXPFACE_EXT_BLOCK_BYTES="lots")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "EXPFACE_EXT_BLOCK_BYTES must be a positive integer" in r.stderr


@needs_cuda
def test_cuda_rejects_float64_and_mixed_devices():
    x, w, tl, tf, y, gr, s = prim_inputs(4, 10, 3, device="cuda")
    with pytest.raises(RuntimeError, match="float64 inputs are supported by the extension on CPU only"):
        ext.lse_partials(x, w, tl, y, s, 0)
    x, w, tl, tf, y, gr, s = prim_inputs(4, 10, 3, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="is on"):
        ext.fused_forward_grads(x, w.cpu(), tl, tf, y, gr, s)
    with pytest.raises(RuntimeError, match="labels must be < C"):
        ext.fused_forward_grads(x, w, tl, tf, y + 10, gr, s)


# ------------------------------------------------------------------ CUDA parity
@needs_cuda
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.float16, torch.float32),
                                           (torch.bfloat16, None)])
@pytest.mark.parametrize("b,c,d", SHAPES + [(256, 5000, 128)])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_cuda_primitives_match_contract(dtype, w_dtype, b, c, d, blocks, monkeypatch):
    if blocks == "small":
        monkeypatch.setattr(ext, "BLOCK_BYTES", 4096)
    tol = _tol(dtype, w_dtype)
    x, w, tl, tf, y, gr, s = prim_inputs(b, c, d, dtype=dtype, w_dtype=w_dtype, seed=c, device="cuda")
    m, S, winv = ext.lse_partials(x, w, tl, y, s, 0)
    rm, rS, rwinv = ref_lse_partials(x.cpu(), w.cpu(), tl.cpu(), y.cpu(), s, 0)
    _close(m + torch.log(S), rm + torch.log(rS), tol, "lse")
    _close(winv, rwinv, tol, "w_inv_norm")
    lse = (m + torch.log(S))
    tg = torch.where(y >= 0, gr * tf * torch.expm1(tl - lse), torch.zeros_like(lse))
    gx, gw = ext.grads(x, w, winv, y, lse, tg, gr, s, 0)
    rgx, rgw = ref_grads(x.cpu(), w.cpu(), winv.cpu(), y.cpu(), lse.cpu(), tg.cpu(), gr.cpu(), s, 0)
    _close(gx, rgx, tol, "grad_x_hat")
    _close(gw, rgw, tol, "grad_w")
    got = ext.fused_forward_grads(x, w, tl, tf, y, gr, s)
    r = ref_fused(x.cpu(), w.cpu(), tl.cpu(), tf.cpu(), y.cpu(), gr.cpu(), s)
    for a, b_, what in zip(got, r, ("lse", "grad_x_hat", "grad_w", "w_inv_norm")):
        _close(a, b_, tol, "fused: " + what)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float16, torch.float32)])
@pytest.mark.parametrize("b,c,d", [(301, 4099, 64), (1103, 2056, 36)])
@pytest.mark.parametrize("chunk", ["one", "1024"])
def test_tile_epilogues_match_contract(device, dtype, w_dtype, b, c, d, chunk, monkeypatch):
    """The chunk epilogues' tiles of R rows (R = 2 at B = 301, R = 4 at B = 1103 on a GPU
    with 76 to 150 SMs; a partial last tile in both), their 16-byte vector path (chunks of
    1024 classes) and scalar path (the last chunk of 4099 = 4 x 1024 + 3), and the
    vectorised / dtype-tagged projection (D = 64 / 36). On CPU: the driver's class chunks
    (a budget of 1030 columns, rounded to 1024) through the CPU epilogues. Columns c-1, 1024 and 1023 (the
    tail, both sides of a chunk edge) hold the largest logit of rows 0, 2 and 3, so a
    column lost at an edge moves those rows' lse by whole units, far above the bfloat16
    tolerance; targets sit there too (rows 4-6). bfloat16's lse is also held against a
    float64 truth built from the bfloat16-rounded GEMM output the kernels see."""
    esize = 4 if dtype == torch.float32 else 2
    if chunk == "1024":
        monkeypatch.setattr(ext, "BLOCK_BYTES", b * esize * 1030)  # 1030 -> 1024 columns
    tol = _tol(dtype, w_dtype)
    x, w, tl, tf, y, gr, s = prim_inputs(b, c, d, dtype=dtype, w_dtype=w_dtype, seed=b, device=device)
    for row, col in ((0, c - 1), (2, 1024), (3, 1023)):
        w[col] = (1.5 * x[row].float()).to(w.dtype)  # cosine 1: the row's largest logit
        y[row] = 5
    y[4:7] = torch.tensor([c - 1, 1024, 1023], device=device)  # targets in the tail and at the edge
    m, S, winv = ext.lse_partials(x, w, tl, y, s, 0)
    rm, rS, rwinv = ref_lse_partials(x.cpu(), w.cpu(), tl.cpu(), y.cpu(), s, 0)
    lse = m + torch.log(S)
    _close(lse, rm + torch.log(rS), tol, "lse")
    _close(winv, rwinv, tol, "w_inv_norm")
    if dtype == torch.bfloat16:
        L = (x.float() @ w.float().t()).bfloat16().double().cpu()  # what cuBLAS hands the epilogue
        z = s * L * winv.double().cpu()
        t = y.cpu()
        rows = torch.nonzero(t >= 0).squeeze(1)
        z[rows, t[rows]] = tl.double().cpu()[rows]
        # 1e-2: cuBLAS and this fp32 product may round an element to neighbouring bf16
        # values (a 2^-8 step, up to ~0.1 of a logit); a lost column moves lse by units.
        _close(lse, torch.logsumexp(z, 1), 1e-2, "lse vs the rounded GEMM output")
    tg = torch.where(y >= 0, gr * tf * torch.expm1(tl - lse), torch.zeros_like(lse))
    gx, gw = ext.grads(x, w, winv, y, lse, tg, gr, s, 0)
    rgx, rgw = ref_grads(x.cpu(), w.cpu(), winv.cpu(), y.cpu(), lse.cpu(), tg.cpu(), gr.cpu(), s, 0)
    _close(gx, rgx, tol, "grad_x_hat")
    _close(gw, rgw, tol, "grad_w")
    assert torch.isfinite(gw).all() and (gw.float().abs().sum(1) > 0).all(), "a grad_w row was not written"


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_api_matches_cpu_extension(reduction):
    x, w, y = make_inputs(64, 3000, 96, dtype=torch.float32, seed=4, ignore=(3,))
    cpu = run(x, w, y, "expface", "extension", reduction=reduction)
    xg, wg = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    gpu = run(xg, wg, y.cuda(), "expface", "extension", reduction=reduction)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-4, atol=1e-6)


# ------------------------------------------------------------------ accuracy of long sums
@pytest.mark.parametrize("b", [1, 2])
def test_cpu_grad_x_accurate_for_one_or_two_rows(b):
    """grad_x over 2^16 classes from 1-2 rows, fp32, against float64: <= 4e-6 relative.
    All-positive cosines make the per-class terms alike, the worst case for a sequential
    sum; MKL runs such thin products as one fp32 chain over K (1.1e-5 here on an AMD
    EPYC), so the driver sums the classes in chunks of 4096 (1.1e-6)."""
    C, D, s = 1 << 16, 512, 8.0
    g = torch.Generator().manual_seed(b)
    x = torch.rand(b, D, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    w = torch.rand(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    labels = torch.randint(0, C, (b,), generator=g)
    winv = 1.0 / w.norm(dim=1)
    gr = torch.full((b,), 1.0 / b, dtype=torch.float64)
    tl = torch.full((b,), 2.0, dtype=torch.float64)
    tf = torch.ones(b, dtype=torch.float64)
    lse, rgx_f, _, _ = ref_fused(x, w, tl, tf, labels, gr, s)
    tg = gr * tf * torch.expm1(tl - lse)
    rgx, _ = ref_grads(x, w, winv, labels, lse, tg, gr, s, 0)
    f32 = lambda t: t.float()  # noqa: E731
    gx, _ = ext.grads(f32(x), f32(w), f32(winv), labels, f32(lse), f32(tg), f32(gr), s, 0)
    _close(gx, rgx, 4e-6, "grads grad_x_hat")
    _, gx_f, _, _ = ext.fused_forward_grads(f32(x), f32(w), f32(tl), f32(tf), labels, f32(gr), s)
    _close(gx_f, rgx_f, 4e-6, "fused grad_x_hat")


# ------------------------------------------------------------------ int64 indexing: B * C > 2^31
def test_int64_indexing_b_times_c_over_2_31():
    """B = 32768 rows x C = 65600 classes (2.15e9 logits > 2^31), D = 4, CPU, fused and
    lse_partials. W repeats k = 3 directions (with different norms), so the float64
    truth follows from the (B, k) cosines and class multiplicities; every row, and the
    grad_w rows of the last classes and of the target classes, are checked."""
    B, C, D, k = 32768, 65600, 4, 3
    assert B * C > 2**31
    g = torch.Generator().manual_seed(0)
    base = torch.randn(k, D, generator=g, dtype=torch.float64)
    base = base / base.norm(dim=1, keepdim=True)
    j = torch.arange(C)
    scale = 1.0 + (j % 5).double()
    w64 = base[j % k] * scale[:, None]
    x64 = torch.randn(B, D, generator=g, dtype=torch.float64)
    x64 = x64 / x64.norm(dim=1, keepdim=True)
    y = torch.randint(0, C, (B,), generator=g)
    y[-1] = C - 1
    s = 16.0
    cb = x64 @ base.t()  # (B, k) cosines against the distinct directions
    ct = cb.gather(1, (y % k)[:, None]).squeeze(1)
    tl = s * (ct - 0.2)
    tf = torch.ones(B, dtype=torch.float64)
    gr = torch.full((B,), 1.0 / B, dtype=torch.float64)
    cnt = torch.bincount(j % k, minlength=k).double()
    sumexp = (cnt * torch.exp(s * cb)).sum(1) - torch.exp(s * ct) + torch.exp(tl)
    lse = torch.log(sumexp)

    x, w = x64.float(), w64.float()
    flse, gx, gw, winv = ext.fused_forward_grads(x, w, tl.float(), tf.float(), y, gr.float(), s)
    _close(flse, lse, 2e-6, "fused lse")
    _close(winv, 1.0 / scale, 1e-6, "w_inv_norm")
    # grad_x_hat = sum_k cnt_k G_k base_k - G_nontarget(y) base_y + tg base_y
    Gk = gr[:, None] * s * torch.exp(s * cb - lse[:, None])  # (B, k) per-class non-target G
    Gt_non = Gk.gather(1, (y % k)[:, None]).squeeze(1)
    tg = gr * tf * torch.expm1(tl - lse)
    gx_ref = (Gk * cnt) @ base + (tg - Gt_non)[:, None] * base[y % k]
    _close(gx, gx_ref, 1e-4, "fused grad_x_hat")  # fp32 sums over 65600 classes
    # grad_w rows: g_j = sum_i G_ij x_i, for non-target j: G_base[j % k]; then the targets' corrections
    g_base = Gk.t() @ x64  # (k, D)
    check = torch.unique(torch.cat([j[-50:], y[:50], y[-50:]]))
    g = g_base[check % k].clone()
    for n_, cls in enumerate(check.tolist()):
        rows = torch.nonzero(y == cls).squeeze(1)
        if rows.numel():
            g[n_] += ((tg[rows] - Gt_non[rows])[:, None] * x64[rows]).sum(0)
    wi = 1.0 / scale[check]
    what = base[check % k]
    gw_ref = wi[:, None] * (g - what * (what * g).sum(1, keepdim=True))
    _close(gw[check], gw_ref, 1e-4, "fused grad_w")
    del gx, gw
    m, S, _ = ext.lse_partials(x, w, tl.float(), y, s, 0)
    _close(m + torch.log(S), lse, 2e-6, "lse_partials")
