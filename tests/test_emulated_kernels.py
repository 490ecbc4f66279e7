"""The extension's CUDA kernels, run on the CPU under an emulation of the CUDA model.

CI has no GPU, so the CUDA kernels of csrc/cuda (their unchanged source, the
``*_kernels.cuh`` headers) are compiled here for the CPU against tests/cuda_emulation/
cuda_emu.h -- a std::thread per CUDA thread, barriers for ``__syncthreads`` and the warp
shuffles -- and each is held to its contract in float64: the chunk epilogues' R-row
tiles (R = 1, 2, 4, a partial last tile) on the 16-byte and scalar paths, rows shorter
than a block's threads and rows needing several sweeps, the target column, ignored
rows, NaN; the fused row kernel; W's norms; both projections; the per-row ops. What it
cannot show: timing, memory-model races, the launchers' choice of R and V (the GPU tests
in test_extension.py run those). Built once per session (~20 s on 2 cores). The file
name avoids "cuda" on purpose: bench/gpu_check.sh selects the GPU tests with
``-k "cuda or gpu"``, and these need no GPU. The last test runs this file again with
the kernels under AddressSanitizer (a read or write past a tensor's end aborts).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from expface_kernels.margins import MARGINS, resolve_margin, target_terms
from expface_kernels.prologue import MARGIN_CODES
from expface_kernels.torch_math import NORM_EPS

pytest.importorskip("expface_kernels.extension",
                    reason="the per-row kernels are compared with the CPU ops of expface_kernels._C")

from util import max_rel_err  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    from torch.utils.cpp_extension import load
    build = tmp_path_factory.mktemp("ek_cuda_emu")
    # EK_EMU_ASAN=1: the kernels built with AddressSanitizer, so that a read or write
    # past a tensor's end stops the test; the Python running them needs the ASan
    # runtime preloaded (test_emulated_kernels_clean_under_address_sanitizer sets it up).
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get("EK_EMU_ASAN") == "1" else []
    preload = os.environ.pop("LD_PRELOAD", None)  # not into the compiler's processes
    try:
        return load(name="ek_cuda_emu", sources=[os.path.join(ROOT, "tests", "cuda_emulation", "emu_kernels.cpp")],
                    extra_include_paths=[os.path.join(ROOT, "csrc", "cuda"),
                                         os.path.join(ROOT, "tests", "cuda_emulation")],
                    extra_cflags=["-O1", "-Wno-unknown-pragmas", "-pthread"] + asan,
                    extra_ldflags=["-pthread"] + asan, build_directory=str(build), verbose=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def _rel(got, want):
    """util.max_rel_err, except that NaN must appear in the same places in both."""
    got, want = got.double(), want.double()
    if torch.isnan(got).any() or torch.isnan(want).any():
        assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs"
        keep = ~torch.isnan(want)
        got, want = got[keep], want[keep]
    return max_rel_err(got, want) if want.numel() else 0.0


TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # fp32 exp of s*c (|s*c| <= 30), one rounding


def _chunk(rows, n, dtype, seed, col0=7):
    g = torch.Generator().manual_seed(seed)
    L = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    winv = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(col0 - 3, col0 + n + 3, (rows,), generator=g)  # some outside the chunk
    labels[0] = col0 + n - 1   # the last column
    if rows > 1:
        labels[1] = -1         # ignored
    # target logits across the range of the row's others (|s * L * winv| up to ~50): the
    # target's term is the largest of its row for some rows, negligible for others
    tl = (torch.rand(rows, generator=g, dtype=torch.float64) * 60).float()
    # the raw logit under each target the largest of its row (s * 2 * winv >= 30 at the
    # tests' s = 30): a kernel that sums it instead of masking it moves lse by units
    t = labels - col0
    for i in torch.nonzero((t >= 0) & (t < n)).squeeze(1).tolist():
        L[i, t[i]] = 2.0
    return L, winv, labels, tl


def _z(L, winv, labels, tl, s, col0):
    """float64 logits of the chunk with the target substituted, and the target mask."""
    z = s * L.double() * winv.double()
    t = labels - col0
    hit = (t >= 0) & (t < L.shape[1])
    rows = torch.nonzero(hit).squeeze(1)
    z[rows, t[rows]] = tl.double()[rows]
    return z, hit, t


TILES = [(False, 1), (True, 1), (True, 2), (True, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vec,R", TILES)
@pytest.mark.parametrize("rows,n", [(5, 16), (7, 40), (3, 4104), (1, 8), (6, 13)])
def test_lse_tile_kernel(emu, dtype, vec, R, rows, n):
    v = 16 // torch.empty((), dtype=dtype).element_size()
    if vec and n % v:
        pytest.skip("the vector path needs n % V == 0 (the launcher checks it)")
    s, col0 = 30.0, 7
    L, winv, labels, tl = _chunk(rows, n, dtype, seed=rows * n)
    g = torch.Generator().manual_seed(1)
    M0 = torch.randn(rows, generator=g) * 5                 # running partials to merge into
    S0 = torch.rand(rows, generator=g) + 0.5
    M0[0], S0[0] = float("-inf"), 0.0                       # the first chunk of a row
    M, S = M0.clone(), S0.clone()
    emu.lse_tile(L, winv, tl, labels, s, col0, M, S, vec, R)
    z, _, _ = _z(L, winv, labels, tl, s, col0)
    prev = (M0.double() + torch.log(S0.double())).unsqueeze(1)
    want = torch.logsumexp(torch.cat([prev, z], 1), 1)
    assert _rel(M.double() + torch.log(S.double()), want) <= 1e-6


@pytest.mark.parametrize("vec,R", TILES)
def test_lse_tile_kernel_nan_row(emu, vec, R):
    L, winv, labels, tl = _chunk(6, 24, torch.float32, seed=3)
    L[2, 5] = float("nan")
    M = torch.full((6,), float("-inf"))
    S = torch.zeros(6)
    emu.lse_tile(L, winv, tl, labels, 16.0, 7, M, S, vec, R)
    lse = M + torch.log(S)
    assert torch.isnan(lse[2]) and torch.isfinite(lse[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vec,R", TILES)
@pytest.mark.parametrize("rows,n", [(5, 16), (7, 40), (3, 4104)])
def test_grads_tile_kernel(emu, dtype, vec, R, rows, n):
    v = 16 // torch.empty((), dtype=dtype).element_size()
    if vec and n % v:
        pytest.skip("the vector path needs n % V == 0 (the launcher checks it)")
    s, col0 = 30.0, 7
    L, winv, labels, tl = _chunk(rows, n, dtype, seed=rows + n)
    L[1, 0] = float("nan")  # in the ignored row: its gradient stays exact zeros
    z, hit, t = _z(L, winv, labels, tl, s, col0)
    lse = (torch.logsumexp(z, 1) + 0.3).float()             # any lse: G's formula is pointwise
    gr = torch.full((rows,), 1.0 / rows)
    gr[labels < 0] = 0.0
    tg = torch.randn(rows, generator=torch.Generator().manual_seed(5))
    out = L.clone()
    emu.grads_tile(out, winv, labels, lse, tg, gr, s, col0, vec, R)
    G = gr.double()[:, None] * s * torch.exp(s * L.double() * winv.double() - lse.double()[:, None])
    rows_hit = torch.nonzero(hit).squeeze(1)
    G[rows_hit, t[rows_hit]] = tg.double()[rows_hit]
    want = G * winv.double()
    want[gr == 0] = 0.0
    assert _rel(out, want) <= TOL[dtype]
    assert (out[gr == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(3, 50), (2, 3000)])
def test_fused_rows_kernel(emu, dtype, rows, n):
    s = 20.0
    L, winv, labels, tl = _chunk(rows, n, dtype, seed=11, col0=0)
    labels[0] = n - 1
    tf = torch.rand(rows) + 0.5
    gr = torch.full((rows,), 0.25)
    if rows > 1:
        gr[1] = 0.0
        labels[1] = -1
    lse, rs, tg = torch.empty(rows), torch.empty(rows), torch.empty(rows)
    out = L.clone()
    emu.fused_rows(out, winv, tl, tf, labels, gr, s, lse, rs, tg)
    z, hit, t = _z(L, winv, labels, tl, s, 0)
    want_lse = torch.logsumexp(z, 1)
    assert _rel(lse, want_lse) <= 1e-6
    # G * winv = row_scale * L_out everywhere (EpilogueOps::fused_rows), with the kernel's
    # own fp32 lse (checked above): where the target dominates, p - 1 ~ 1e-10 is below
    # what an fp32 lse resolves, whoever computes it.
    klse = lse.double()
    G = gr.double()[:, None] * s * torch.exp(z - klse[:, None])
    rows_hit = torch.nonzero(hit).squeeze(1)
    want_tg = gr.double() * tf.double() * torch.expm1(tl.double() - klse)
    G[rows_hit, t[rows_hit]] = want_tg[rows_hit]
    assert _rel(rs.double()[:, None] * out.double(), G * winv.double()) <= 2 * TOL[dtype]
    assert _rel(tg[hit], want_tg[hit]) <= 1e-5
    assert (out[gr == 0] == 0).all() and (rs[gr == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,D", [(9, 40), (3, 1)])
def test_row_inv_norm_kernel(emu, dtype, n, D):
    w = torch.randn(n, D, generator=torch.Generator().manual_seed(n)).to(dtype)
    w[0] = 0
    winv = torch.empty(n)
    emu.row_inv_norm(w, winv)
    want = 1.0 / w.double().norm(dim=1).clamp_min(NORM_EPS)
    assert _rel(winv, want) <= 1e-6


def _projection_truth(gs, w, winv, scale_rows=False):
    gs, w, winv = gs.double(), w.double(), winv.double()
    k = torch.where(winv <= 1e12, winv * winv * (w * gs).sum(1), torch.zeros_like(winv))
    out = gs - k[:, None] * w
    return out * winv[:, None] if scale_rows else out


@pytest.mark.parametrize("g_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)])
@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("n,D", [(11, 64), (3, 512)])
@pytest.mark.parametrize("scale_rows", [False, True])
def test_project_rows_kernels(emu, g_dtype, w_dtype, vec, n, D, scale_rows):
    """scale_rows: gs is the product of normalised rows (fp16 GEMMs), each output row also
    takes its winv_j -- rows of norm ~0.05..20 here, so a missing or doubled scale shows."""
    g = torch.Generator().manual_seed(D + n)
    w = torch.randn(n, D, generator=g) * torch.logspace(-1.3, 1.3, n)[:, None]
    w = w.to(w_dtype)
    if not scale_rows:
        w[1] = 0                                            # clamped norm: a plain copy
    winv = 1.0 / w.double().norm(dim=1).clamp_min(NORM_EPS)
    winv = winv.float()
    gs = torch.randn(n, D, generator=g).to(g_dtype)
    want = _projection_truth(gs, w, winv, scale_rows)
    out = torch.empty(n, D, dtype=w_dtype)
    emu.project_rows(gs, w, winv, out, vec, scale_rows)
    assert _rel(out, want) <= 2 * TOL[w_dtype if w_dtype != torch.float32 else torch.float32] + 1e-6
    if g_dtype == w_dtype:                                  # in place, as the driver calls it
        inplace = gs.clone()
        emu.project_rows(inplace, w, winv, inplace, vec, scale_rows)
        assert torch.equal(inplace, out)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vec,n,D", [(True, 11, 64), (True, 3, 520), (True, 9, 8), (False, 11, 64), (False, 5, 37)])
def test_normalize_rows_kernel(emu, w_dtype, vec, n, D):
    """The fp16 GEMMs' W operand: each row times its winv, formed in fp32 and rounded once
    to fp16 -- bit for bit what ATen's broadcast multiply (the CPU op) gives."""
    g = torch.Generator().manual_seed(n * D)
    w = (torch.randn(n, D, generator=g) * torch.logspace(-3.5, 1, n)[:, None]).to(w_dtype)
    winv = (1.0 / w.double().norm(dim=1).clamp_min(NORM_EPS)).float()
    out = torch.full((n, D), float("nan"), dtype=torch.float16)   # every element must be written
    emu.normalize_rows(w, winv, out, vec)
    assert torch.equal(out, (w.float() * winv[:, None]).half())
    assert _rel(out, w.double() * winv.double()[:, None]) <= 1e-3


