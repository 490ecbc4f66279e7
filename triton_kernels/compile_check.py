"""Compile the kernels for a GPU that is not here: shared memory, registers, spills, pipelining.

    python -m expface_kernels.triton_kernels.compile_check [--arch 90 80 86]
        [--dtypes bf16 fp16-fp32 fp32] [--B 1024] [--C 1048576] [--D 512]
        [--candidates] [--fp-fusion on off]

Runs on a machine without a GPU (TRITON_INTERPRET must be unset): Triton compiles each
kernel with the launch config that configs.py would pick for that device kind, shape and
dtype, for the target sm_XX, with the ``enable_fp_fusion`` the launches pass
(configs.fp_fusion(); ``--fp-fusion on off`` compiles both). Printed per kernel: shared
memory per program (limit: 227 KB sm_90, 163 KB sm_80, 99 KB sm_86), registers per thread
(255 max), spill bytes and the local-memory instructions inside loops (want 0), the
count of cp.async / TMA copies in the TTGIR (0 means the GEMM loads were not software-
pipelined), and the FFMA and total SASS instructions. A ptxas performance advisory fails
the check: (C7515) "wgmma.mma_async instructions are serialized" means each wgmma of the
kernel waits for the one before (triton_kernels/README.md "Tried": a fused G/dW kernel).

Registers and spills are read from the cubin Triton built (the CUDA tools bundled with
Triton, from the directory of the ptxas Triton uses for that sm_XX: Triton 3.9 compiles
sm_90 with its newer "ptxas-blackwell", whose PTX the older ptxas rejects). A tool that
fails or prints something this module cannot read raises CompileCheckError (exit 2), never
a made-up number.

Alignment: the launch specialises 16-byte-aligned pointers and integers divisible by 16
(D = 512, strides, B); the compile here assumes the same, as a real launch at the
benchmark shapes would.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

_KINDS = {90: ("hopper", 132, 50 << 20, 227 << 10), 80: ("ampere", 108, 40 << 20, 163 << 10),
          86: ("consumer", 84, 6 << 20, 99 << 10), 89: ("consumer", 128, 72 << 20, 99 << 10)}
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PAIRS = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
          "fp16-fp32": (torch.float16, torch.float32), "fp32": (torch.float32, torch.float32)}
_DIV16 = ("B", "D")


class CompileCheckError(RuntimeError):
    """A bundled CUDA tool failed, is missing, or printed something this module cannot read."""


def cuda_tool(cap: int, name: str) -> str:
    """Path of a CUDA tool bundled with Triton: the ptxas Triton itself runs for sm_``cap``
    (triton.backends.nvidia.compiler.get_ptxas, in Triton 3.6-3.9), or ``name`` (nvdisasm,
    cuobjdump) from the same directory."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(cap).path
    return ptxas if name == "ptxas" else os.path.join(os.path.dirname(ptxas), name)


