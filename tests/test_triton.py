"""The Triton backend: kernels against the float64 contract formulas and the reference.

Without a CUDA device the kernels run in Triton's CPU interpreter (exact fp32, no bf16),
so TRITON_INTERPRET=1 must be set before triton is imported -- done here at the very top
(and in conftest.py) so that this module also works when run on its own. Shapes are
small and odd (C not a multiple of any tile, C smaller than a tile, D odd, B = 1) and
the interpreter launch configs (configs.py) cut even these into several class splits
and backward chunks, so every path of the kernels runs.

GPU-only tests (bf16/fp16, 2^31-element W, the GPU launch configs) skip without CUDA.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # importing torch does not import triton

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import math

import pytest
import torch
import torch.nn.functional as F

import expface_kernels as ek
from expface_kernels import backends

from util import MARGIN_CASES, ground_truth, loss_and_grads, make_inputs, max_rel_err

HAS_CUDA = torch.cuda.is_available()
TRITON_WHY = ek.available_backends("cuda" if HAS_CUDA else "cpu")["triton"]
# In CI (CI=true) these interpreter tests are issue 3's acceptance: a backend that cannot
# run there fails them with its reasons instead of skipping them all.
_IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
pytestmark = pytest.mark.skipif(TRITON_WHY is not None and not _IN_CI,
                                reason=f"triton backend: {TRITON_WHY}")

DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _tk():
    from expface_kernels.triton_kernels import configs, grads_backward, lse_forward, ops
    return configs, lse_forward, grads_backward, ops


# --------------------------------------------------------------------------------------
# The contract formulas in float64 (/tmp/contract.md), independent of the package.


def contract_lse_partials(x_hat, w, target_logit, labels, s, offset):
    x, w = x_hat.double(), w.double()
    inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
    z = s * (x @ w.t()) * inv
    col = labels.long() - offset
    hit = torch.nonzero((col >= 0) & (col < w.shape[0])).squeeze(1)
    z[hit, col[hit]] = target_logit.double()[hit]
    m = z.max(1).values
    return m, torch.exp(z - m[:, None]).sum(1), inv


def contract_grads(x_hat, w, w_inv, labels, lse, target_grad, grad_row, s, offset):
    x, w, inv = x_hat.double(), w.double(), w_inv.double()
    c = (x @ w.t()) * inv
    G = grad_row.double()[:, None] * s * torch.exp(s * c - lse.double()[:, None])
    col = labels.long() - offset
    hit = torch.nonzero((col >= 0) & (col < w.shape[0])).squeeze(1)
    G[hit, col[hit]] = target_grad.double()[hit]
    w_hat = w * inv[:, None]
    gx = G @ w_hat
    g = G.t() @ x
    radial = (w_hat * g).sum(1, keepdim=True)
    radial = torch.where((inv < 1e12)[:, None], radial, torch.zeros_like(radial))
    # Second value: the scale of grad_w before the projection (grad_w itself is ~0 when
    # D = 1: a 1-D direction has no tangent), used to normalise its error.
    return gx, inv[:, None] * (g - w_hat * radial), (inv[:, None] * g).abs().max()


def primitive_inputs(b, c, d, offset, seed=0, s=30.0, dtype=torch.float32, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x_hat = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.05
    # Labels spread over a wider global range than the block: some rows have their
    # target here, some in other blocks, row 0 is ignored (-1).
    labels = torch.randint(max(0, offset - 3), offset + c + 3, (b,), generator=g)
    labels[0] = -1
    tlogit = s * (torch.rand(b, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    lse = s * (0.9 + 0.2 * torch.rand(b, generator=g, dtype=torch.float64)) + math.log(c + 1)
    tgrad = torch.randn(b, generator=g, dtype=torch.float64)
    grow = torch.rand(b, generator=g, dtype=torch.float64)
    tgrad[0] = grow[0] = 0.0
    f32 = dict(device=DEV, dtype=torch.float32)
    return dict(x_hat=x_hat.to(device=DEV, dtype=dtype), w=w.to(device=DEV, dtype=w_dtype or dtype),
                target_logit=tlogit.to(**f32), labels=labels.to(DEV), lse=lse.to(**f32),
                target_grad=tgrad.to(**f32), grad_row=grow.to(**f32), s=s, offset=offset)


def run_primitives(a, fwd_config=None, grads_config=None):
    _, lse_forward, grads_backward, _ = _tk()
    m, se, inv = lse_forward.lse_partials(a["x_hat"], a["w"], a["target_logit"], a["labels"],
                                          a["s"], a["offset"], config=fwd_config)
    gx, gw = grads_backward.grads(a["x_hat"], a["w"], inv, a["labels"], a["lse"], a["target_grad"],
                                  a["grad_row"], a["s"], a["offset"], config=grads_config)
    return m, se, inv, gx, gw


def check_primitives(a, tol=1e-5, **cfg):
    m, se, inv, gx, gw = run_primitives(a, **cfg)
    rm, rse, rinv = contract_lse_partials(a["x_hat"], a["w"], a["target_logit"], a["labels"],
                                          a["s"], a["offset"])
    rgx, rgw, gw_scale = contract_grads(a["x_hat"], a["w"], rinv, a["labels"], a["lse"],
                                        a["target_grad"], a["grad_row"], a["s"], a["offset"])
    assert m.dtype == se.dtype == inv.dtype == gx.dtype == torch.float32
    assert gw.dtype == a["w"].dtype and gw.shape == a["w"].shape and gx.shape == a["x_hat"].shape
    for name, got, want in (("row_max", m, rm), ("row_sumexp", se, rse), ("w_inv_norm", inv, rinv),
                            ("grad_x", gx, rgx), ("grad_w", gw, rgw)):
        if name == "grad_w":
            err = float((got.cpu().double() - want.cpu()).abs().max() / gw_scale.clamp_min(1e-30))
        else:
            err = max_rel_err(got.cpu(), want.cpu())
        assert err <= tol, f"{name}: max rel err {err:.3g} > {tol}"


# --------------------------------------------------------------------------------------
# Primitives (the kernels themselves) against the contract.

SHAPES = [(1, 1, 1), (1, 5, 7), (3, 37, 33), (17, 130, 33), (17, 130, 7), (3, 130, 1)]


@pytest.mark.parametrize("b,c,d", SHAPES)
@pytest.mark.parametrize("offset", [0, 20])
def test_primitives_match_contract(b, c, d, offset):
    check_primitives(primitive_inputs(b, c, d, offset, seed=b * 1000 + c + d))


def test_primitives_many_splits_and_chunks():
    """Tiny tiles: many row tiles, class splits, backward chunks and dx splits at once."""
    configs, _, _, _ = _tk()
    t = configs.GemmTile(16, 16, 16, 4, 1)
    fwd = configs.ForwardConfig(t, target_programs=7)
    grd = configs.GradsConfig(t, t, t, chunk_bytes=37 * 48 * 4, target_programs=64,
                              max_dx_partial_bytes=1 << 20)
    check_primitives(primitive_inputs(37, 130, 33, 5, seed=3), fwd_config=fwd, grads_config=grd)


@pytest.mark.parametrize("c", [128, 130])
def test_primitives_full_tiles_take_the_unmasked_loads(c):
    """B, D multiples of every tile (16): every GEMM load is unmasked (EVEN_K, DW_EVEN,
    and DX_EVEN in each full chunk); C = 130 leaves a ragged last chunk (DX_EVEN off
    there) and a last class tile whose padding classes read a clamped W row."""
    configs, _, _, _ = _tk()
    t = configs.GemmTile(16, 16, 16, 4, 1)
    fwd = configs.ForwardConfig(t, target_programs=5)
    grd = configs.GradsConfig(t, t, t, chunk_bytes=32 * 32 * 4, target_programs=16,
                              max_dx_partial_bytes=1 << 20)
    check_primitives(primitive_inputs(32, c, 32, 3, seed=c), fwd_config=fwd, grads_config=grd)


def test_grads_padding_rows_add_nothing_at_a_large_scale():
    """The G kernel's padding rows (B = 17 in 32-row tiles) read the last real row
    (clamped), whose cosine with class 3 is 1 here: at s = 100 its logit times log2(e) is
    144, past fp32's 2^128. Their lse padding (+inf) must make p = 0, not 0 * inf = NaN in
    the radial partials r that grad_w sums over the rows."""
    a = primitive_inputs(17, 37, 7, offset=0, seed=21, s=100.0)
    a["x_hat"][16] = F.normalize(a["w"][3].double(), dim=0).to(a["x_hat"].dtype)
    a["lse"][16] = 150.0  # a real row keeps a finite p
    check_primitives(a)


def test_forward_with_norms_from_a_separate_pass():
    """ForwardConfig.norms_in_loop=False: the row norms from _row_inv_norm_kernel."""
    configs, _, _, _ = _tk()
    t = configs.GemmTile(16, 16, 16, 4, 1)
    fwd = configs.ForwardConfig(t, target_programs=3, norms_in_loop=False)
    check_primitives(primitive_inputs(17, 130, 33, 0, seed=8), fwd_config=fwd)
    a = primitive_inputs(5, 37, 7, offset=0, seed=9)
    a["w"][3] = 0.0  # a zero centre: its inverse norm clamped at 1e12, as in the loop
    check_primitives(a, fwd_config=fwd)


def test_int32_labels_and_block_without_targets():
    a = primitive_inputs(17, 37, 7, offset=0, seed=4)
    a["labels"] = a["labels"].to(torch.int32)
    check_primitives(a)
    # A block far from every label: nothing substituted, target_grad unused.
    b = primitive_inputs(5, 37, 7, offset=1000, seed=5)
    b["labels"] = torch.tensor([-1, 3, 4, 5, 999], device=DEV)
    check_primitives(b)


def test_empty_block():
    """C_local = 0 (an empty shard): neutral partials, zero gradients, no launch."""
    _, lse_forward, grads_backward, _ = _tk()
    a = primitive_inputs(3, 5, 7, offset=0, seed=13)
    w = a["w"][:0]
    m, se, inv = lse_forward.lse_partials(a["x_hat"], w, a["target_logit"], a["labels"], 30.0, 5)
    assert torch.isneginf(m).all() and (se == 0).all() and inv.shape == (0,)
    gx, gw = grads_backward.grads(a["x_hat"], w, inv, a["labels"], a["lse"], a["target_grad"],
                                  a["grad_row"], 30.0, 5)
    assert gx.shape == a["x_hat"].shape and (gx == 0).all() and gw.shape == (0, 7)


def test_zero_and_tiny_centres():
    """Zero / below-the-floor W rows: finite, and no radial projection (F.normalize)."""
    a = primitive_inputs(9, 37, 7, offset=0, seed=6)
    w = a["w"].clone()
    w[3] = 0.0
    w[5] = 1e-14  # ||W_5|| < 1e-12: inverse norm clamped to 1e12
    a["w"] = w
    a["x_hat"][2] = 0.0  # a zero embedding
    m, se, inv, gx, gw = run_primitives(a)
    for t in (m, se, inv, gx, gw):
        assert torch.isfinite(t).all()
    check_primitives(a, tol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the NaN row's max
def test_nan_input_gives_nan():
    a = primitive_inputs(5, 37, 7, offset=0, seed=7)
    a["x_hat"][1, 2] = float("nan")
    m, se, _, _, _ = run_primitives(a)
    lse = m + torch.log(se)
    assert torch.isnan(lse[1])
    assert torch.isfinite(lse[[0, 2, 3, 4]]).all()


def test_mixed_dtype_fp16_x_fp32_w():
    """fp16 embeddings with fp32 W: the GEMM in fp16 (interpreter: numpy fp16 -> fp32 acc)."""
    a = primitive_inputs(17, 130, 33, offset=0, seed=8, dtype=torch.float16, w_dtype=torch.float32)
    m, se, inv, gx, gw = run_primitives(a)
    assert gw.dtype == torch.float32
    rm, rse, rinv = contract_lse_partials(a["x_hat"], a["w"], a["target_logit"], a["labels"], a["s"], 0)
    assert max_rel_err(inv.cpu(), rinv.cpu()) < 1e-6  # norms from the fp32 tile
    # W rounded to fp16 for the GEMM: ~2^-11 relative on each cosine, times s = 30.
    assert max_rel_err(m.cpu(), rm.cpu()) < 5e-3
    lse = (m.double() + se.double().log()).cpu()
    rlse = (rm + rse.log()).cpu()
    assert (lse - rlse).abs().max() < 0.05


def test_fake_impls_match_real_outputs():
    """register_fake gives the same shapes/dtypes as the kernels (torch.library.opcheck)."""
    _, _, _, ops = _tk()
    a = primitive_inputs(3, 37, 7, offset=0, seed=9)
    torch.library.opcheck(ops.lse_partials, (a["x_hat"], a["w"], a["target_logit"], a["labels"], a["s"], 0),
                          test_utils=("test_schema", "test_faketensor"))
    _, _, inv = ops.lse_partials(a["x_hat"], a["w"], a["target_logit"], a["labels"], a["s"], 0)
    torch.library.opcheck(ops.grads, (a["x_hat"], a["w"], inv, a["labels"], a["lse"], a["target_grad"],
                                      a["grad_row"], a["s"], 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_lengths_raise_before_launch():
    """A short vector would be read out of bounds by the kernels: the host refuses it."""
    _, lse_forward, grads_backward, _ = _tk()
    a = primitive_inputs(5, 37, 7, offset=0, seed=10)
    with pytest.raises(ValueError, match="target_logit"):
        lse_forward.lse_partials(a["x_hat"], a["w"], a["target_logit"][:3], a["labels"], 30.0, 0)
    with pytest.raises(ValueError, match="w must be"):
        lse_forward.lse_partials(a["x_hat"], a["w"][:, :3], a["target_logit"], a["labels"], 30.0, 0)
    inv = torch.ones(36, device=DEV)
    with pytest.raises(ValueError, match="w_inv_norm must have 37"):
        grads_backward.grads(a["x_hat"], a["w"], inv, a["labels"], a["lse"], a["target_grad"],
                             a["grad_row"], 30.0, 0)


def _compile_for_cuda(args, timeout=900):
    """Run ``python args`` outside the interpreter (kernels compiled for a GPU that is not
    here, with the CUDA tools bundled with Triton); skip only where a tool is missing, fail
    on any other error (a ptxas that rejects the PTX, output compile_check cannot read).
    Returns the JSON the script printed after ``RESULT`` (None if it printed none)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and ("missing tool" in proc.stderr or "No such file" in proc.stderr):
        pytest.skip(f"cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.split("RESULT", 1)[1]) if "RESULT" in proc.stdout else None


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run compiles these kernels for its own GPU anyway")
def test_kernels_compile_for_hopper_and_ampere():
    """Without a GPU: compile the kernels for sm_90 / sm_80 with the configs' default tiles
    (bundled ptxas) -- no register spills, shared memory within the SM, pipelined loads."""
    _compile_for_cuda(["-m", "expface_kernels.triton_kernels.compile_check", "--arch", "90", "80",
                       "--dtypes", "bf16", "fp16-fp32"], timeout=600)


_RING_SCRIPT = """
import json
from expface_kernels.triton_kernels import compile_check, configs, lse_forward
from expface_kernels.triton_kernels.common import DOT_BF16
sig = dict(x_ptr="*bf16", w_ptr="*bf16", tlogit_ptr="*fp32", labels_ptr="*i64", pmax_ptr="*fp32",
           psum_ptr="*fp32", winv_ptr="*fp32", B="i32", C="i32", D="i32", offset="i32", s="fp32",
           stride_xb="i32", stride_wc="i32", tiles_per_split="i32", num_row_tiles="i32")
tile = configs.GemmTile(128, 128, 64, 8, 3)
out = {}
for in_loop in (True, False):
    const = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, DOT_KIND=DOT_BF16, INPUT_PRECISION="tf32",
                 NORMS_IN_LOOP=in_loop, FAST_EXP2=True, EVEN_K=True)
    sig_c = dict(sig, **{k: "constexpr" for k in const})
    r = compile_check.compile_one(lse_forward._lse_partials_kernel, sig_c, const, 90, tile)
    out[str(in_loop)] = {k: r[k] for k in ("ring", "wgmma_in_flight", "ring_hazard")}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run compiles these kernels for its own GPU anyway")
def test_no_autotune_candidate_races_on_hopper():
    """Every Hopper launch config the autotuner may pick (bf16, fp16, tf32 fp32): no
    shared-memory ring a wgmma reads is shallower than the stages (compile_check), no
    candidate spills inside a loop (such a candidate cannot win; timing it only spends
    the GPU check's minutes). Spills outside the loops run once per program: with Triton
    3.9 two 128x256 forward candidates spill 12-16 bytes before their tile loop."""
    code = ("import json, os\n"
            "from expface_kernels.triton_kernels.compile_check import check\n"
            "rows = check(90, 'bf16', 1024, 1 << 20, 512, True) + check(90, 'fp16', 512, 1 << 20, 512, True)\n"
            "os.environ['EXPFACE_CHECK_PRECISION'] = 'tf32'\n"
            "rows += check(90, 'fp32', 512, 1 << 20, 512, True)\n"
            "print('RESULT' + json.dumps([[r['kernel'], r['dtypes'], r['tile'], r['warps'], r['stages'],\n"
            "                              r['ring'], r['loop_spills'], r['ring_hazard']] for r in rows]))\n")
    rows = _compile_for_cuda(["-c", code])
    assert len(rows) >= 10
    assert not [r for r in rows if r[-1]], rows
    assert not [r for r in rows if r[-2] != 0], rows


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run compiles these kernels for its own GPU anyway")
def test_ring_hazard_detector_flags_the_in_loop_norms_on_hopper():
    """compile_check.ring_hazard: the forward with W's norms squared in the K loop gets a
    2-deep W ring under a wgmma left in flight (the race seen on an H200); with the norms
    from the separate pass every ring a wgmma reads is 3 deep. Compiled for sm_90 with
    the bundled ptxas, outside the interpreter (a subprocess)."""
    found = _compile_for_cuda(["-c", _RING_SCRIPT], timeout=600)
    assert found["True"]["wgmma_in_flight"] and found["True"]["ring_hazard"], found
    assert not found["False"]["ring_hazard"] and found["False"]["ring"] == 3, found


def test_compile_check_reads_ptxas_performance_advisories():
    """compile_check fails a kernel on ptxas's "Potential Performance Loss" lines; the
    parser reads the line Triton's bundled ptxas (12.8, 12.9) printed for a fused G/dW kernel tried
    on 2026-12-03, and nothing from the usual -v lines."""
    from expface_kernels.triton_kernels import compile_check as cc
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to non wgmma instructions defining accumulator registers of a wgmma "
           "between start and end of the pipeline stage in the function '_grad_logits_dw_kernel'\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert cc.ptxas_advisories(log) == [(
        "C7515", "wgmma.mma_async instructions are serialized due to non wgmma instructions "
        "defining accumulator registers of a wgmma between start and end of the pipeline stage")]
    assert cc.ptxas_advisories(log.splitlines()[1]) == []


def test_compile_check_verdict():
    """The check's verdict per kernel: '' for a clean one, else the most specific reason."""
    from expface_kernels.triton_kernels import compile_check as cc
    clean = dict(ring_hazard=False, ptxas_advisories=[], spill_bytes=0, loop_spills=0, shared=100_000,
                 smem_limit=232_448, async_copies=4)
    assert cc.check_failure(clean) == ""
    assert cc.check_failure({**clean, "spill_bytes": 16}) == ""  # outside every loop: once a program
    for change, want in [
        (dict(spill_bytes=224, loop_spills=3), "3 local-memory instructions inside loops (spills)"),
        (dict(shared=232_449), "check"), (dict(async_copies=0), "check"),
        (dict(ptxas_advisories=[("C7515", "wgmma serialized")]), "ptxas C7515: wgmma serialized"),
        (dict(ring_hazard=True, loop_spills=8), "ring shallower than the stages with a wgmma in flight"),
    ]:
        assert cc.check_failure({**clean, **change}) == want, change


def test_compile_check_counts_loop_issue_and_occupancy():
    """compile_check's SASS analysis on a hand-written loop nest: only the innermost MMA
    loop is reported, with its instructions and issue cycles over tensor-core cycles;
    programs per SM from registers, shared memory and warp slots."""
    from expface_kernels.triton_kernels import compile_check as cc

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R2, 0x1, R3 ;
.L_x_1:
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*0050*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   FADD R5, R5, R6 ;
        /*0080*/              @P1 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""
    loops = cc.mma_loops(sass, num_warps=8, cap=90)
    # 5 instructions x 2 warps a scheduler = 10 issue cycles; 2 HGMMA x 2 warpgroups x
    # 2*64*128*16 flops = 1,048,576 flops at 4096 a cycle = 256 tensor-core cycles.
    assert loops == [{"instructions": 5, "issue_ratio": 10 / 256}]
    assert cc.mma_loops(sass, num_warps=8, cap=86) == [{"instructions": 5, "issue_ratio": None}]
    assert cc.mma_loops(sass.replace("HGMMA", "FMUL"), num_warps=8, cap=90) == []
    assert cc.ctas_per_sm(255, 96 << 10, 4, 90) == 2   # registers and shared memory: 2
    assert cc.ctas_per_sm(255, 96 << 10, 8, 90) == 1   # 8 warps x 32 x 256 registers: 1
    assert cc.ctas_per_sm(128, 16 << 10, 4, 86) == 4   # registers: 4 (shared memory: 5)
    assert cc.ctas_per_sm(-1, 0, 4, 90) == 0


def test_compile_check_reads_spills_and_fails_loudly(monkeypatch, capsys, tmp_path):
    """Spills from SASS: the bytes of the local stores, and the local loads / stores inside
    a loop (including a loop closed by a branch with a predicate operand). A tool that
    fails or prints something unreadable raises CompileCheckError and makes the CLI exit
    2 with the message -- never a -1 in the table."""
    import sys

    from expface_kernels.triton_kernels import compile_check as cc
    sass = """
        /*0000*/                   STL [R1], R9 ;
        /*0010*/                   STL.64 [R1+0x8], R10 ;
.L_x_0:
        /*0020*/                   FFMA R2, R2, R3, R4 ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/              @!P0 BRA P1, `(.L_x_0) ;
        /*0050*/                   STL.128 [R1+0x10], R12 ;
        /*0060*/                   FFMA R2, R2, R3, R4 ;
        /*0070*/                   EXIT ;
"""
    assert cc.local_memory(sass) == {"spill_bytes": 4 + 8 + 16, "loop_spills": 1}
    assert cc.local_memory(sass.replace("LDL R5, [R1]", "FADD R5, R5, R6")) == {
        "spill_bytes": 28, "loop_spills": 0}
    assert cc.fp_ops(sass) == {"ffma": 2, "sass": 8}
    usage = " Function _grad_logits_kernel:\n  REG:246 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:640\n"
    assert cc.resource_usage(usage) == {"registers": 246, "stack_bytes": 8}
    with pytest.raises(cc.CompileCheckError, match="cannot read the registers"):
        cc.resource_usage("cuobjdump info: nothing")
    with pytest.raises(cc.CompileCheckError, match="exit 3.*PTX too new"):
        cc._run_tool([sys.executable, "-c", "import sys; sys.stderr.write('PTX too new'); sys.exit(3)"],
                     "ptxas", "x", ".ptx")
    with pytest.raises(cc.CompileCheckError, match="missing tool"):
        cc._run_tool([str(tmp_path / "no-such-ptxas")], "ptxas", "x", ".ptx")

    def broken(*args, **kw):
        raise cc.CompileCheckError("compile_check: ptxas -arch=sm_90a failed (exit 255): Unsupported .version")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main refuses to run under it
    monkeypatch.setattr(cc, "check", broken)
    assert cc.main(["--arch", "90", "--dtypes", "bf16"]) == 2
    assert "Unsupported .version" in capsys.readouterr().err


_TRITON_LOG_SCRIPT = """
import contextlib, io, json, re
import triton
from triton import knobs
from expface_kernels.triton_kernels import compile_check as cc
fused = {f: {r["kernel"]: r for r in cc.check(90, "bf16", 512, 1 << 20, 512, fp_fusion_on=f)}
         for f in (True, False)}
# The same kernels again, recompiled, with the log of Triton's own ptxas run printed.
knobs.nvidia.dump_ptxas_log = True
knobs.compilation.always_compile = True
compile_, logs = triton.compile, []
def logged(*args, **kw):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = compile_(*args, **kw)
    logs.append(buf.getvalue())
    return k
triton.compile = logged
rows = cc.check(90, "bf16", 512, 1 << 20, 512)
out = {"ours": [[r["kernel"], r["registers"], r["spill_bytes"]] for r in rows],
       "triton": [[int(re.search(r"Used (\\d+) registers", t).group(1)),
                   int(re.search(r"(\\d+) bytes spill stores", t).group(1))] for t in logs],
       "fusion": {k: [[fused[f][k]["ffma"], fused[f][k]["sass"]] for f in (True, False)]
                  for k in fused[True]}}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run compiles these kernels for its own GPU anyway")
def test_compile_check_reports_tritons_own_build_and_fp_fusion():
    """compile_check's registers and spills are those of the cubin Triton built: the same
    numbers as the log of Triton's own ptxas run (which Triton 3.9 makes with a newer
    ptxas for sm_90 than the one it bundles for sm_80). And FP fusion on gives the G and
    dW/dX kernels FMAs and fewer SASS instructions than off (configs.fp_fusion's reason)."""
    found = _compile_for_cuda(["-c", _TRITON_LOG_SCRIPT])
    assert len(found["ours"]) == len(found["triton"]) == 3, found
    for (kernel, regs, spill), (t_regs, t_spill) in zip(found["ours"], found["triton"]):
        assert (regs, spill) == (t_regs, t_spill), (kernel, found)
        assert 0 < regs <= 255
    for kernel in ("grad_logits", "grad_wx"):
        (ffma_on, sass_on), (ffma_off, sass_off) = found["fusion"][kernel]
        assert ffma_on > 0 and ffma_off == 0 and sass_on < sass_off, (kernel, found["fusion"])


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA run compiles these kernels for its own GPU anyway")
def test_dx_loop_takes_w_from_shared_memory_on_hopper():
    """GradsConfig.scale_g: with G scaled by 1/||W_j|| the dX loop multiplies the W tile as
    loaded, straight from shared memory (issue ratio < 0.8 on sm_90, bf16); with the
    W tile normalised in registers first it issues about twice the instructions (ratio
    ~1: bound by issue -- 0.99 against 0.51 with Triton 3.8, 2026-12-02). Compiled with
    the bundled ptxas in a subprocess, outside the interpreter."""
    code = ("import json\n"
            "from expface_kernels.triton_kernels.compile_check import check\n"
            "rows = [r for r in check(90, 'bf16', 512, 1 << 20, 512, True) if r['kernel'] == 'grad_wx'\n"
            "        and r['tile'] == '128x128x64+128x128x64' and r['warps'] == 8]\n"
            "print('RESULT' + json.dumps([[r['constexprs']['SCALE_G'], [lp['issue_ratio'] for lp in r['mma_loops']]]\n"
            "                             for r in rows]))\n")
    found = dict((scaled, ratios) for scaled, ratios in _compile_for_cuda(["-c", code]))
    assert set(found) == {True, False}, found
    assert len(found[True]) == 2 and max(found[True]) < 0.8, found   # dX and dW loops
    assert max(found[False]) > 1.5 * max(found[True]), found


@pytest.mark.parametrize("kind", ["hopper", "ampere", "consumer"])
def test_gpu_config_candidates_are_all_correct(kind, monkeypatch):
    """Every launch config the GPU heuristics or the autotuner can pick (Hopper/Ampere/
    consumer tiles: 128x128, 256-wide, ...) computes the same numbers -- run here under
    the interpreter (or on this GPU) on an odd shape."""
    configs, _, _, _ = _tk()
    from expface_kernels.triton_kernels import autotune

    a = primitive_inputs(37, 300, 33, offset=7, seed=12)
    sms = {"hopper": 132, "ampere": 108, "consumer": 58}[kind]
    monkeypatch.setattr(configs, "device_kind", lambda device: (kind, sms, 40 << 20))
    dev = torch.device("cuda")
    fwd = configs.forward_candidates(dev, 37, 300, 33, torch.float32, 4)
    grd = configs.grads_candidates(dev, 37, 300, 33, torch.float32, 4)
    assert fwd[0] == configs.forward_config(dev, 37, 300, 33, torch.float32, 4)
    monkeypatch.undo()
    from triton.runtime.errors import OutOfResources

    for f, g in zip(fwd, grd + grd[-1:] * (len(fwd) - len(grd))):
        try:
            check_primitives(a, fwd_config=f, grads_config=g)
        except OutOfResources:  # a real GPU of another kind: the autotuner skips these too
            assert HAS_CUDA
    # The autotuner keeps the fastest working candidate, skipping failing ones.
    timings = iter([3.0, 1.0, 2.0])

    def timer(run):
        run()
        return next(timings)

    def run(cfg):
        if cfg == "bad":
            raise RuntimeError("out of resources")

    assert autotune.pick(("test", kind), ["a", "bad", "b", "c"], run, timer=timer) == "b"
    assert autotune.pick(("test", kind), ["a"], run, timer=timer) == "b"  # cached


@pytest.mark.parametrize("env,want", [(None, True), ("1", True), ("0", False)])
def test_every_launch_sets_fp_fusion(env, want, monkeypatch):
    """Each kernel launch passes enable_fp_fusion explicitly (configs.fp_fusion(): on unless
    EXPFACE_TRITON_FP_FUSION=0), so Triton's default -- on up to 3.9, off from 3.10 --
    never decides the kernels' rounding."""
    configs, lse_forward, grads_backward, _ = _tk()
    if env is None:
        monkeypatch.delenv(configs.FP_FUSION_ENV, raising=False)
    else:
        monkeypatch.setenv(configs.FP_FUSION_ENV, env)
    seen = []
    kind = type(lse_forward._lse_partials_kernel)  # JITFunction, or InterpretedFunction
    run = kind.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("enable_fp_fusion", "unset")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kind, "run", recording_run)
    t = configs.GemmTile(16, 16, 16, 4, 1)
    a = primitive_inputs(17, 40, 7, offset=0, seed=2)
    for in_loop in (True, False):  # with and without the norm pass; 3 splits: finalize too
        check_primitives(a, fwd_config=configs.ForwardConfig(t, target_programs=6, norms_in_loop=in_loop))
    names = {n for n, _ in seen}
    assert names == {"_row_inv_norm_kernel", "_lse_partials_kernel", "_lse_finalize_kernel",
                     "_grad_logits_kernel", "_grad_wx_kernel"}, names
    assert all(v is want for _, v in seen), seen


def test_fp_fusion_rounds_the_backward_exponent_closer_to_float64():
    """configs.fp_fusion's reason for fusion on, measured in a float32 emulation of the G
    kernel's exponent against float64: the fused exponent is never worse, and at s = 64
    with hard negatives (the trained regime) its weighted error is over 10x smaller,
    while the unfused error grows with s (it scales with |z| <= s * log2 e)."""
    from expface_kernels.triton_kernels import fp_fusion
    for regime in ("random", "trained"):
        for s in (16.0, 64.0, 256.0):
            r = fp_fusion.exponent_rounding(s, regime)
            assert r["fused"][0] <= r["unfused"][0] and r["fused"][1] <= r["unfused"][1], (regime, s, r)
    trained = [fp_fusion.exponent_rounding(s, "trained") for s in (16.0, 64.0, 256.0)]
    assert trained[1]["unfused"][0] > 10 * trained[1]["fused"][0], trained
    assert trained[0]["unfused"][0] < trained[1]["unfused"][0] < trained[2]["unfused"][0], trained
    with pytest.raises(ValueError, match="regime"):
        fp_fusion.exponent_rounding(64.0, "warm")


def test_fp_fusion_timing_runs_both_settings(monkeypatch):
    """fp_fusion.time_both (the GPU measurement of both settings) alternates on / off and
    leaves the setting as it found it. Here with a wall-clock timer on tiny fp32 shapes:
    the logic only, not a GPU time."""
    import time

    from expface_kernels.triton_kernels import configs, fp_fusion
    monkeypatch.setenv(configs.FP_FUSION_ENV, "1")
    settings = []

    def timer(fn):
        settings.append(configs.fp_fusion())
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0,) * 3

    rows = fp_fusion.time_both(B=5, C=37, D=7, dtype="fp32", rounds=2, timer=timer)
    assert [(r["primitive"], r["fp_fusion"]) for r in rows] == [
        ("lse_partials", True), ("grads", True), ("lse_partials", False), ("grads", False)] * 2
    assert settings == [r["fp_fusion"] for r in rows]
    assert all(r["ms"] > 0 for r in rows)
    assert configs.fp_fusion() and os.environ[configs.FP_FUSION_ENV] == "1"