# ------------------------------------------------------------------ the per-row ops
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("B,C,D,offset", [(11, 9, 37, 2), (1, 3, 1, 0), (4, 0, 8, 0)])
@pytest.mark.parametrize("x_hat_dtype", [None, torch.bfloat16])  # bf16: x̂ under autocast
def test_prologue_kernel_matches_cpu_op(emu, x_dtype, w_dtype, B, C, D, offset, x_hat_dtype):
    g = torch.Generator().manual_seed(B * D)
    x = torch.randn(B, D, generator=g).to(x_dtype)
    w = torch.randn(C, D, generator=g).to(w_dtype)
    y = torch.randint(-2, C + offset + 2, (B,), generator=g)
    if B > 3:
        x[3] = 0
    want = torch.ops.expface_kernels.prologue(x, w, y, offset, -2, x_hat_dtype)
    got = [torch.empty_like(t) for t in want]
    assert got[0].dtype == (x_hat_dtype or x_dtype)
    emu.prologue(x, w, y.int() if B % 2 else y, offset, -2, *got)
    for a, b, name in zip(got, want, ("x_hat", "x_inv", "labels", "kept", "c_t")):
        tol = 1e-12 if b.dtype == torch.float64 else 1e-5
        if name == "x_hat" and got[0].dtype in (torch.float16, torch.bfloat16):
            tol = 1e-2                                      # the last bit of a rounding may differ
        assert _rel(a, b) <= tol, name