def _run_tool(cmd: list[str], what: str, data: bytes | str, suffix: str) -> subprocess.CompletedProcess:
    """Run ``cmd + [file holding data]``; CompileCheckError unless it exits 0."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        proc = subprocess.run([*cmd, f.name], capture_output=True, text=True)
    except OSError as e:
        raise CompileCheckError(f"compile_check: missing tool: cannot run {cmd[0]} ({e})") from e
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise CompileCheckError(f"compile_check: {what} failed (exit {proc.returncode}): {tail}")
    return proc


def resource_usage(cuobjdump_out: str) -> dict:
    """Registers per thread and stack bytes of the one kernel in ``cuobjdump
    --dump-resource-usage`` output ("REG:255 STACK:8 SHARED:1024 LOCAL:0 ...")."""
    m = re.findall(r"\bREG:(\d+) STACK:(\d+)", cuobjdump_out)
    if len(m) != 1:
        raise CompileCheckError("compile_check: cannot read the registers from cuobjdump's resource "
                                f"usage (expected one 'REG:n STACK:n', got {len(m)}): {cuobjdump_out.strip()[:300]}")
    return {"registers": int(m[0][0]), "stack_bytes": int(m[0][1])}


def local_memory(sass: str) -> dict:
    """Spills in SASS: ``spill_bytes``, the bytes the local stores (STL, STL.64, STL.128)
    write -- what ``ptxas -v`` calls "bytes spill stores" for kernels without local arrays,
    such as these -- and ``loop_spills``, the local loads and stores inside a loop, which
    run every iteration (the ones outside run once per program: the forward on sm_90
    with Triton 3.9 spills two loop-invariant words before its tile loop and reloads them
    after it)."""
    lines = sass.splitlines()
    spill = sum(int(m.group(1) or 32) // 8 for ln in lines for m in re.finditer(r"\bSTL(?:\.(\d+))?\b", ln))
    inside = set()
    for a, b in _loops(lines):
        inside.update(i for i in range(a, b + 1) if re.search(r"\b(?:STL|LDL)\b", lines[i]))
    return {"spill_bytes": spill, "loop_spills": len(inside)}


def fp_ops(sass: str) -> dict:
    """FFMA and all SASS instructions of a kernel (what FP fusion changes)."""
    return {"ffma": len(re.findall(r"\bFFMA\b", sass)),
            "sass": sum(bool(re.search(r"/\*[0-9a-f]{4,}\*/", ln)) for ln in sass.splitlines())}


def compile_one(fn, sig: dict, const: dict, cap: int, tile, fp_fusion_on: bool | None = None) -> dict:
    """Compile ``fn`` for sm_``cap``; returns shared bytes, registers, spills, async copies,
    ring depth, ptxas advisories, MMA loops, FFMA count. ``fp_fusion_on``: the launches'
    setting (configs.fp_fusion()) when None."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .configs import fp_fusion
    fuse = fp_fusion() if fp_fusion_on is None else fp_fusion_on
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride") or n in _DIV16}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages,
                                    enable_fp_fusion=fuse))
    ttgir = k.asm["ttgir"]
    # Pipelined GEMM loads: cp.async copies (or TMA copies, should a kernel use them).
    out = {"shared": k.metadata.shared, "fp_fusion": fuse,
           "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
           "launch_warps": k.metadata.num_warps}
    out.update(ring_hazard(ttgir, tile.num_stages))
    cubin = k.asm["cubin"]
    out.update(resource_usage(_run_tool([cuda_tool(cap, "cuobjdump"), "--dump-resource-usage"],
                                        "cuobjdump --dump-resource-usage", cubin, ".cubin").stdout))
    sass = _run_tool([cuda_tool(cap, "nvdisasm"), "-c"], "nvdisasm", cubin, ".cubin").stdout
    if not re.search(r"/\*[0-9a-f]{4,}\*/", sass):
        raise CompileCheckError(f"compile_check: nvdisasm printed no instructions: {sass.strip()[:300]}")
    out.update(local_memory(sass))
    out.update(fp_ops(sass))
    # The advisories exist only in ptxas's log: the PTX again through the same ptxas, with
    # the fmad setting Triton gave it.
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    log = _run_tool([cuda_tool(cap, "ptxas"), f"-arch={arch}", "-v", *([] if fuse else ["--fmad=false"]),
                     "-o", os.devnull], f"ptxas -arch={arch}", k.asm["ptx"], ".ptx").stderr
    if not re.search(r"Used \d+ registers", log):
        raise CompileCheckError(f"compile_check: cannot read ptxas -v output: {log.strip()[:300]}")
    out["ptxas_advisories"] = ptxas_advisories(log)
    warps = out["launch_warps"]
    out["ctas_per_sm"] = ctas_per_sm(out["registers"], out["shared"], warps, cap)
    out["mma_loops"] = mma_loops(sass, warps, cap)
    return out