def test_unsupported_reasons():
    be = backends.get_backend("triton")
    x = torch.zeros(2, 3, device=DEV)
    assert be.unsupported_reasons(x, x) == []
    why = be.unsupported_reasons(x.double(), x)
    assert why and "float64" in why[0]
    if not HAS_CUDA:
        assert any("bfloat16" in r for r in be.unsupported_reasons(x.bfloat16(), x))
    with pytest.raises(RuntimeError, match="float64"):
        ek.margin_softmax_loss(x.double(), x.double(), torch.zeros(2, dtype=torch.long, device=DEV),
                               backend="triton")


def test_interpreter_numpy_conflict_is_a_reason():
    """Triton <= 3.6's interpreter fails every kernel here under NumPy >= 2.4 (int() of a
    1-element array): the backend says so instead of raising a TypeError mid-kernel."""
    from expface_kernels.triton_kernels import backend as tb
    assert "numpy<2.4" in tb.interpreter_numpy_conflict("3.6.0", "2.4.6")
    assert "Triton 3.5.1" in tb.interpreter_numpy_conflict("3.5.1", "2.5.0")
    for tv, nv in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.8.0+git1a2b", "2.4.6"),
                   ("3.6.0", "1.26.4"), ("4.0.0", "3.0.0")):
        assert tb.interpreter_numpy_conflict(tv, nv) is None, (tv, nv)
    import numpy
    import triton
    if tb._INTERPRETED:
        conflict = tb.interpreter_numpy_conflict(triton.__version__, numpy.__version__)
        assert tb._INTERPRETER_CONFLICT == conflict
        x = torch.zeros(2, 3)
        assert (conflict in tb.unsupported_reasons(x, x)) if conflict else tb.unsupported_reasons(x, x) == []