@pytest.mark.parametrize("margin,m", [("expface", None), ("arcface", None), ("cosface", None),
                                      ("sphereface", None), ("combined", (1.2, 0.3, 0.1)), ("none", None)])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_terms_kernel(emu, margin, m, exact, dtype):
    spec, mv = resolve_margin(margin, m)
    c = torch.cat([torch.linspace(-1, 1, 101, dtype=torch.float64), torch.tensor([1.0, -1.0, float("nan")],
                                                                                 dtype=torch.float64)]).to(dtype)
    m1, m2, m3 = mv if isinstance(mv, tuple) else (mv, 0.0, 0.0)
    logit, factor = torch.empty_like(c), torch.empty_like(c)
    emu.margin_terms(c, MARGIN_CODES[margin], m1, m2, m3, 64.0, exact, logit, factor)
    want = target_terms(c, spec, mv, 64.0, "exact" if exact else "straight_through")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(logit, want[0]) <= tol and _rel(factor, want[1]) <= tol
    assert set(MARGIN_CODES) == set(MARGINS)


@pytest.mark.parametrize("x_dtype,acc", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float64, torch.float64)])
def test_normalize_backward_kernel_matches_cpu_op(emu, x_dtype, acc):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 70, generator=g).to(x_dtype)
    x[4] = 0
    x_inv = (1.0 / x.double().norm(dim=1).clamp_min(NORM_EPS)).to(acc)
    gx = torch.randn(10, 70, generator=g, dtype=acc)
    want = torch.ops.expface_kernels.normalize_backward(x, x_inv, gx)
    out = torch.empty_like(x)
    emu.normalize_backward(x, x_inv, gx, out)
    assert _rel(out, want) <= (1e-12 if acc == torch.float64 else 1e-5 if x_dtype == torch.float32 else 1e-2)
    assert math.isfinite(float(out.double().abs().max()))