def ptxas_advisories(ptxas_log: str) -> list[tuple[str, str]]:
    """(code, message) of each "Potential Performance Loss" line of ``ptxas -v`` output,
    e.g. ("C7515", "wgmma.mma_async instructions are serialized due to ...")."""
    return re.findall(r"\((C\d+)\) Potential Performance Loss: (.*?) in the function", ptxas_log)


# Dense tensor-core FLOPs per clock per SM: H100/H200 989 TFLOP/s bf16 at 1.83 GHz on
# 132 SMs = 4096 (tf32 half); A100 312 TFLOP/s at 1.41 GHz on 108 SMs = 2048 (tf32 half).
# Other chips (sm_86/89: lower and SKU-dependent rates) get no issue ratio ("?").
_MMA_RATE = {90: {"16": 4096, "TF32": 2048}, 80: {"16": 2048, "TF32": 1024}}
_REGS_PER_SM = 65536
_MAX_WARPS_PER_SM = {90: 64, 80: 64, 86: 48, 89: 48}


def ctas_per_sm(registers: int, shared: int, num_warps: int, cap: int) -> int:
    """Programs of this kernel resident per SM: bounded by registers (allocated per warp
    in units of 256), shared memory (plus 1 KB reserved per block) and warp slots."""
    if registers <= 0:
        return 0
    per_warp = -(-registers * 32 // 256) * 256
    smem = _KINDS[cap][3]
    return max(0, min(_REGS_PER_SM // (per_warp * num_warps), smem // (shared + 1024),
                      _MAX_WARPS_PER_SM.get(cap, 48) // num_warps))


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of each SASS loop: a label and a later branch back to it."""
    label_at = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", ln))}
    loops = []
    for i, ln in enumerate(lines):
        # "BRA `(.L_x_3)", "@!P0 BRA `(.L_x_3)", "@!P0 BRA P1, `(.L_x_3)"
        m = re.search(r"\bBRA\b[^;]*?`?\((\.L_x_\d+)\)", ln)
        if m and m.group(1) in label_at and label_at[m.group(1)] < i:
            loops.append((label_at[m.group(1)], i))
    return loops


def mma_loops(sass: str, num_warps: int, cap: int) -> list[dict]:
    """The innermost SASS loops that issue tensor-core instructions, each with its
    instruction count per iteration and ``issue_ratio``: the issue cycles the loop's
    instructions take on one warp scheduler (num_warps / 4 warps each issue all of them)
    over the tensor-core cycles its MMAs take on the SM. Above ~1 the loop is bound by
    instruction issue, not by the tensor cores (e.g. the dX loop of the register-operand
    form, 283 instructions per 64-class step: issue ratio 1.1; with W fed from shared
    memory, 162: 0.63 -- sm_90, bf16, 8 warps, Triton 3.8)."""
    lines = sass.splitlines()
    loops = _loops(lines)
    out = []
    for a, b in loops:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops):
            continue  # not innermost
        body = [ln for ln in lines[a:b + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
        flops, rate = 0, None
        for ln in body:
            # e.g. HGMMA.64x128x16.F32.BF16 (F16 has no suffix), HMMA.16816.F32.BF16
            g = re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?", ln)
            h = re.search(r"\bHMMA\.168(\d+)\.F32(?:\.(\w+))?", ln)
            if g:  # one per warpgroup: num_warps / 4 of them per CTA
                kind = "TF32" if g.group(4) == "TF32" else "16"
                flops += 2 * int(g.group(1)) * int(g.group(2)) * int(g.group(3)) * (num_warps // 4)
            elif h:  # m16 n8 kK, one per warp
                kind = "TF32" if h.group(2) == "TF32" else "16"
                flops += 2 * 16 * 8 * int(h.group(1)) * num_warps
            else:
                continue
            rate = _MMA_RATE[cap][kind] if cap in _MMA_RATE else None
        if flops:
            issue = len(body) * num_warps / 4
            out.append({"instructions": len(body), "issue_ratio": issue / (flops / rate) if rate else None})
    return out


def ring_hazard(ttgir: str, num_stages: int) -> dict:
    """Shared-memory rings feeding a wgmma that are too shallow for the wgmma in flight.

    Triton's software pipeliner keeps ``num_stages - 1`` tiles in flight ahead of the
    one being computed and (with ``warp_group_dot_wait {pendings = 1}``) lets one
    asynchronous wgmma run on while the next copies are issued, so a ring whose buffers
    a wgmma reads needs ``num_stages`` of them. Seen with Triton 3.6-3.8 on sm_90: when
    the loaded W tile also had a register use (the in-loop row norms), its ring got
    ``num_stages - 1`` buffers, so the copy for step k+2 landed in the buffer the
    in-flight wgmma of step k still read -- a race: results that moved from run to run
    on an H200 (loss error 7.6e-6 to 1.1e-5) and, with 256-wide tiles, were wrong
    (3.2e-4). Returns the shallowest ring a wgmma reads, whether a wgmma stays in
    flight, and the flag. (Rings read only through registers are not at risk.)
    """
    depth = {}   # ring SSA name -> buffers
    ring_of = {}  # memdesc_index result -> ring SSA name
    dot_rings = set()
    for line in ttgir.splitlines():
        m = re.match(r"\s*(%[\w.#]+) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", line)
        if m:
            depth[m.group(1)] = int(m.group(2))
            continue
        m = re.match(r"\s*(%[\w.#]+) = ttg\.memdesc_index (%[\w.#]+)\[", line)
        if m:
            ring_of[m.group(1)] = m.group(2)
            continue
        m = re.match(r"\s*%[\w.#]+ = ttng\.warp_group_dot (%[\w.#]+), (%[\w.#]+),", line)
        if m:
            dot_rings.update(ring_of[v] for v in m.groups() if v in ring_of and ring_of[v] in depth)
    in_flight = any(int(p) > 0 for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir))
    shallow = min((depth[r] for r in dot_rings), default=0)
    return {"ring": shallow, "wgmma_in_flight": in_flight,
            "ring_hazard": in_flight and bool(dot_rings) and shallow < num_stages}


def _merged_tile(a, b):
    """The launch config grads() uses for _grad_wx_kernel (see grads_backward.grads)."""
    from .configs import GemmTile
    return GemmTile(a.BLOCK_M, a.BLOCK_N, a.BLOCK_K, max(a.num_warps, b.num_warps),
                    min(a.num_stages, b.num_stages))


def check(cap: int, pair: str, B: int, C: int, D: int, candidates: bool = False,
          fp_fusion_on: bool | None = None) -> list[dict]:
    """Compile the kernels for (sm_cap, dtype pair, shape) with configs.py's choices (and,
    with ``candidates``, every autotune candidate; each distinct kernel once), with FP
    fusion as the launches set it (``fp_fusion_on`` None) or on / off."""
    from . import configs, grads_backward as gb, lse_forward as lf
    from .common import dot_dtype, dot_kind

    kind, sms, l2, smem_limit = _KINDS[cap]
    xd, wd = _PAIRS[pair]
    dd = dot_dtype(xd, wd)
    lb = max(torch.empty((), dtype=xd).element_size(), torch.empty((), dtype=wd).element_size())
    orig = configs.device_kind, torch.backends.cuda.matmul.allow_tf32
    configs.device_kind = lambda device: (kind, sms, l2)  # pretend to be that GPU
    # What a launch would use: for fp32, torch.backends.cuda.matmul.allow_tf32 decides
    # (EXPFACE_CHECK_PRECISION=tf32 / ieee: as if it were set / unset).
    forced = os.environ.get("EXPFACE_CHECK_PRECISION")
    if forced:
        torch.backends.cuda.matmul.allow_tf32 = forced == "tf32"
    try:
        dev = torch.device("cuda")
        fwds = [configs.forward_config(dev, B, C, D, dd, lb)]
        grds = [configs.grads_config(dev, B, C, D, dd, lb)]
        if candidates:
            fwds = configs.forward_candidates(dev, B, C, D, dd, lb)
            grds = configs.grads_candidates(dev, B, C, D, dd, lb)
        prec = configs.dot_input_precision(dd, dev)
    finally:
        configs.device_kind, torch.backends.cuda.matmul.allow_tf32 = orig
    X, W, G = "*" + _TY[xd], "*" + _TY[wd], "*" + _TY[dd]
    i32, f32p = "i32", "*fp32"
    lse_sig = dict(
        x_ptr=X, w_ptr=W, tlogit_ptr=f32p, labels_ptr="*i64", pmax_ptr=f32p, psum_ptr=f32p,
        winv_ptr=f32p, B=i32, C=i32, D=i32, offset=i32, s="fp32", stride_xb=i32, stride_wc=i32,
        tiles_per_split=i32, num_row_tiles=i32)
    grad_logits_sig = dict(
        x_ptr=X, w_ptr=W, winv_ptr=f32p, tcol_ptr="*i32", lse2_ptr=f32p, tgrad_ptr=f32p,
        gs_ptr=f32p, g_ptr=G, rpart_ptr=f32p, B=i32, D=i32, c0=i32, cn=i32,
        s="fp32", stride_xb=i32, stride_wc=i32, stride_gc=i32, stride_rp=i32, num_row_tiles=i32)
    grad_wx_sig = dict(
        g_ptr=G, x_ptr=X, w_ptr=W, winv_ptr=f32p, rpart_ptr=f32p, gw_ptr=W, part_ptr=f32p,
        B=i32, D=i32, c0=i32, cn=i32, stride_gc=i32, stride_xb=i32, stride_wc=i32,
        stride_gwc=i32, stride_rp=i32, stride_ps=i32, stride_pb=i32, num_rpart=i32,
        dw_feat_tiles=i32, k_per_split=i32, dx_feat_tiles=i32, dx_row_tiles=i32,
        num_dx_programs=i32)
    jobs = []
    for fwd in fwds:
        t = fwd.tile
        jobs.append(("lse_partials" + ("" if fwd.norms_in_loop else "/norm pass"), lf._lse_partials_kernel,
                     t, lse_sig, dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K,
                                      NORMS_IN_LOOP=fwd.norms_in_loop, FAST_EXP2=True,
                                      EVEN_K=D % t.BLOCK_K == 0), ""))
    for gcfg in grds:
        g, dw, dx = gcfg.g_tile, gcfg.dw_tile, gcfg.dx_tile
        scale_g = gb.scales_g(gcfg, dd)
        jobs.append(("grad_logits", gb._grad_logits_kernel, g, grad_logits_sig,
                     dict(BLOCK_C=g.BLOCK_M, BLOCK_B=g.BLOCK_N, BLOCK_K=g.BLOCK_K,
                          SCALE_G=scale_g, FAST_EXP2=True,
                          EVEN_K=D % g.BLOCK_K == 0), ""))
        jobs.append(("grad_wx", gb._grad_wx_kernel, _merged_tile(dw, dx), grad_wx_sig,
                     dict(DW_C=dw.BLOCK_M, DW_D=dw.BLOCK_N, DW_K=dw.BLOCK_K,
                          DX_D=dx.BLOCK_M, DX_B=dx.BLOCK_N, DX_K=dx.BLOCK_K, SCALE_G=scale_g,
                          RPART_BLOCK=triton.next_power_of_2(triton.cdiv(B, g.BLOCK_N)),
                          DW_EVEN=(B % dw.BLOCK_K == 0) and (D % dw.BLOCK_N == 0),
                          DX_EVEN=(C % dx.BLOCK_K == 0) and (D % dx.BLOCK_M == 0)
                          and (B % dx.BLOCK_N == 0)),
                     f"+{dx.BLOCK_M}x{dx.BLOCK_N}x{dx.BLOCK_K}"))
    rows, seen = [], set()
    for name, fn, tile, sig, blocks, extra in jobs:
        key = (name, tile, tuple(sorted(blocks.items())))
        if key in seen:  # candidates that differ only in host-side knobs (chunk, programs)
            continue
        seen.add(key)
        sig = dict(sig, **{k: "constexpr" for k in blocks})
        const = dict(blocks)
        if "DOT_KIND" in fn.arg_names:
            sig.update(DOT_KIND="constexpr", INPUT_PRECISION="constexpr")
            const.update(DOT_KIND=dot_kind(dd), INPUT_PRECISION=prec)
        r = compile_one(fn, sig, const, cap, tile, fp_fusion_on)
        shown = f"{tile.BLOCK_M}x{tile.BLOCK_N}x{tile.BLOCK_K}" + extra
        r.update(kernel=name, arch=f"sm_{cap}", dtypes=pair, tile=shown,
                 warps=tile.num_warps, stages=tile.num_stages, smem_limit=smem_limit, constexprs=blocks)
        rows.append(r)
    return rows


def _loops_text(loops: list[dict]) -> str:
    return ", ".join(f"{lp['instructions']}/" + (f"{lp['issue_ratio']:.2f}" if lp["issue_ratio"] else "?")
                     for lp in loops) or "-"


def check_failure(r: dict) -> str:
    """Why one compiled kernel (a :func:`check` row) fails, the most specific reason
    first; '' when it passes: no local-memory access inside a loop, shared memory within
    the limit, pipelined loads, no ring hazard, no ptxas advisory. Spills outside every
    loop (run once per program) are printed but pass."""
    if r["ring_hazard"]:
        return "ring shallower than the stages with a wgmma in flight"
    if r["ptxas_advisories"]:
        return "ptxas " + "; ".join(f"{code}: {msg}" for code, msg in r["ptxas_advisories"])
    if r["loop_spills"]:
        return f"{r['loop_spills']} local-memory instructions inside loops (spills)"
    if r["shared"] > r["smem_limit"] or r["async_copies"] <= 0:
        return "check"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile the Triton kernels for GPUs that are not here.")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_KINDS))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16-fp32", "fp32"], choices=sorted(_PAIRS))
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=1 << 20)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--candidates", action="store_true",
                   help="also every autotune candidate (configs.forward_candidates / grads_candidates)")
    p.add_argument("--fp-fusion", nargs="+", choices=["on", "off"], default=None,
                   help="compile with enable_fp_fusion on and/or off (default: as the launches, "
                        "configs.fp_fusion())")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions)")
        return 2
    fusions = [None] if args.fp_fusion is None else [f == "on" for f in args.fp_fusion]
    bad = 0
    try:
        print(f"Triton {triton.__version__}, ptxas for " + ", ".join(
            f"sm_{cap}: {os.path.basename(cuda_tool(cap, 'ptxas'))}" for cap in args.arch))
        print(f"{'kernel':23s} {'arch':6s} {'dtypes':10s} {'tile':24s} w  s  {'smem KB':>8s} regs spill "
              f"loop async ring CTA/SM fuse  FFMA  SASS  MMA loops (SASS instructions per iteration / issue ratio)")
        for cap in args.arch:
            for pair in args.dtypes:
                for fuse in fusions:
                    for r in check(cap, pair, args.B, args.C, args.D, args.candidates, fuse):
                        failure = check_failure(r)
                        bad += bool(failure)
                        why = f"  <-- {failure}" if failure else ""
                        print(f"{r['kernel']:23s} {r['arch']:6s} {r['dtypes']:10s} {r['tile']:24s} {r['warps']}  "
                              f"{r['stages']}  {r['shared'] / 1024:8.1f} {r['registers']:4d} {r['spill_bytes']:5d} "
                              f"{r['loop_spills']:4d} {r['async_copies']:5d} {r['ring']:4d} {r['ctas_per_sm']:6d} "
                              f"{'on ' if r['fp_fusion'] else 'off'} {r['ffma']:5d} {r['sass']:5d}  "
                              f"{_loops_text(r['mma_loops'])}{why}", flush=True)
    except CompileCheckError as e:
        print(e, file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
