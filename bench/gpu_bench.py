"""GPU benchmark of the margin-softmax loss backends (issue 3 acceptance numbers).

    python bench/gpu_bench.py [--B 512 1024] [--D 512] [--c-exps 16 18 20]
                              [--dtypes bf16 fp16-fp32] [--backends ...] [--budget-s 300]
                              [--out bench/out]

For every (B, C, dtype pair): x (B, D), W (C, D), labels; ExpFace (s=64, m=0.7, the
default margin) forward+backward of

    naive       ek.reference_loss, eager: F.normalize, matmul, margin, F.cross_entropy
                (materialises B x C logits; computed in bf16 for bf16 inputs, in fp32
                for the fp16-x / fp32-W pair -- what a user would write)
    compiled    the same under torch.compile(dynamic=True)
    reference   margin_softmax_loss(backend="reference")   (the Function, naive blocks)
    chunked     margin_softmax_loss(backend="chunked")
    triton      margin_softmax_loss(backend="triton")
    extension   margin_softmax_loss(backend="extension")
    cublas      torch.mm(x_bf16, W_bf16^T): ONE (B x D) @ (D x C) GEMM, the roofline;
                4 of them are the work of a 4-GEMM fused forward+backward.

Metrics per (backend, shape, dtype):
    time_ms        triton.testing.do_bench median (also p20/p80) of forward+backward,
                   gradients reset to None each run (each run allocates its gradients)
    extra_mib      peak extra memory of one forward+backward: max_memory_allocated above
                   the bytes in use before the call, minus the two gradients' bytes
    rel_err        |loss - loss_fp64| / |loss_fp64|, loss_fp64 from the chunked backend in
                   float64 on the same (rounded) inputs
    vs_4gemm       time / (4 x cublas time)          (acceptance: triton <= 1.25)
    vs_naive       time / naive time                 (acceptance: triton <= 0.5)
    mem_vs_naive   extra / naive extra               (acceptance at C = 2^20: <= 1%)
    err_vs_naive   rel_err / naive rel_err (bf16)    (acceptance: <= 2)

Writes ${out}/gpu_bench.csv (long format: one row per measurement) and
${out}/gpu_bench.md, and prints the Markdown table last. The sweep stops starting new
shapes once --budget-s seconds have passed (the remaining rows are listed as skipped).
Timings are GPU timings of the device named in the table header; never compare them
with CPU numbers.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

BACKENDS = ("naive", "compiled", "reference", "chunked", "triton", "extension", "cublas")
DTYPES = {"bf16": ("bfloat16", "bfloat16"), "fp16-fp32": ("float16", "float32"),
          "fp16": ("float16", "float16"), "fp32": ("float32", "float32")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[512, 1024], help="batch sizes")
    p.add_argument("--D", type=int, default=512, help="embedding size")
    p.add_argument("--c-exps", type=int, nargs="+", default=[16, 18, 20],
                   help="class counts as powers of two (C = 2^e)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16-fp32"], choices=sorted(DTYPES),
                   help="x/W dtype pairs ('fp16-fp32': fp16 embeddings, fp32 weight)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--margin", default="expface")
    p.add_argument("--s", type=float, default=64.0)
    p.add_argument("--rep-ms", type=int, default=150, help="do_bench rep time per measurement")
    p.add_argument("--warmup-ms", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting new shapes after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of this script's logic only (tiny shapes, fp32, "
                        "TRITON_INTERPRET=1 for the triton backend; no memory numbers)")
    return p.parse_args(argv)


def _import_torch_stack():
    """Import torch/triton/expface_kernels (kept out of --help so that it runs anywhere).

    expface_kernels must be installed (``pip install --no-build-isolation -e .``): its
    Triton kernels live in triton_kernels/, mapped to expface_kernels.triton_kernels by
    the install, so the repository root on sys.path alone would not find them.
    """
    import torch
    import triton
    import triton.testing
    import expface_kernels as ek
    return torch, triton, ek


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, triton, ek = _import_torch_stack()
    sys.path.insert(0, REPO)  # bench.*, also when run as bench/gpu_bench.py
    from bench.memory import cuda_peak_extra_of
    from bench.timing import device_ms
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA device -- nothing to measure (GPU-only benchmark; "
              "--device cpu runs a smoke test of the script)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    if on_gpu:
        props = torch.cuda.get_device_properties(dev)
        device_name = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    else:
        device_name = "CPU smoke run (not a benchmark)"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def bench_ms(fn, grad_to_none=None):
        """(median, p20, p80) in ms: do_bench on a GPU, a few perf_counter runs on CPU."""
        return device_ms(fn, on_gpu, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                         grad_to_none=grad_to_none)
    versions = dict(torch=torch.__version__, triton=triton.__version__)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    avail = ek.available_backends(args.device)
    t_start = time.time()
    rows = []        # long-format CSV rows
    table = {}       # (B, C, dt) -> backend -> metrics dict
    skipped = []

    def make_row(b, c, dt, backend, metric, value, unit):
        return dict(op="fwd+bwd" if backend != "cublas" else "gemm", backend=backend,
                    margin=args.margin if backend != "cublas" else "-", dtype=dt, B=b, C=c,
                    D=args.D, metric=metric, value=value, unit=unit, device=device_name,
                    torch=versions["torch"], triton=versions["triton"], date=today)

    def record(*a):
        rows.append(make_row(*a))

    compiled_fns = {}

    def naive_fn(x, w, y, compute_dtype):
        return ek.reference_loss(x, w, y, args.margin, s=args.s, compute_dtype=compute_dtype)

    def loss_callable(name, x, w, y, compute_dtype):
        if name == "naive":
            return lambda: naive_fn(x, w, y, compute_dtype)
        if name == "compiled":
            key = str(compute_dtype)
            if key not in compiled_fns:
                compiled_fns[key] = torch.compile(naive_fn, dynamic=True)
            f = compiled_fns[key]
            return lambda: f(x, w, y, compute_dtype)
        return lambda: ek.margin_softmax_loss(x, w, y, args.margin, s=args.s, backend=name)

    def write_outputs(final: bool):  # noqa: C901 (one table)
        """Ratios, CSV and Markdown from what was measured so far (rewritten after every
        shape, so that a run cut short by a timeout still leaves its table)."""
        out_rows = list(rows)

        def derived(*a):
            out_rows.append(make_row(*a))

        # Derived acceptance ratios.
        for (b, c, dt), res in table.items():
            gemm = res.get("cublas", {}).get("time_ms")
            naive = res.get("naive", {})
            for name, r in res.items():
                if "time_ms" not in r or name == "cublas":
                    continue
                if gemm:
                    r["vs_4gemm"] = r["time_ms"] / (4 * gemm)
                    derived(b, c, dt, name, "time_vs_4_cublas_gemms", r["vs_4gemm"], "x")
                if "time_ms" in naive:
                    r["vs_naive"] = r["time_ms"] / naive["time_ms"]
                    derived(b, c, dt, name, "time_vs_naive", r["vs_naive"], "x")
                    if naive.get("extra", 0) > 0:  # NaN (CPU) compares False
                        r["mem_vs_naive"] = r["extra"] / naive["extra"]
                        derived(b, c, dt, name, "extra_mem_vs_naive", r["mem_vs_naive"], "x")
                    if naive.get("err", 0) > 0:
                        r["err_vs_naive"] = r["err"] / naive["err"]
                        derived(b, c, dt, name, "err_vs_naive", r["err_vs_naive"], "x")

        csv_path = os.path.join(args.out, "gpu_bench.csv")
        with open(csv_path, "w", newline="") as f:
            cols = ["op", "backend", "margin", "dtype", "B", "C", "D", "metric", "value", "unit",
                    "device", "torch", "triton", "date"]
            wr = csv.DictWriter(f, fieldnames=cols)
            wr.writeheader()
            wr.writerows(out_rows)

        lines = [f"## GPU benchmark: {args.margin} (s={args.s:g}) forward+backward, D={args.D}",
                 "",
                 f"Device: {device_name}; torch {versions['torch']}, triton {versions['triton']}; {today}.",
                 "time: do_bench median (ms); x4gemm: time / (4 x cuBLAS bf16 GEMM of the same shape); "
                 "xnaive: time / naive eager; extra: peak memory above inputs+grads (MiB); "
                 "mem%: extra / naive extra; err: |loss - fp64| / |fp64|; err/naive: err / naive err.",
                 "",
                 "| dtype | B | C | backend | time ms | x4gemm | xnaive | extra MiB | mem% | err | err/naive |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]

        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"

        for (b, c, dt), res in table.items():
            for name, r in res.items():
                cexp = f"2^{int(math.log2(c))}"
                if "error" in r:
                    lines.append(f"| {dt} | {b} | {cexp} | {name} | {r['error']} | | | | | | |")
                    continue
                if name == "cublas":
                    lines.append(f"| {dt} | {b} | {cexp} | cublas 1 GEMM | {fmt(r['time_ms'], '.3f')} | 0.25 | | | | | |")
                    continue
                lines.append(
                    f"| {dt} | {b} | {cexp} | {name} | {fmt(r['time_ms'], '.3f')} | {fmt(r.get('vs_4gemm'), '.2f')} "
                    f"| {fmt(r.get('vs_naive'), '.2f')} | {fmt(r['extra'] / 2**20, '.1f')} "
                    f"| {fmt(100 * r['mem_vs_naive'] if 'mem_vs_naive' in r else None, '.2f')} "
                    f"| {fmt(r['err'], '.2e')} | {fmt(r.get('err_vs_naive'), '.2f')} |")
        for (b, c, dt) in skipped:
            lines.append(f"| {dt} | {b} | 2^{int(math.log2(c))} | (skipped: time budget) | | | | | | | |")
        md = "\n".join(lines) + "\n"
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(md)
        return csv_path, md

    # Largest C first: the acceptance shapes (C = 2^20) are measured even when the time
    # budget cuts the sweep short.
    shapes = [(b, 1 << e, dt) for e in sorted(args.c_exps, reverse=True) for dt in args.dtypes
              for b in args.B]
    for (b, c, dt) in shapes:
        if time.time() - t_start > args.budget_s:
            skipped.append((b, c, dt))
            continue
        xd, wd = (getattr(torch, n) for n in DTYPES[dt])
        compute_dtype = xd if xd == wd else torch.float32
        g = torch.Generator(device=dev).manual_seed(0)  # same inputs for every backend
        x = torch.randn(b, args.D, device=dev, generator=g).to(xd).requires_grad_()
        w = (torch.randn(c, args.D, device=dev, generator=g) * 0.01).to(wd).requires_grad_()
        y = torch.randint(0, c, (b,), device=dev, generator=g)
        res = table.setdefault((b, c, dt), {})
        with torch.no_grad():
            loss64 = float(ek.margin_softmax_loss(x.detach().double(), w.detach().double(), y,
                                                  args.margin, s=args.s, backend="chunked"))
        for name in args.backends:
            if name == "cublas":
                a16 = x.detach().to(torch.bfloat16)
                b16 = w.detach().to(torch.bfloat16)
                ms = bench_ms(lambda: torch.mm(a16, b16.t()))
                res[name] = dict(time_ms=ms[0], p20=ms[1], p80=ms[2])
                tflops = 2.0 * b * c * args.D / (ms[0] * 1e-3) / 1e12
                record(b, c, dt, name, "time_ms", ms[0], "ms")
                record(b, c, dt, name, "tflops", tflops, "TFLOP/s")
                del a16, b16
                continue
            if name not in ("naive", "compiled") and avail.get(name) is not None:
                res[name] = dict(error=f"unavailable: {avail[name]}")
                continue
            fn = loss_callable(name, x, w, y, compute_dtype)

            def step():
                fn().backward()

            try:
                x.grad = w.grad = None
                loss = fn()                       # warm-up: JIT / compile / allocator
                loss.backward()
                err = abs(float(loss) - loss64) / max(abs(loss64), 1e-30)
                grads_bytes = x.grad.numel() * x.grad.element_size() + w.grad.numel() * w.grad.element_size()
                x.grad = w.grad = None
                del loss
                gc.collect()
                sync()
                if on_gpu:
                    extra = cuda_peak_extra_of(step, grads_bytes)
                else:
                    extra = float("nan")  # no CPU allocator statistics: not measured
                x.grad = w.grad = None
                ms = bench_ms(step, grad_to_none=[x, w])
                x.grad = w.grad = None
                res[name] = dict(time_ms=ms[0], p20=ms[1], p80=ms[2], extra=extra, err=err)
                record(b, c, dt, name, "time_ms", ms[0], "ms")
                record(b, c, dt, name, "time_p20_ms", ms[1], "ms")
                record(b, c, dt, name, "time_p80_ms", ms[2], "ms")
                record(b, c, dt, name, "peak_extra_bytes", extra, "B")
                record(b, c, dt, name, "rel_err_vs_fp64", err, "1")
            except torch.cuda.OutOfMemoryError:
                res[name] = dict(error="OOM")
                if not on_gpu:
                    raise
            except Exception as exc:  # keep the sweep going; the table says what failed
                traceback.print_exc()
                res[name] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            finally:
                x.grad = w.grad = None
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
        del x, w, y
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        print(f"[{time.time() - t_start:6.1f}s] B={b} C=2^{int(math.log2(c))} {dt}: "
              + ", ".join(f"{k}={v.get('time_ms', float('nan')):.3f}ms" if "time_ms" in v else f"{k}={v['error']}"
                          for k, v in res.items()), flush=True)
        write_outputs(final=False)

    csv_path, md = write_outputs(final=True)
    print(f"\nwrote {csv_path} and gpu_bench.md in {time.time() - t_start:.0f}s\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