# --------------------------------------------------------------------------------------
# Through the public API: margins (through the prologue), modes, reductions, ignored rows.


def api(backend, x, w, y, margin="expface", m=None, **kw):
    return loss_and_grads(lambda: ek.margin_softmax_loss(x, w, y, margin, m=m, backend=backend, **kw), x, w)


def assert_close_to_truth(got, want, tol):
    for name, g, t in zip(("loss", "grad_x", "grad_w"), got, want):
        err = max_rel_err(g.cpu(), t.cpu())
        assert err <= tol, f"{name}: max rel err {err:.3g} > {tol}"


@pytest.mark.skipif(HAS_CUDA, reason="CPU autocast with the interpreter's kernels")
def test_api_under_cpu_autocast():
    """Under autocast x̂ reaches the kernels in the autocast dtype (function.
    autocast_operand_dtype): bf16, which the interpreter cannot run, is refused with
    autocast named in the reason; fp16 runs, as close to float64 as the naive fp16 loss
    allows (DESIGN §5), with fp32 outputs for fp32 inputs."""
    x, w, y = make_inputs(17, 130, 33, dtype=torch.float32, seed=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="embeddings dtype bfloat16.*under torch.autocast"):
            ek.margin_softmax_loss(x, w, y, backend="triton")
    with torch.autocast("cpu", dtype=torch.float16):
        got = api("triton", x, w, y, "expface", s=16.0)
    want = ground_truth(x, w, y, "expface", s=16.0)
    xl, wl = x.detach().half().requires_grad_(), w.detach().half().requires_grad_()
    low = loss_and_grads(lambda: ek.reference_loss(xl, wl, y, "expface", s=16.0, compute_dtype=torch.float16),
                         xl, wl)
    assert [t.dtype for t in got] == [torch.float32] * 3
    for g, t, r, what in zip(got, want, low, ("loss", "grad_x", "grad_w")):
        assert max_rel_err(g, t) <= 2 * max_rel_err(r, t) + 1e-6, (what, max_rel_err(g, t), max_rel_err(r, t))


