"""What FP fusion (``enable_fp_fusion``, configs.fp_fusion()) does to the kernels: the
rounding, measured without a GPU, and the GPU time of both settings.

    python -m expface_kernels.triton_kernels.fp_fusion            # rounding (CPU)
    python -m expface_kernels.triton_kernels.fp_fusion --time     # time both (GPU)
        [--B 512] [--C 1048576] [--D 512] [--dtype bf16|fp16-fp32|fp32] [--s 64]

The instructions each setting gives: ``compile_check --fp-fusion on off`` (FFMA and SASS
columns). The interpreter cannot measure the rounding: it drops the launch option and
rounds every numpy multiply and add (and before Triton 3.9 even its ``tl.fma`` rounds
twice), so the CPU tests always see the unfused rounding. :func:`exponent_rounding`
emulates the place where the setting matters most: the G kernel's exponent, whose
unfused rounding error scales with |z| (up to s * log2 e); elsewhere (grad_W's
projection, the r and norm sums) an FMA saves one rounding of an ordinary product.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np

from .configs import FP_FUSION_ENV

LOG2E = 1.4426950408889634


@contextlib.contextmanager
def forced(on: bool):
    """Launches inside the block use ``enable_fp_fusion=on`` (the variable is restored after)."""
    old = os.environ.get(FP_FUSION_ENV)
    os.environ[FP_FUSION_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FP_FUSION_ENV, None)
        else:
            os.environ[FP_FUSION_ENV] = old


def _cosines(regime: str, rows: int, C: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, C) float64 cosines. "random": an untrained head (random unit vectors in 512
    dimensions have cosines of standard deviation 1/sqrt(512) ~ 0.044). "trained": column 0
    is the target at 0.7, columns 1-8 hard negatives in [0.45, 0.7), the rest random."""
    c = rng.normal(0.0, 0.05, (rows, C))
    if regime == "trained":
        c[:, 0] = 0.7
        c[:, 1:9] = rng.uniform(0.45, 0.7, (rows, 8))
    elif regime != "random":
        raise ValueError(f"regime must be 'random' or 'trained', got {regime!r}")
    return np.clip(c, -1.0, 1.0)


def exponent_rounding(s: float, regime: str, C: int = 4096, rows: int = 64, seed: int = 0) -> dict:
    """Error of the G kernel's probabilities p = 2^(acc * a - lse2) against float64, with the
    exponent computed unfused (fp32 product, then fp32 subtraction) and fused (one
    rounding), in a float32 emulation of the kernel's epilogue.

    The inputs are what the kernel holds: acc = fp32(c * ||W_j||) (the GEMM accumulator),
    a = fp32(inv_j * s * log2 e), lse2 = fp32(lse * log2 e). The float64 reference takes
    the same fp32 inputs and rounds nothing; 2^x is evaluated in float64 for all three, so
    only the exponent's rounding differs (the GPU's ex2.approx.ftz adds <= 2 ulp to each).
    The target column (substituted in the kernel, not computed) is left out in "trained".

    Returns {"unfused": (weighted, max), "fused": (weighted, max)}: weighted = sum |dp| /
    sum p (the relative change of a gradient row, grad_x_i = sum_j G_ij w_hat_j, is at
    most this), max = the largest relative error of a p above 1e-3 of the row's largest.
    """
    rng = np.random.default_rng(seed)
    c = _cosines(regime, rows, C, rng)
    norm = rng.uniform(0.5, 2.0, C)
    f32 = np.float32
    acc = (c * norm).astype(f32)
    a = (f32(1.0) / norm.astype(f32)) * f32(s * LOG2E)
    x = acc.astype(np.float64) * a.astype(np.float64)  # exact: 24 + 24 bits < 53
    top = x.max(axis=1, keepdims=True)
    lse2 = (top[:, 0] + np.log2(np.exp2(x - top).sum(axis=1))).astype(f32)
    l64 = lse2.astype(np.float64)[:, None]
    ref = np.exp2(x - l64)
    unfused = np.exp2(((acc * a) - lse2[:, None]).astype(np.float64))  # two fp32 roundings
    fused = np.exp2((x - l64).astype(f32).astype(np.float64))          # one
    keep = np.ones_like(ref, dtype=bool)
    if regime == "trained":
        keep[:, 0] = False
    big = keep & (ref >= 1e-3 * np.where(keep, ref, 0.0).max(axis=1, keepdims=True))

    def errors(p):
        d = np.abs(p - ref)
        return float(d[keep].sum() / ref[keep].sum()), float((d[big] / ref[big]).max())

    return {"unfused": errors(unfused), "fused": errors(fused)}


