"""Compile the kernels for a GPU that is not here: shared memory, registers, spills, pipelining.

    python -m expface_kernels.triton_kernels.compile_check [--arch 90 80 86]
        [--dtypes bf16 fp16-fp32 fp32] [--B 1024] [--C 1048576] [--D 512]

Runs on a machine without a GPU (TRITON_INTERPRET must be unset): Triton compiles each
kernel with the launch config that configs.py would pick for that device kind, shape and
dtype, for the target sm_XX, and the ptxas bundled with Triton reports registers and
spills. Printed per kernel: shared memory per program (limit: 227 KB sm_90, 163 KB
sm_80, 99 KB sm_86), registers per thread (255 max), spill bytes (want 0), and the count
of cp.async copies in the TTGIR (0 means the GEMM loads were not software-pipelined).

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

_KINDS = {90: ("hopper", 132, 50 << 20, 227 << 10), 80: ("ampere", 108, 40 << 20, 163 << 10),
          86: ("consumer", 84, 6 << 20, 99 << 10), 89: ("consumer", 128, 72 << 20, 99 << 10)}
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PAIRS = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
          "fp16-fp32": (torch.float16, torch.float32), "fp32": (torch.float32, torch.float32)}
_DIV16 = ("B", "D")


def _ptxas() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(fn, sig: dict, const: dict, cap: int, tile) -> dict:
    """Compile ``fn`` for sm_``cap``; returns shared bytes, registers, spills, async copies."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride") or n in _DIV16}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    out = {"shared": k.metadata.shared, "async_copies": k.asm["ttgir"].count("async_copy_global_to_local")}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        arch = "sm_90a" if cap == 90 else f"sm_{cap}"
        err = subprocess.run([_ptxas(), f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores", err)
    out["registers"] = int(regs[0]) if regs else -1
    out["spill_bytes"] = int(spills[0]) if spills else -1
    return out


def _merged_tile(a, b):
    """The launch config grads() uses for _grad_wx_kernel (see grads_backward.grads)."""
    from .configs import GemmTile
    return GemmTile(a.BLOCK_M, a.BLOCK_N, a.BLOCK_K, max(a.num_warps, b.num_warps),
                    min(a.num_stages, b.num_stages))


def check(cap: int, pair: str, B: int, C: int, D: int) -> list[dict]:
    """Compile the four kernels for (sm_cap, dtype pair, shape) with configs.py's choices."""
    from . import configs, grads_backward as gb, lse_forward as lf
    from .common import dot_dtype, dot_kind

    kind, sms, l2, smem_limit = _KINDS[cap]
    xd, wd = _PAIRS[pair]
    dd = dot_dtype(xd, wd)
    lb = max(torch.empty((), dtype=xd).element_size(), torch.empty((), dtype=wd).element_size())
    orig = configs.device_kind
    configs.device_kind = lambda device: (kind, sms, l2)  # pretend to be that GPU
    try:
        dev = torch.device("cuda")
        fcfg = configs.forward_config(dev, B, C, D, dd, lb).tile
        gcfg = configs.grads_config(dev, B, C, D, dd, lb)
    finally:
        configs.device_kind = orig
    X, W, G = "*" + _TY[xd], "*" + _TY[wd], "*" + _TY[dd]
    # What a launch would use: for fp32, torch.backends.cuda.matmul.allow_tf32 decides.
    prec = os.environ.get("EXPFACE_CHECK_PRECISION") or configs.dot_input_precision(dd, torch.device("cuda"))
    i32, f32p = "i32", "*fp32"
    lse_sig = dict(
        x_ptr=X, w_ptr=W, tlogit_ptr=f32p, labels_ptr="*i64", pmax_ptr=f32p, psum_ptr=f32p,
        winv_ptr=f32p, B=i32, C=i32, D=i32, offset=i32, s="fp32", stride_xb=i32, stride_wc=i32,
        tiles_per_split=i32, num_row_tiles=i32)
    jobs = [
        ("lse_partials", lf._lse_partials_kernel, fcfg, lse_sig,
         dict(BLOCK_M=fcfg.BLOCK_M, BLOCK_N=fcfg.BLOCK_N, BLOCK_K=fcfg.BLOCK_K, NORMS_IN_LOOP=True)),
        ("lse_partials/norms pass", lf._lse_partials_kernel, fcfg, lse_sig,
         dict(BLOCK_M=fcfg.BLOCK_M, BLOCK_N=fcfg.BLOCK_N, BLOCK_K=fcfg.BLOCK_K, NORMS_IN_LOOP=False)),
        ("grad_logits", gb._grad_logits_kernel, gcfg.g_tile, dict(
            x_ptr=X, w_ptr=W, winv_ptr=f32p, labels_ptr="*i64", lse_ptr=f32p, tgrad_ptr=f32p,
            grow_ptr=f32p, g_ptr=G, rpart_ptr=f32p, B=i32, D=i32, c0=i32, cn=i32, offset=i32,
            s="fp32", stride_xb=i32, stride_wc=i32, stride_gc=i32, stride_rp=i32, num_row_tiles=i32),
         dict(BLOCK_C=gcfg.g_tile.BLOCK_M, BLOCK_B=gcfg.g_tile.BLOCK_N, BLOCK_K=gcfg.g_tile.BLOCK_K,
              PERSISTENT=gcfg.g_programs > 0)),
        ("grad_wx", gb._grad_wx_kernel, _merged_tile(gcfg.dw_tile, gcfg.dx_tile), dict(
            g_ptr=G, x_ptr=X, w_ptr=W, winv_ptr=f32p, rpart_ptr=f32p, gw_ptr=W, part_ptr=f32p,
            B=i32, D=i32, c0=i32, cn=i32, stride_gc=i32, stride_xb=i32, stride_wc=i32,
            stride_gwc=i32, stride_rp=i32, stride_ps=i32, stride_pb=i32, num_rpart=i32,
            dw_feat_tiles=i32, k_per_split=i32, dx_feat_tiles=i32, dx_row_tiles=i32,
            num_dx_programs=i32),
         dict(DW_C=gcfg.dw_tile.BLOCK_M, DW_D=gcfg.dw_tile.BLOCK_N, DW_K=gcfg.dw_tile.BLOCK_K,
              DX_D=gcfg.dx_tile.BLOCK_M, DX_B=gcfg.dx_tile.BLOCK_N, DX_K=gcfg.dx_tile.BLOCK_K)),
    ]
    rows = []
    for name, fn, tile, sig, blocks in jobs:
        sig = dict(sig, **{k: "constexpr" for k in blocks}, DOT_KIND="constexpr", INPUT_PRECISION="constexpr")
        const = dict(blocks, DOT_KIND=dot_kind(dd), INPUT_PRECISION=prec)
        r = compile_one(fn, sig, const, cap, tile)
        shown = f"{tile.BLOCK_M}x{tile.BLOCK_N}x{tile.BLOCK_K}"
        if name == "grad_wx":
            t = gcfg.dx_tile
            shown += f"+{t.BLOCK_M}x{t.BLOCK_N}x{t.BLOCK_K}"
        r.update(kernel=name, arch=f"sm_{cap}", dtypes=pair, tile=shown,
                 warps=tile.num_warps, stages=tile.num_stages, smem_limit=smem_limit)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile the Triton kernels for GPUs that are not here.")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_KINDS))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16-fp32", "fp32"], choices=sorted(_PAIRS))
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=1 << 20)
    p.add_argument("--D", type=int, default=512)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions)")
        return 2
    bad = 0
    print(f"{'kernel':13s} {'arch':6s} {'dtypes':10s} {'tile':24s} w  s  {'smem KB':>8s} regs spill async")
    for cap in args.arch:
        for pair in args.dtypes:
            for r in check(cap, pair, args.B, args.C, args.D):
                ok = r["spill_bytes"] == 0 and r["shared"] <= r["smem_limit"] and r["async_copies"] > 0
                bad += not ok
                print(f"{r['kernel']:13s} {r['arch']:6s} {r['dtypes']:10s} {r['tile']:24s} {r['warps']}  "
                      f"{r['stages']}  {r['shared'] / 1024:8.1f} {r['registers']:4d} {r['spill_bytes']:5d} "
                      f"{r['async_copies']:5d} {'' if ok else '  <-- check'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
