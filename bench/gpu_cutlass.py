"""GPU check of the fused CUTLASS kernels (csrc/cutlass/, sm_90a): build, correctness, timing.

    python bench/gpu_cutlass.py --out DIR [--build-dir DIR] [--skip-timing] [--budget-s 200]

1. Builds csrc/cutlass/ as a torch extension (torch.utils.cpp_extension.load, the
   sources and flags of csrc/cutlass/cutlass_build.py, plus the torch glue
   ops_cutlass.cpp). CUTLASS's headers: $EXPFACE_CUTLASS_DIR or the nvidia-cutlass wheel.
2. Correctness: the glue's two primitives, run as a backend under the package's
   autograd.Function, against the float64 reference for every margin and both
   margin_grad modes, bf16 and fp16, at small odd shapes (B not a multiple of 128, C not a multiple
   of the tile or the chunk). Criterion (DESIGN §5): the error against float64 is at
   most 2x that of the reference computed in bf16, +1e-6 absolute slack per quantity.
3. Timing at B=512, C=2^20, D=512 bf16, forward+backward, in one process: the four
   cuBLAS GEMMs of the loss (4 x one torch.mm of the forward's shape, as `python -m bench.run`
   counts them), the CUTLASS path, the extension
   and Triton backends, and the peers of bench/peers.py (Liger fused linear CE, Cut
   Cross-Entropy) on the normalised problem; median of triton.testing.do_bench.
Writes cutlass_check.md (the tables) and cutlass_check.csv under --out.
Exit status: 0 when the build and every correctness case pass.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import expface_kernels as ek  # noqa: E402
from expface_kernels import backends, function, gemm_floor_model  # noqa: E402
from expface_kernels.contract import Backend  # noqa: E402
from expface_kernels.margins import MARGINS, resolve_margin  # noqa: E402

NAME = "cutlass_check"
CHUNK = gemm_floor_model.BACKWARD_CHUNK


def load_build_description() -> dict:
    spec = importlib.util.spec_from_file_location("cutlass_build", ROOT / "csrc" / "cutlass" / "cutlass_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_description()


def build(build_dir: Path) -> float:
    """Compiles and loads the ops (torch.ops.expface_cutlass); returns the seconds taken."""
    from torch.utils.cpp_extension import load

    desc = load_build_description()
    if desc["missing"]:
        raise RuntimeError(desc["missing"])
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load(name="expface_cutlass_check", sources=desc["sources"] + [desc["glue"]],
         extra_include_paths=desc["include_dirs"], extra_cuda_cflags=desc["torch_nvcc_flags"],
         extra_cflags=["-O2"], build_directory=str(build_dir), with_cuda=True, is_python_module=False,
         verbose=False)
    return time.monotonic() - t0


def install_backend(chunk: int) -> None:
    """The cutlass backend, with backward chunks of ``chunk`` classes, under a check-only
    name (``auto`` never takes it)."""
    from expface_kernels import cutlass_backend

    be = cutlass_backend.BACKEND
    backends._loaded[NAME] = Backend(NAME, be.lse_partials, functools.partial(be.grads, chunk=chunk),
                                              be.unsupported_reasons)


def run_loss(x, w, y, margin, m, margin_grad, s=64.0, reduction="mean"):
    _, mv = resolve_margin(margin, m)
    x.grad = w.grad = None
    opts = function.LossOptions(backends._loaded[NAME], margin, mv, s, margin_grad, reduction, -1)
    loss = function.margin_softmax(x, w, y, opts)
    loss.backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


def reference(x, w, y, margin, m, margin_grad, dtype, s=64.0):
    xr = x.detach().to(dtype).requires_grad_()
    wr = w.detach().to(dtype).requires_grad_()
    loss = ek.reference_loss(xr, wr, y, margin, s=s, m=m, margin_grad=margin_grad,
                             compute_dtype=dtype)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


def correctness(rows: list) -> bool:
    ok = True
    shapes = [(5, 300, 64, 256), (130, 1000, 136, 384), (64, 4099, 512, 1024)]
    for dtype in (torch.bfloat16, torch.float16):
        for b, c, d, chunk in shapes:
            install_backend(chunk)
            g = torch.Generator(device="cuda").manual_seed(b + c)
            x = torch.randn(b, d, device="cuda", generator=g).to(dtype).requires_grad_()
            w = torch.randn(c, d, device="cuda", generator=g).to(dtype).requires_grad_()
            y = torch.randint(0, c, (b,), device="cuda", generator=g)
            y[1] = -1  # an ignored row
            for margin in MARGINS:
                for mode in ("exact", "straight_through"):
                    got = run_loss(x, w, y, margin, None, mode)
                    truth = reference(x, w, y, margin, None, mode, torch.float64)
                    low = reference(x, w, y, margin, None, mode, dtype)
                    for what, a, t, l in zip(("loss", "grad_x", "grad_w"), got, truth, low):
                        err = (a.double() - t).abs().max().item()
                        ref_err = (l.double() - t).abs().max().item()
                        good = math.isfinite(err) and err <= 2 * ref_err + 1e-6
                        ok &= good
                        rows.append(dict(dtype=str(dtype).removeprefix("torch."), B=b, C=c, D=d, chunk=chunk,
                                         margin=margin, mode=mode, what=what, err=err, ref_err=ref_err,
                                         ok=good))
    return ok


def timing(rows: list, budget_s: float) -> None:
    from bench import peers
    from bench.timing import device_ms

    b, c, d = 512, 1 << 20, 512
    t_end = time.monotonic() + budget_s
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, d, device="cuda", generator=g).bfloat16().requires_grad_()
    w = torch.randn(c, d, device="cuda", generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, c, (b,), device="cuda", generator=g)
    xs, ws = x.detach(), w.detach()
    # The floor as `python -m bench.run` counts it: 4 x one (B x D) @ (D x C) cuBLAS GEMM.
    calls = {"cuBLAS 1 GEMM": (lambda: torch.mm(xs, ws.t()), None)}
    install_backend(CHUNK)
    _, mv = resolve_margin("expface", None)
    # (not run_loss: its copies of the gradients would add a weight-sized copy to the time)
    opts = function.LossOptions(backends._loaded[NAME], "expface", mv, 64.0, "exact", "mean", -1)
    calls["cutlass"] = (lambda: function.margin_softmax(x, w, y, opts).backward(), [x, w])
    usable, skipped = peers.resolve(["extension", "triton", "liger", "cce"], torch.device("cuda"))
    for name, cand in usable.items():
        prep = cand.prepare(x, w, y, cand.margin_for("expface"), None, 64.0)
        calls[name] = (lambda p=prep: p.loss_fn().backward(), prep.leaves)
    for name, why in skipped.items():
        rows.append(dict(name=name, median_ms=float("nan"), note=why))
    for name, (fn, leaves) in calls.items():
        if time.monotonic() > t_end:
            rows.append(dict(name=name, median_ms=float("nan"), note="time budget spent"))
            continue
        try:
            med, p20, p80 = device_ms(fn, True, warmup_ms=100, rep_ms=500, grad_to_none=leaves)
            rows.append(dict(name=name, median_ms=med, p20_ms=p20, p80_ms=p80, note=""))
        except Exception as exc:  # a peer that fails at this shape: recorded, the rest go on
            rows.append(dict(name=name, median_ms=float("nan"), note=f"{type(exc).__name__}: {exc}"[:200]))
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--build-dir", type=Path, default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"# CUTLASS path check ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')})", ""]
    secs = build(args.build_dir or args.out / "build")
    md.append(f"build: {secs:.0f} s (torch.utils.cpp_extension.load)")
    from expface_kernels import cutlass_backend

    probe = torch.empty(1, 512, device="cuda", dtype=torch.bfloat16)
    why = cutlass_backend.BACKEND.unsupported_reasons(probe, probe)
    if why:
        print("\n".join(md + ["the cutlass backend refuses bf16 CUDA tensors here: " + " / ".join(why)]))
        return 1
    rows: list = []
    ok = correctness(rows)
    bad = [r for r in rows if not r["ok"]]
    md += ["", f"## correctness: {len(rows) - len(bad)}/{len(rows)} within 2x the error of the reference "
           "computed in the same 16-bit dtype", ""]
    md += ["| dtype | B | C | D | margin | mode | what | err vs fp64 | same-dtype ref err |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in bad or rows[:6]:
        md.append(f"| {r['dtype']} | {r['B']} | {r['C']} | {r['D']} | {r['margin']} | {r['mode']} | {r['what']} | "
                  f"{r['err']:.3g} | {r['ref_err']:.3g} |")
    trows: list = []
    if not args.skip_timing:
        timing(trows, args.budget_s)
        base = 4 * next((r["median_ms"] for r in trows if r["name"] == "cuBLAS 1 GEMM"), float("nan"))
        md += ["", "## B=512, C=2^20, D=512, bf16, expface fwd+bwd (peers: margin none, normalised inputs)", "",
               "| what | median ms | p20 | p80 | / 4 GEMMs | note |", "|---|---|---|---|---|---|"]
        for r in trows:
            md.append(f"| {r['name']} | {r['median_ms']:.3f} | {r.get('p20_ms', float('nan')):.3f} | "
                      f"{r.get('p80_ms', float('nan')):.3f} | {r['median_ms'] / base:.2f} | {r['note']} |")
    (args.out / "cutlass_check.md").write_text("\n".join(md) + "\n")
    with open(args.out / "cutlass_check.csv", "w") as f:
        f.write("kind,name_or_case,value,ref,ok\n")
        for r in rows:
            f.write(f"correctness,{r['dtype']}/{r['B']}x{r['C']}x{r['D']}/{r['margin']}/{r['mode']}/{r['what']},"
                    f"{r['err']:.6g},{r['ref_err']:.6g},{r['ok']}\n")
        for r in trows:
            f.write(f"timing_ms,{r['name']},{r['median_ms']:.6g},,\n")
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
