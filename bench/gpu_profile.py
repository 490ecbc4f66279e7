"""Where the GPU time goes, launch-config variants, and the largest C per backend.

    python bench/gpu_profile.py [--B 512] [--c-exp 20] [--D 512] [--out bench/out]
                                [--parts split variants capacity] [--budget-s 200]
                                [--dtype bf16|fp16-fp32]

Three parts, each printed as a small Markdown table and appended to
``${out}/gpu_profile.md`` (CSV rows in ``${out}/gpu_profile.csv``), bf16 x and W, or
with ``--dtype fp16-fp32`` fp16 x and an fp32 W (the common face-recognition case):

split     forward and backward of one training step timed apart (CUDA events), for the
          ``triton`` and ``extension`` backends (and the extension with the per-row work as
          PyTorch ops, prologue.USE_EXTENSION = False), with the host time of the same calls
          (perf_counter around the Python calls, no sync inside): when the host time is
          close to the GPU time, launch overhead -- not the kernels -- sets the pace.
          Plus a torch.profiler table of the kernels of one step per backend.
variants  the Triton primitives with every candidate of configs.forward_candidates /
          grads_candidates (and two more backward chunk budgets), and the extension
          with three logits-block budgets: time, host time, peak extra memory.
capacity  the largest C that fits on this GPU per backend: bytes per class measured at
          C = 2^c_exp (W, its gradient and the loss's peak extra, all over C), the C that
          fills 97% of the free memory at that rate, then one forward+backward there to
          confirm it (10% less and once more on OOM).

GPU only; ``--device cpu`` runs the logic on tiny shapes under TRITON_INTERPRET=1 (a
smoke test of this script: the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--c-exp", type=int, default=20, help="C = 2^c_exp for split / variants")
    p.add_argument("--parts", nargs="+", default=["split", "variants", "capacity"],
                   choices=["split", "variants", "capacity"])
    p.add_argument("--capacity-backends", nargs="+", default=["triton", "extension", "naive"])
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="no new measurement starts after this many seconds")
    p.add_argument("--s", type=float, default=64.0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16-fp32"],
                   help="x / W dtypes: bf16 both, or fp16 x with an fp32 W")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args(argv)


def _tile(t) -> str:
    return f"{t.BLOCK_M}x{t.BLOCK_N}x{t.BLOCK_K}/w{t.num_warps}s{t.num_stages}"


def describe(cfg) -> str:
    """A launch config in one short line (configs.ForwardConfig / GradsConfig)."""
    if hasattr(cfg, "tile"):
        return (f"tile {_tile(cfg.tile)}, {cfg.target_programs} programs, norms "
                f"{'in loop' if cfg.norms_in_loop else 'separate pass'}")
    knobs = ("" if cfg.scale_g else ", G unscaled (dX scales W in registers)") + \
        (f", persistent G ({cfg.g_programs} programs)" if cfg.g_programs else "")
    return (f"G {_tile(cfg.g_tile)}, dW {_tile(cfg.dw_tile)}, dX {_tile(cfg.dx_tile)}, "
            f"chunk {cfg.chunk_bytes / 2**20:g} MiB, dX partials {cfg.max_dx_partial_bytes / 2**20:g} MiB"
            + knobs)


def main(argv=None) -> int:  # noqa: C901 (three small parts sharing the set-up)
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton.testing

    import expface_kernels as ek
    from expface_kernels import prologue
    sys.path.insert(0, os.path.dirname(HERE))  # bench.*, also when run as bench/gpu_profile.py
    from bench.memory import cuda_peak_extra_of
    from bench.timing import device_ms
    from expface_kernels.triton_kernels import common, configs, grads_backward, lse_forward

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("gpu_profile.py: no CUDA device -- nothing to measure")
        return 0
    dev = torch.device(args.device)
    # x's dtype (also the cuBLAS rows') and W's; the interpreter has no 16-bit dots
    dt, w_dt = {"bf16": (torch.bfloat16, torch.bfloat16),
                "fp16-fp32": (torch.float16, torch.float32)}[args.dtype] if on_gpu else (torch.float32,) * 2
    B, D, C = args.B, args.D, 1 << args.c_exp
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "gpu_profile.md")
    csv_rows = []
    name = torch.cuda.get_device_name(dev) if on_gpu else "CPU smoke run (not a benchmark)"
    header = (f"## gpu_profile: {name}, torch {torch.__version__}, triton {triton.__version__}, "
              f"B={B}, C=2^{args.c_exp}, D={D}, x {str(dt).replace('torch.', '')}, "
              f"W {str(w_dt).replace('torch.', '')}\n")

    def emit(text: str) -> None:
        print(text, flush=True)
        with open(md_path, "a") as f:
            f.write(text + "\n")

    def record(part, what, metric, value):
        csv_rows.append(dict(part=part, what=what, metric=metric, value=value, device=name,
                             B=B, C=C, D=D, dtype=str(dt), w_dtype=str(w_dt)))
        with open(os.path.join(args.out, "gpu_profile.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
            wr.writeheader()
            wr.writerows(csv_rows)

    def out_of_time() -> bool:
        return time.time() - t0 > args.budget_s

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def gpu_ms(fn) -> float:
        """Median device time of fn() in ms (do_bench on a GPU; 3 wall-clock runs on CPU)."""
        return device_ms(fn, on_gpu)[0]

    def host_ms(fn, n=5) -> float:
        """Median wall time of the Python call alone (no sync inside the timed region)."""
        ts = []
        for _ in range(n):
            sync()
            s = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - s) * 1e3)
            sync()
        return sorted(ts)[n // 2]

    def peak_extra(fn, keep_bytes=0) -> float:
        """Peak bytes above the start of fn(), minus keep_bytes (outputs it keeps)."""
        return cuda_peak_extra_of(fn, keep_bytes) if on_gpu else float("nan")

    g = torch.Generator(device=dev).manual_seed(0)

    def inputs(c):
        x = torch.randn(B, D, device=dev, generator=g).to(dt).requires_grad_()
        w = torch.empty(c, D, device=dev, dtype=w_dt).normal_(0, 0.01, generator=g).requires_grad_()
        y = torch.randint(0, c, (B,), device=dev, generator=g)
        return x, w, y

    emit(header)
    # ------------------------------------------------------------------ split
    if "split" in args.parts:
        x, w, y = inputs(C)
        emit("### split: forward / backward of one step (ms)\n")
        emit("| backend | fwd GPU | fwd host | bwd GPU | bwd host | step (do_bench) |")
        emit("|---|---|---|---|---|---|")
        # The last row runs the per-row work around the class loop as PyTorch ops instead
        # of the extension's ops (expface_kernels/prologue.py): what those ops save.
        for label, be, ops_prologue in (("triton", "triton", True), ("extension", "extension", True),
                                        ("extension, PyTorch prologue", "extension", False)):
            prologue.USE_EXTENSION = ops_prologue
            try:
                def fwd():
                    return ek.margin_softmax_loss(x, w, y, s=args.s, backend=be)
                loss = fwd()
                loss.backward()  # warm-up (compilation)
                x.grad = w.grad = None
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if on_gpu else None
                f_ms, b_ms = [], []
                for _ in range(5):
                    sync()
                    if on_gpu:
                        ev[0].record()
                    s = time.perf_counter()
                    loss = fwd()
                    if on_gpu:
                        ev[1].record()
                    m = time.perf_counter()
                    loss.backward()
                    if on_gpu:
                        ev[2].record()
                    e = time.perf_counter()
                    sync()
                    f_ms.append((ev[0].elapsed_time(ev[1]) if on_gpu else (m - s) * 1e3, (m - s) * 1e3))
                    b_ms.append((ev[1].elapsed_time(ev[2]) if on_gpu else (e - m) * 1e3, (e - m) * 1e3))
                    x.grad = w.grad = None
                f_ms.sort()
                b_ms.sort()
                fg, fh = f_ms[2]
                bg, bh = b_ms[2]

                def step():
                    fwd().backward()
                st = gpu_ms(step)
                x.grad = w.grad = None
                emit(f"| {label} | {fg:.3f} | {fh:.3f} | {bg:.3f} | {bh:.3f} | {st:.3f} |")
                for k, v in (("fwd_gpu_ms", fg), ("fwd_host_ms", fh), ("bwd_gpu_ms", bg),
                             ("bwd_host_ms", bh), ("step_ms", st)):
                    record("split", label, k, v)
            except Exception as exc:  # report and go on: every part is independent
                traceback.print_exc()
                emit(f"| {label} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | |")
            finally:
                prologue.USE_EXTENSION = True
        # The extension's GEMMs per class chunk, times C / chunk, against one full-size
        # GEMM: what chunking costs cuBLAS (B x chunk logits; grad_x with K = chunk;
        # grad_W with K = B).
        # With an fp32 W the extension casts each chunk of W to fp16 and writes grad_W's
        # product in fp32 (mm's out_dtype, where torch has it): those rows too.
        low_name = str(dt).replace("torch.", "")
        emit(f"\n| cuBLAS GEMM ({low_name}) | chunk 8192 | chunk 32768 | full C |")
        emit("|---|---|---|---|")
        with torch.no_grad():
            xa = x.detach()
            w_low = w.detach().to(dt)
            full = gpu_ms(lambda: torch.mm(xa, w_low.t()))
            per = {}
            mixed = w_dt != dt and on_gpu
            for ch in (8192, 32768):
                ch = min(ch, C)
                wc = w_low[:ch]
                lc = torch.randn(B, ch, device=dev, generator=g).to(dt)
                per[ch] = [gpu_ms(lambda: torch.mm(xa, wc.t())) * C / ch,
                           gpu_ms(lambda: torch.mm(lc, wc)) * C / ch,
                           gpu_ms(lambda: torch.mm(lc.t(), xa)) * C / ch]
                if mixed:
                    w32 = w.detach()[:ch]
                    gw32 = torch.empty(ch, D, device=dev)
                    per[ch] += [gpu_ms(lambda: w32.to(dt)) * C / ch]
                    try:
                        per[ch] += [gpu_ms(lambda: torch.mm(lc.t(), xa, out_dtype=torch.float32, out=gw32)) * C / ch]
                    except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm.dtype_out
                        per[ch] += [float("nan")]
                    del w32, gw32
                del lc
            names = ("logits x W^T", "grad_x (K = chunk)", "grad_W (K = B)")
            if mixed:
                names += (f"W chunk fp32 -> {low_name} (cast)", "grad_W (K = B), fp32 out (mm out_dtype)")
            for k, nm in enumerate(names):
                vals = [per[ch][k] for ch in sorted(per)]
                emit(f"| {nm} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {full:.3f} |")
                for ch in sorted(per):
                    record("split", f"cublas {nm} chunk {ch} (x C/chunk)", "gpu_ms", per[ch][k])
            record("split", "cublas full GEMM", "gpu_ms", full)
        if on_gpu:
            for be in ("triton", "extension"):
                try:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        ek.margin_softmax_loss(x, w, y, s=args.s, backend=be).backward()
                        torch.cuda.synchronize()
                    x.grad = w.grad = None
                    try:
                        tab = prof.key_averages().table(sort_by="device_time_total", row_limit=12)
                    except Exception:  # older spelling
                        tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
                    emit(f"\nkernels of one {be} step (torch.profiler):\n```\n{tab}\n```")
                except Exception as exc:
                    emit(f"(profiler failed for {be}: {type(exc).__name__}: {exc})")
        del x, w, y
        gc.collect()

    # ------------------------------------------------------------------ variants
    if "variants" in args.parts and not out_of_time():
        x, w, y = inputs(C)
        with torch.no_grad():
            xh = torch.nn.functional.normalize(x.float(), dim=1).to(dt)
            wd = w.detach()
            tl_ = torch.randn(B, device=dev, generator=g) * 10
        dd = common.dot_dtype(xh.dtype, wd.dtype)
        lb = max(xh.element_size(), wd.element_size())
        # The reference of every variant: the pure-PyTorch chunked primitives (fp32 math)
        # on the same inputs -- a fast config that computes the wrong numbers must show.
        from expface_kernels import chunked
        m, se, inv = chunked.lse_partials(xh, wd, tl_, y, args.s, 0)
        lse = m + torch.log(se)
        grow = torch.full((B,), 1.0 / B, device=dev)
        tg = grow * torch.expm1(tl_ - lse)
        ref_gx, ref_gw = chunked.grads(xh, wd, inv, y, lse, tg, grow, args.s, 0)

        def rel_err(got, want) -> float:
            return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))

        def error_of(prim, out) -> float:
            """max relative error of lse (forward) or of grad_x / grad_W (backward)."""
            if prim == "lse_partials":
                return max(rel_err(out[0] + torch.log(out[1]), lse), rel_err(out[2], inv))
            return max(rel_err(out[0], ref_gx), rel_err(out[1], ref_gw))

        emit("\n### variants: Triton primitives per launch config (ms; host = Python call alone; "
             "err = max relative error against the chunked backend's primitives)\n")
        emit("| primitive | config | GPU ms | host ms | extra MiB | err |")
        emit("|---|---|---|---|---|---|")
        fwd_c = configs.forward_candidates(dev, B, C, D, dd, lb)
        base_g = configs.grads_config(dev, B, C, D, dd, lb)
        grd_c = configs.grads_candidates(dev, B, C, D, dd, lb)
        for mb in (8, 64):
            cand = configs.GradsConfig(**{**base_g.__dict__, "chunk_bytes": mb << 20})
            if cand not in grd_c:
                grd_c.append(cand)
        todo = [("lse_partials", i, c) for i, c in enumerate(fwd_c)] + \
               [("grads", i, c) for i, c in enumerate(grd_c)]
        for prim, i, cfg in todo:
            if out_of_time():
                emit(f"| {prim} | #{i} | (skipped: time budget) | | |")
                continue
            if prim == "lse_partials":
                def fn(cfg=cfg):
                    return lse_forward.lse_partials(xh, wd, tl_, y, args.s, 0, config=cfg)
                keep = 0
            else:
                def fn(cfg=cfg):
                    return grads_backward.grads(xh, wd, inv, y, lse, tg, grow, args.s, 0, config=cfg)
                keep = wd.numel() * wd.element_size() + B * D * 4
            desc = describe(cfg)
            try:
                err = error_of(prim, fn())  # (also compiles)
                gm, hm = gpu_ms(fn), host_ms(fn)
                ex = peak_extra(fn, keep)
                emit(f"| {prim} | #{i} {'(default) ' if i == 0 else ''}{desc} | {gm:.3f} | {hm:.3f} "
                     f"| {ex / 2**20:.1f} | {err:.1e} |")
                record("variants", f"{prim}#{i} {desc}", "gpu_ms", gm)
                record("variants", f"{prim}#{i} {desc}", "host_ms", hm)
                record("variants", f"{prim}#{i} {desc}", "max_rel_err", err)
            except Exception as exc:
                emit(f"| {prim} | #{i} {desc} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | | |")
        del xh, wd, inv, lse, tg, ref_gx, ref_gw
        # extension: logits-block budgets
        try:
            from expface_kernels import extension as ext
            emit("\n| extension block | step ms | extra MiB |")
            emit("|---|---|---|")
            for mb in (16, 24, 32):
                if out_of_time():
                    break
                ext.BLOCK_BYTES = mb << 20

                def step():
                    ek.margin_softmax_loss(x, w, y, s=args.s, backend="extension").backward()
                step()
                x.grad = w.grad = None
                st = gpu_ms(step)
                x.grad = w.grad = None
                gb = w.numel() * w.element_size() + x.numel() * x.element_size()
                ex = peak_extra(step, gb)
                x.grad = w.grad = None
                emit(f"| {mb} MiB | {st:.3f} | {ex / 2**20:.1f} |")
                record("variants", f"extension block {mb} MiB", "step_ms", st)
                record("variants", f"extension block {mb} MiB", "extra_bytes", ex)
            ext.BLOCK_BYTES = 0
        except Exception as exc:
            traceback.print_exc()
            emit(f"(extension variants failed: {type(exc).__name__}: {exc})")
        del x, w, y
        gc.collect()

    # ------------------------------------------------------------------ capacity
    if "capacity" in args.parts and on_gpu:
        emit("\n### capacity: largest C per backend (bf16, B and D as above)\n")
        emit("| backend | bytes / class at 2^%d | C that fills 97%% of free | confirmed C | step s | note |"
             % args.c_exp)
        emit("|---|---|---|---|---|---|")
        for be in args.capacity_backends:
            if out_of_time():
                emit(f"| {be} | (skipped: time budget) | | | | |")
                continue

            def loss_of(x, w, y, be=be):
                if be == "naive":
                    return ek.reference_loss(x, w, y, s=args.s, compute_dtype=dt)
                return ek.margin_softmax_loss(x, w, y, s=args.s, backend=be)
            try:
                gc.collect()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                x, w, y = inputs(C)
                loss_of(x, w, y).backward()  # warm-up
                x.grad = w.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                loss_of(x, w, y).backward()
                torch.cuda.synchronize()
                per_class = (torch.cuda.max_memory_allocated() - base) / C
                del x, w, y
                gc.collect()
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info()
                c_fit = int(0.97 * free / per_class) // 65536 * 65536
                note, confirmed, secs = "", 0, float("nan")
                for attempt in range(2):
                    try:
                        x, w, y = inputs(c_fit)
                        torch.cuda.synchronize()
                        s = time.perf_counter()
                        loss = loss_of(x, w, y)
                        loss.backward()
                        torch.cuda.synchronize()
                        secs = time.perf_counter() - s
                        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(w.grad[-1]).all())
                        confirmed = c_fit if ok else 0
                        note = "finite loss and last-row grad" if ok else "NON-FINITE result"
                        del x, w, y, loss
                        break
                    except torch.cuda.OutOfMemoryError:
                        x = w = y = loss = None
                        gc.collect()
                        torch.cuda.empty_cache()
                        note = f"OOM at {c_fit}"
                        c_fit = int(c_fit * 0.9) // 65536 * 65536
                gc.collect()
                torch.cuda.empty_cache()
                emit(f"| {be} | {per_class:.0f} | {c_fit:,} (2^{math.log2(max(c_fit, 1)):.2f}) "
                     f"| {confirmed:,} | {secs:.2f} | {note} |")
                record("capacity", be, "bytes_per_class", per_class)
                record("capacity", be, "confirmed_C", confirmed)
                record("capacity", be, "step_s", secs)
            except Exception as exc:
                traceback.print_exc()
                emit(f"| {be} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | |")
                gc.collect()
                torch.cuda.empty_cache()
    emit(f"\n(gpu_profile.py: {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