# --------------------------------------------------------------------------------------
# GPU only.


@needs_cuda
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("margin", ["expface", "arcface", "none"])
def test_gpu_low_precision_within_twice_reference(dtype, w_dtype, margin):
    x, w, y = make_inputs(256, 5000, 512, dtype=dtype, w_dtype=w_dtype, seed=18, device="cuda")
    with torch.no_grad():
        w.mul_(0.05)
    got = api("triton", x, w, y, margin)
    want = ground_truth(x, w, y, margin)
    # "The reference computed in the same low precision": everything in x's 16-bit dtype.
    xl = x.detach().clone().requires_grad_()
    wl = w.detach().clone().to(dtype).requires_grad_()
    low = loss_and_grads(lambda: ek.reference_loss(xl, wl, y, margin, compute_dtype=dtype), xl, wl)
    err = abs(float(got[0]) - float(want[0]))
    err_low = abs(float(low[0]) - float(want[0]))
    assert err <= max(2 * err_low, 1e-3), (err, err_low)
    for i in (1, 2):
        assert got[i].dtype == (x.dtype if i == 1 else w.dtype)
        e, el = max_rel_err(got[i], want[i]), max_rel_err(low[i], want[i])
        assert e <= max(2 * el, 2e-2), (i, e, el)


@needs_cuda
def test_gpu_fp32_matches_contract_all_margins():
    for margin, m in MARGIN_CASES:
        x, w, y = make_inputs(300, 3000, 129, dtype=torch.float32, seed=19, device="cuda", ignore=(5,))
        got = api("triton", x, w, y, margin, m)
        want = ground_truth(x, w, y, margin, m)
        tol = 2e-5 if not torch.backends.cuda.matmul.allow_tf32 else 5e-3
        assert_close_to_truth(got, want, tol)