def time_both(B: int = 512, C: int = 1 << 20, D: int = 512, dtype: str = "bf16", s: float = 64.0,
              rounds: int = 2, timer=None) -> list[dict]:
    """Time ``lse_partials`` and ``grads`` with fusion on and off, alternating ``rounds``
    times (so that drift shows as spread, not as a difference). GPU: medians, p20, p80 of
    ``triton.testing.do_bench`` in ms. ``timer(fn) -> (median, p20, p80)`` replaces it
    (a CPU smoke test of this logic passes a wall-clock timer; such numbers are not GPU ones).
    ``dtype``: "bf16" (x and W), "fp16-fp32" (fp16 x, fp32 W) or "fp32"."""
    import torch
    import torch.nn.functional as F

    from .grads_backward import grads
    from .lse_forward import lse_partials

    xd, wd = {"bf16": (torch.bfloat16,) * 2, "fp16-fp32": (torch.float16, torch.float32),
              "fp32": (torch.float32,) * 2}[dtype]
    dev = "cuda" if timer is None else ("cuda" if torch.cuda.is_available() else "cpu")
    if timer is None:
        import triton.testing

        def timer(fn):
            return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    g = torch.Generator(device=dev).manual_seed(0)
    x = F.normalize(torch.randn(B, D, device=dev, generator=g), dim=1).to(xd)
    w = (torch.randn(C, D, device=dev, generator=g) * 0.05).to(wd)
    labels = torch.randint(0, C, (B,), device=dev, generator=g)
    tlogit = torch.full((B,), 0.5 * s, device=dev)
    ones = torch.ones(B, device=dev)
    out = []
    for _ in range(rounds):
        for on in (True, False):
            with forced(on):
                m, se, inv = lse_partials(x, w, tlogit, labels, s, 0)  # compiles this setting
                lse = m + se.log()
                grads(x, w, inv, labels, lse, ones, ones / B, s, 0)
                for name, fn in (("lse_partials", lambda: lse_partials(x, w, tlogit, labels, s, 0)),
                                 ("grads", lambda: grads(x, w, inv, labels, lse, ones, ones / B, s, 0))):
                    med, p20, p80 = timer(fn)
                    out.append(dict(primitive=name, fp_fusion=on, ms=med, p20=p20, p80=p80))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FP fusion: rounding (CPU emulation) or GPU time of both settings.")
    p.add_argument("--time", action="store_true", help="time both settings on this GPU")
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--C", type=int, default=1 << 20)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16-fp32", "fp32"])
    p.add_argument("--s", type=float, nargs="+", default=None,
                   help="scales: the rounding table's (default 16 64 256), or --time's (the first; default 64)")
    args = p.parse_args(argv)
    if args.time:
        import torch
        import triton

        if not torch.cuda.is_available():
            print("fp_fusion --time needs a CUDA device", file=sys.stderr)
            return 2
        s = args.s[0] if args.s else 64.0
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
              f"B={args.B} C={args.C} D={args.D} {args.dtype}, s={s:g}")
        print("| primitive | fp fusion | median ms | p20 | p80 |\n|---|---|---|---|---|")
        for r in time_both(args.B, args.C, args.D, args.dtype, s):
            print(f"| {r['primitive']} | {'on' if r['fp_fusion'] else 'off'} | {r['ms']:.3f} | "
                  f"{r['p20']:.3f} | {r['p80']:.3f} |")
        return 0
    print("| regime | s | unfused: sum|dp|/sum p | fused | unfused: max rel. | fused |\n|---|---|---|---|---|---|")
    for regime in ("random", "trained"):
        for s in args.s or (16.0, 64.0, 256.0):
            r = exponent_rounding(s, regime)
            print(f"| {regime} | {s:g} | {r['unfused'][0]:.1e} | {r['fused'][0]:.1e} | "
                  f"{r['unfused'][1]:.1e} | {r['fused'][1]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