def _asan_runtime():
    """Paths of libasan and libstdc++ of the compiler torch builds with, or None.

    Both are preloaded into the Python under test: libstdc++ first loaded after libasan
    leaves ASan's ``__cxa_throw`` interceptor unresolved (it aborts at the first C++
    exception, seen in Triton's import)."""
    paths = []
    for lib in ("libasan.so", "libstdc++.so.6"):
        try:
            out = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={lib}"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not (os.path.isabs(out) and os.path.exists(out)):
            return None
        paths.append(os.path.realpath(out))
    return paths


@pytest.mark.skipif(os.environ.get("EK_EMU_ASAN") == "1", reason="this is the AddressSanitizer run itself")
def test_emulated_kernels_clean_under_address_sanitizer(tmp_path):
    """Every test above again, the kernels built with -fsanitize=address: an index past a
    row's or tensor's end (a tail bound, a 16-byte load over the end of a chunk, a partial
    tile) stops the run with a report. Checked: the logsumexp tile's column loop made one
    vector too long fails here (heap-buffer-overflow). ~75 s on 2 cores."""
    libs = _asan_runtime()
    if libs is None:
        pytest.skip("the C++ compiler ships no AddressSanitizer runtime")
    env = dict(os.environ, EK_EMU_ASAN="1", LD_PRELOAD=" ".join(libs),
               ASAN_OPTIONS=f"detect_leaks=0:log_path={tmp_path / 'asan'}")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert r.returncode == 0 and not reports, r.stdout[-3000:] + r.stderr[-2000:] + reports[:4000]