@needs_cuda
def test_gpu_primitives_default_configs():
    for b, c, d, off in [(1, 1, 1, 0), (17, 130, 33, 0), (600, 70001, 512, 3), (1024, 40000, 96, 0)]:
        check_primitives(primitive_inputs(b, c, d, off, seed=b + c), tol=1e-4 if not
                         torch.backends.cuda.matmul.allow_tf32 else 5e-3)


@needs_cuda
@pytest.mark.parametrize("block_n", [None, 128])
def test_gpu_forward_bitwise_deterministic_and_norms_exact(block_n):
    """The same inputs six times give the same bits, and W's inverse norms match torch's.

    On an H200 the loss error of identical kernels and inputs moved between runs (7.6e-6,
    8.9e-6, 1.1e-5 at B=512, C=2^20, bf16) and one low-precision test failed once: the
    in-loop norms' shared-memory race (configs.forward_config, compile_check.ring_hazard).
    The default config (norms from the separate pass) and its 128-wide alternative."""
    configs, lse_forward, _, _ = _tk()
    b, c, d = 512, 1 << 18, 512
    g = torch.Generator(device="cuda").manual_seed(1)
    x_hat = F.normalize(torch.randn(b, d, device="cuda", generator=g), dim=1).bfloat16()
    w = (torch.randn(c, d, device="cuda", generator=g) * 0.01).bfloat16()
    labels = torch.randint(0, c, (b,), device="cuda", generator=g)
    tlogit = torch.randn(b, device="cuda", generator=g) * 10
    base = configs.forward_config(x_hat.device, b, c, d, torch.bfloat16, 2)
    t = base.tile
    tile = t if block_n is None else configs.GemmTile(t.BLOCK_M, block_n, t.BLOCK_K, t.num_warps, t.num_stages)
    cfg = configs.ForwardConfig(tile, base.target_programs, norms_in_loop=base.norms_in_loop)
    first = lse_forward.lse_partials(x_hat, w, tlogit, labels, 64.0, 0, config=cfg)
    for _ in range(5):
        again = lse_forward.lse_partials(x_hat, w, tlogit, labels, 64.0, 0, config=cfg)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)
    want = 1.0 / w.float().norm(dim=1).clamp_min(1e-12)
    assert max_rel_err(first[2], want) < 1e-6


def test_launches_take_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the ops make the inputs' device
    current first (as the extension's CUDAGuard does); CPU tensors need no guard."""
    from types import SimpleNamespace

    from expface_kernels.triton_kernels import ops
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with ops.on_device_of(SimpleNamespace(device=torch.device("cuda", 3))):
        pass
    assert entered == [torch.device("cuda", 3)]
    with ops.on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 3)]


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_non_current_device():
    """Inputs on cuda:1 while cuda:0 is current: the same loss and gradients as on cuda:0."""
    out = []
    for dev in ("cuda:0", "cuda:1"):
        x, w, y = make_inputs(33, 300, 64, dtype=torch.float32, device=dev, seed=4)
        with torch.cuda.device(0):
            loss = ek.margin_softmax_loss(x, w, y, backend="triton")
            loss.backward()
        out.append([t.detach().cpu() for t in (loss, x.grad, w.grad)])
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@needs_cuda
def test_gpu_int64_offsets_beyond_2_31():
    """W with C*D > 2^31 elements (and B*C > 2^31): compare with the chunked backend."""
    free, _ = torch.cuda.mem_get_info()
    b, c, d = 1100, (1 << 21) + 5, 1024
    if free < 3 * c * d * 2 + (4 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element W")
    _, lse_forward, grads_backward, _ = _tk()
    from expface_kernels import chunked
    g = torch.Generator(device="cuda").manual_seed(0)
    x_hat = F.normalize(torch.randn(b, d, device="cuda", generator=g), dim=1).bfloat16()
    w = (torch.randn(c, d, device="cuda", generator=g) * 0.05).bfloat16()
    labels = torch.randint(0, c, (b,), device="cuda", generator=g)
    labels[:8] = c - 1 - torch.arange(8, device="cuda")  # targets at the very end of W
    tlogit = torch.zeros(b, device="cuda")
    m, se, inv = lse_forward.lse_partials(x_hat, w, tlogit, labels, 30.0, 0)
    rm, rse, rinv = chunked.lse_partials(x_hat, w, tlogit, labels, 30.0, 0)
    assert max_rel_err(inv, rinv) < 1e-5
    assert (m + se.log() - rm - rse.log()).abs().max() < 2e-2
    lse = rm + rse.log()
    grow = torch.full((b,), 1.0 / b, device="cuda")
    tg = -grow * 0.5
    gx, gw = grads_backward.grads(x_hat, w, inv, labels, lse, tg, grow, 30.0, 0)
    rgx, rgw = chunked.grads(x_hat, w, rinv, labels, lse, tg, grow, 30.0, 0)
    assert max_rel_err(gx, rgx) < 2e-2
    assert max_rel_err(gw[-4096:], rgw[-4096:]) < 2e-2
    del w, gw, rgw
    torch.cuda.empty_cache()
