"""Where the GPU time goes, launch-config variants, and the largest C per backend.

    python -m bench.run profile [--B 512] [--c-exp 20] [--D 512] [--out DIR]
                                [--parts split variants capacity] [--budget-s 200]
                                [--dtype bf16|fp16-fp32]

Three parts, each printed as a small Markdown table and appended to
``OUT/profile.md`` (long-format CSV rows in ``OUT/profile.csv``), bf16 x and W, or with
``--dtype fp16-fp32`` fp16 x and an fp32 W (the common face-recognition case):

split     forward and backward of one training step timed apart (CUDA events), for the
          ``triton`` and ``extension`` backends (and the extension with the per-row work as
          PyTorch ops, prologue.USE_EXTENSION = False), with the host time of the same calls
          (perf_counter around the Python calls, no sync inside): when the host time is
          close to the GPU time, launch overhead -- not the kernels -- sets the pace. Then
          the extension's cuBLAS GEMMs per class chunk against one full-size GEMM, and a
          torch.profiler table of the kernels of one step per backend.
variants  the Triton primitives with every candidate of configs.forward_candidates /
          grads_candidates (and two more backward chunk budgets), each checked against
          the chunked backend's primitives, and the extension with three logits-block
          budgets: time, host time, peak extra memory.
capacity  the largest C that fits on this GPU per backend: bytes per class measured at
          C = 2^c_exp (W, its gradient and the loss's peak extra, all over C), the C that
          fills 97% of the free memory at that rate, then one forward+backward there to
          confirm it (10% less and once more on OOM).

GPU only; ``--device cpu`` runs the logic on tiny shapes under TRITON_INTERPRET=1 (a
smoke test: the numbers mean nothing, and capacity is skipped).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("split", "variants", "capacity")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import cli
    p.add_argument("--B", type=cli.positive_int, default=512)
    p.add_argument("--D", type=cli.positive_int, default=512)
    p.add_argument("--c-exp", type=cli.positive_int, default=20, help="C = 2^c_exp for split / variants")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--capacity-backends", nargs="+", default=["triton", "extension", "naive"])
    p.add_argument("--budget-s", type=cli.positive_float, default=200.0,
                   help="no new measurement starts after this many seconds")
    p.add_argument("--s", type=cli.positive_float, default=64.0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16-fp32"],
                   help="x / W dtypes: bf16 both, or fp16 x with an fp32 W")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out", "profile")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args(argv)


class Profile:
    """Shared set-up of the parts: inputs, timers, the report and the CSV."""

    def __init__(self, args):
        import torch

        from .memory import DTYPES
        from .records import Recorder
        self.args, self.torch = args, torch
        self.on_gpu = args.device == "cuda"
        self.dev = torch.device(args.device)
        # the interpreter has no 16-bit dots: fp32 on the CPU smoke run
        self.dtype = args.dtype if self.on_gpu else "fp32"
        self.dt, self.w_dt = DTYPES[self.dtype]
        self.B, self.D, self.C = args.B, args.D, 1 << args.c_exp
        self.t0 = time.time()
        self.rec = Recorder(self.dev)
        self.gen = torch.Generator(device=self.dev).manual_seed(0)
        os.makedirs(args.out, exist_ok=True)
        self.md_path = os.path.join(args.out, "profile.md")

    def emit(self, text: str) -> None:
        print(text, flush=True)
        with open(self.md_path, "a") as f:
            f.write(text + "\n")

    def record(self, op: str, what: str, metric: str, value: float, unit: str, c: int | None = None) -> None:
        self.rec.add(op, what, "expface", self.dtype, self.B, c or self.C, self.D, metric, value, unit)
        self.rec.write_csv(os.path.join(self.args.out, "profile.csv"))

    def out_of_time(self) -> bool:
        return time.time() - self.t0 > self.args.budget_s

    def sync(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize()

    def gpu_ms(self, fn) -> float:
        """Median device time of fn() in ms (do_bench on a GPU; 3 wall-clock runs on CPU)."""
        from .timing import device_ms
        return device_ms(fn, self.on_gpu)[0]

    def host_ms(self, fn, n: int = 5) -> float:
        """Median wall time of the Python call alone (no sync inside the timed region)."""
        ts = []
        for _ in range(n):
            self.sync()
            s = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - s) * 1e3)
            self.sync()
        return sorted(ts)[n // 2]

    def peak_extra(self, fn, keep_bytes: int = 0) -> float:
        """Peak bytes above the start of fn(), minus keep_bytes (outputs it keeps)."""
        from .memory import cuda_peak_extra_of
        return cuda_peak_extra_of(fn, keep_bytes) if self.on_gpu else float("nan")

    def inputs(self, c: int):
        torch, g = self.torch, self.gen
        x = torch.randn(self.B, self.D, device=self.dev, generator=g).to(self.dt).requires_grad_()
        w = torch.empty(c, self.D, device=self.dev, dtype=self.w_dt).normal_(0, 0.01, generator=g)
        y = torch.randint(0, c, (self.B,), device=self.dev, generator=g)
        return x, w.requires_grad_(), y

    def free(self) -> None:
        gc.collect()
        if self.on_gpu:
            self.torch.cuda.empty_cache()


def _failed(exc: Exception) -> str:
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


# ------------------------------------------------------------------ split

def _fwd_bwd_times(pf: Profile, fwd, x, w) -> tuple:
    """Median (GPU ms, host ms) of the forward and of the backward over 5 steps."""
    torch = pf.torch
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if pf.on_gpu else None
    f_ms, b_ms = [], []
    for _ in range(5):
        pf.sync()
        if ev:
            ev[0].record()
        s = time.perf_counter()
        loss = fwd()
        if ev:
            ev[1].record()
        m = time.perf_counter()
        loss.backward()
        if ev:
            ev[2].record()
        e = time.perf_counter()
        pf.sync()
        f_ms.append((ev[0].elapsed_time(ev[1]) if ev else (m - s) * 1e3, (m - s) * 1e3))
        b_ms.append((ev[1].elapsed_time(ev[2]) if ev else (e - m) * 1e3, (e - m) * 1e3))
        x.grad = w.grad = None
    return sorted(f_ms)[2], sorted(b_ms)[2]


def split_backend(pf: Profile, label: str, be: str, ops_prologue: bool, x, w, y) -> None:
    """One row of the split table: fwd / bwd GPU and host ms, and the whole step."""
    import expface_kernels as ek
    from expface_kernels import prologue
    prologue.USE_EXTENSION = ops_prologue
    try:
        def fwd():
            return ek.margin_softmax_loss(x, w, y, s=pf.args.s, backend=be)
        fwd().backward()  # warm-up (compilation)
        x.grad = w.grad = None
        (fg, fh), (bg, bh) = _fwd_bwd_times(pf, fwd, x, w)
        st = pf.gpu_ms(lambda: fwd().backward())
        x.grad = w.grad = None
        pf.emit(f"| {label} | {fg:.3f} | {fh:.3f} | {bg:.3f} | {bh:.3f} | {st:.3f} |")
        for op, metric, v in (("fwd", "gpu_time", fg), ("fwd", "host_time", fh), ("bwd", "gpu_time", bg),
                              ("bwd", "host_time", bh), ("fwd+bwd", "gpu_time", st)):
            pf.record(op, label, metric, v / 1e3, "s")
    except Exception as exc:  # report and go on: every row is independent
        pf.emit(f"| {label} | {_failed(exc)} | | | | |")
    finally:
        prologue.USE_EXTENSION = True


def _chunk_gemms(pf: Profile, xa, w, w_low, ch: int, mixed: bool) -> list:
    """ms of the extension's GEMMs over one class chunk of ``ch`` rows, times C / ch."""
    torch, B, C, D, dt = pf.torch, pf.B, pf.C, pf.D, pf.dt
    wc = w_low[:ch]
    lc = torch.randn(B, ch, device=pf.dev, generator=pf.gen).to(dt)
    k = C / ch
    got = [pf.gpu_ms(lambda: torch.mm(xa, wc.t())) * k, pf.gpu_ms(lambda: torch.mm(lc, wc)) * k,
           pf.gpu_ms(lambda: torch.mm(lc.t(), xa)) * k]
    if mixed:
        w32 = w.detach()[:ch]
        gw32 = torch.empty(ch, D, device=pf.dev)
        got.append(pf.gpu_ms(lambda: w32.to(dt)) * k)
        try:
            got.append(pf.gpu_ms(lambda: torch.mm(lc.t(), xa, out_dtype=torch.float32, out=gw32)) * k)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm's out_dtype
            got.append(float("nan"))
    return got


def gemm_yardstick(pf: Profile, x, w) -> None:
    """The extension's GEMMs per class chunk, times C / chunk, against one full-size GEMM:
    what chunking costs cuBLAS (B x chunk logits; grad_x with K = chunk; grad_W with
    K = B). With an fp32 W the extension casts each chunk of W to fp16 and writes grad_W's
    product in fp32 (mm's out_dtype, where torch has it): those rows too."""
    torch = pf.torch
    low = str(pf.dt).replace("torch.", "")
    pf.emit(f"\n| cuBLAS GEMM ({low}) | chunk 8192 | chunk 32768 | full C |")
    pf.emit("|---|---|---|---|")
    mixed = pf.w_dt != pf.dt and pf.on_gpu
    with torch.no_grad():
        xa, w_low = x.detach(), w.detach().to(pf.dt)
        full = pf.gpu_ms(lambda: torch.mm(xa, w_low.t()))
        per = {min(ch, pf.C): _chunk_gemms(pf, xa, w, w_low, min(ch, pf.C), mixed) for ch in (8192, 32768)}
    names = ["logits x W^T", "grad_x (K = chunk)", "grad_W (K = B)"]
    if mixed:
        names += [f"W chunk fp32 -> {low} (cast)", "grad_W (K = B), fp32 out (mm out_dtype)"]
    for k, nm in enumerate(names):
        vals = [per[ch][k] for ch in sorted(per)]
        pf.emit(f"| {nm} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {full:.3f} |")
        for ch in sorted(per):
            pf.record("gemm", f"cublas {nm}, chunk {ch} (x C/chunk)", "gpu_time", per[ch][k] / 1e3, "s")
    pf.record("gemm", "cublas full GEMM", "gpu_time", full / 1e3, "s")
    pf.record("gemm", "cublas full GEMM", "tflops", 2.0 * pf.B * pf.C * pf.D / (full * 1e-3) / 1e12, "TFLOP/s")


def kernel_tables(pf: Profile, x, w, y) -> None:
    """torch.profiler's table of the kernels of one step per backend (GPU only)."""
    import expface_kernels as ek
    from torch.profiler import ProfilerActivity, profile
    for be in ("triton", "extension"):
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ek.margin_softmax_loss(x, w, y, s=pf.args.s, backend=be).backward()
                pf.torch.cuda.synchronize()
            x.grad = w.grad = None
            try:
                tab = prof.key_averages().table(sort_by="device_time_total", row_limit=12)
            except Exception:  # older spelling
                tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            pf.emit(f"\nkernels of one {be} step (torch.profiler):\n```\n{tab}\n```")
        except Exception as exc:
            pf.emit(f"(profiler failed for {be}: {type(exc).__name__}: {exc})")


def part_split(pf: Profile) -> None:
    x, w, y = pf.inputs(pf.C)
    pf.emit("### split: forward / backward of one step (ms)\n")
    pf.emit("| backend | fwd GPU | fwd host | bwd GPU | bwd host | step (do_bench) |")
    pf.emit("|---|---|---|---|---|---|")
    # The last row runs the per-row work around the class loop as PyTorch ops instead of
    # the extension's ops (expface_kernels/prologue.py): what those ops save.
    for label, be, ops in (("triton", "triton", True), ("extension", "extension", True),
                           ("extension, PyTorch prologue", "extension", False)):
        split_backend(pf, label, be, ops, x, w, y)
    gemm_yardstick(pf, x, w)
    if pf.on_gpu:
        kernel_tables(pf, x, w, y)
    del x, w, y
    pf.free()


# ------------------------------------------------------------------ variants

def describe(cfg) -> str:
    """A launch config in one short line (configs.ForwardConfig / GradsConfig)."""
    def tile(t):
        return f"{t.BLOCK_M}x{t.BLOCK_N}x{t.BLOCK_K}/w{t.num_warps}s{t.num_stages}"
    if hasattr(cfg, "tile"):
        return (f"tile {tile(cfg.tile)}, {cfg.target_programs} programs, norms "
                f"{'in loop' if cfg.norms_in_loop else 'separate pass'}")
    knobs = "" if cfg.scale_g else ", G unscaled (dX scales W in registers)"
    return (f"G {tile(cfg.g_tile)}, dW {tile(cfg.dw_tile)}, dX {tile(cfg.dx_tile)}, "
            f"chunk {cfg.chunk_bytes / 2**20:g} MiB, dX partials {cfg.max_dx_partial_bytes / 2**20:g} MiB"
            + knobs)


def _rel_err(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


class PrimitiveInputs:
    """Inputs of the two Triton primitives at the profile's shape, and the chunked
    backend's results on them (fp32 math): a fast config that computes the wrong numbers
    must show."""

    def __init__(self, pf: Profile, x, w, y):
        torch = pf.torch
        from expface_kernels import chunked
        with torch.no_grad():
            self.xh = torch.nn.functional.normalize(x.float(), dim=1).to(pf.dt)
            self.w = w.detach()
            self.tl = torch.randn(pf.B, device=pf.dev, generator=pf.gen) * 10
        self.y, self.s = y, pf.args.s
        m, se, self.inv = chunked.lse_partials(self.xh, self.w, self.tl, y, self.s, 0)
        self.lse = m + torch.log(se)
        self.grow = torch.full((pf.B,), 1.0 / pf.B, device=pf.dev)
        self.tg = self.grow * torch.expm1(self.tl - self.lse)
        self.ref = chunked.grads(self.xh, self.w, self.inv, y, self.lse, self.tg, self.grow, self.s, 0)

    def call(self, prim: str, cfg):
        from expface_kernels.triton_kernels import grads_backward, lse_forward
        if prim == "lse_partials":
            return lse_forward.lse_partials(self.xh, self.w, self.tl, self.y, self.s, 0, config=cfg)
        return grads_backward.grads(self.xh, self.w, self.inv, self.y, self.lse, self.tg, self.grow,
                                    self.s, 0, config=cfg)

    def error(self, prim: str, out) -> float:
        """max relative error of lse and the W norms (forward) or of grad_x / grad_W."""
        if prim == "lse_partials":
            return max(_rel_err(out[0] + out[1].log(), self.lse), _rel_err(out[2], self.inv))
        return max(_rel_err(out[0], self.ref[0]), _rel_err(out[1], self.ref[1]))


def variant_configs(pf: Profile, pi: PrimitiveInputs) -> list:
    """(primitive, index, config): every forward candidate, every grads candidate and two
    more backward chunk budgets (index 0: the default)."""
    from expface_kernels.triton_kernels import common, configs
    dd = common.dot_dtype(pi.xh.dtype, pi.w.dtype)
    lb = max(pi.xh.element_size(), pi.w.element_size())
    args = (pf.dev, pf.B, pf.C, pf.D, dd, lb)
    fwd_c = configs.forward_candidates(*args)
    grd_c = configs.grads_candidates(*args)
    base_g = configs.grads_config(*args)
    for mb in (8, 64):
        cand = configs.GradsConfig(**{**base_g.__dict__, "chunk_bytes": mb << 20})
        if cand not in grd_c:
            grd_c.append(cand)
    return [("lse_partials", i, c) for i, c in enumerate(fwd_c)] + \
        [("grads", i, c) for i, c in enumerate(grd_c)]


def time_variant(pf: Profile, pi: PrimitiveInputs, prim: str, i: int, cfg) -> None:
    """One row: GPU ms, host ms, peak extra MiB and error of one launch config."""
    desc = describe(cfg)
    keep = 0 if prim == "lse_partials" else pi.w.numel() * pi.w.element_size() + pf.B * pf.D * 4
    try:
        def fn():
            return pi.call(prim, cfg)
        err = pi.error(prim, fn())  # (also compiles)
        gm, hm = pf.gpu_ms(fn), pf.host_ms(fn)
        ex = pf.peak_extra(fn, keep)
        pf.emit(f"| {prim} | #{i} {'(default) ' if i == 0 else ''}{desc} | {gm:.3f} | {hm:.3f} "
                f"| {ex / 2**20:.1f} | {err:.1e} |")
        what = f"triton {prim}#{i}: {desc}"
        pf.record(prim, what, "gpu_time", gm / 1e3, "s")
        pf.record(prim, what, "host_time", hm / 1e3, "s")
        pf.record(prim, what, "max_rel_err", err, "1")
    except Exception as exc:
        pf.emit(f"| {prim} | #{i} {desc} | {_failed(exc)} | | | |")


def extension_blocks(pf: Profile, x, w, y) -> None:
    """The extension's step time and peak extra memory at three logits-block budgets."""
    import expface_kernels as ek
    from expface_kernels import extension as ext
    pf.emit("\n| extension block | step ms | extra MiB |")
    pf.emit("|---|---|---|")
    gb = w.numel() * w.element_size() + x.numel() * x.element_size()

    def step():
        ek.margin_softmax_loss(x, w, y, s=pf.args.s, backend="extension").backward()
    try:
        for mb in (16, 24, 32):
            if pf.out_of_time():
                break
            ext.BLOCK_BYTES = mb << 20
            step()
            x.grad = w.grad = None
            st = pf.gpu_ms(step)
            x.grad = w.grad = None
            ex = pf.peak_extra(step, gb)
            x.grad = w.grad = None
            pf.emit(f"| {mb} MiB | {st:.3f} | {ex / 2**20:.1f} |")
            pf.record("fwd+bwd", f"extension block {mb} MiB", "gpu_time", st / 1e3, "s")
            pf.record("fwd+bwd", f"extension block {mb} MiB", "peak_extra_mem", ex, "bytes")
    except Exception as exc:
        pf.emit(f"(extension variants failed: {_failed(exc)})")
    finally:
        ext.BLOCK_BYTES = 0


def part_variants(pf: Profile) -> None:
    x, w, y = pf.inputs(pf.C)
    pi = PrimitiveInputs(pf, x, w, y)
    pf.emit("\n### variants: Triton primitives per launch config (ms; host = Python call alone; "
            "err = max relative error against the chunked backend's primitives)\n")
    pf.emit("| primitive | config | GPU ms | host ms | extra MiB | err |")
    pf.emit("|---|---|---|---|---|---|")
    for prim, i, cfg in variant_configs(pf, pi):
        if pf.out_of_time():
            pf.emit(f"| {prim} | #{i} | (skipped: time budget) | | | |")
            continue
        time_variant(pf, pi, prim, i, cfg)
    del pi
    extension_blocks(pf, x, w, y)
    del x, w, y
    pf.free()


# ------------------------------------------------------------------ capacity

def _loss_of(pf: Profile, be: str):
    import expface_kernels as ek
    from .peers import naive_loss

    def loss(x, w, y):
        if be == "naive":
            return naive_loss(x, w, y, s=pf.args.s)
        return ek.margin_softmax_loss(x, w, y, s=pf.args.s, backend=be)
    return loss


def bytes_per_class(pf: Profile, loss_of) -> float:
    """(peak bytes of one warm forward+backward, W and its gradient included) / C."""
    torch = pf.torch
    pf.free()
    base = torch.cuda.memory_allocated()
    x, w, y = pf.inputs(pf.C)
    loss_of(x, w, y).backward()  # warm-up
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss_of(x, w, y).backward()
    torch.cuda.synchronize()
    per_class = (torch.cuda.max_memory_allocated() - base) / pf.C
    del x, w, y
    pf.free()
    return per_class


def confirm_fit(pf: Profile, loss_of, c_fit: int) -> tuple:
    """(confirmed C, step seconds, note): one forward+backward at c_fit, 10% less on OOM."""
    torch = pf.torch
    note = ""
    for _ in range(2):
        try:
            x, w, y = pf.inputs(c_fit)
            torch.cuda.synchronize()
            s = time.perf_counter()
            loss = loss_of(x, w, y)
            loss.backward()
            torch.cuda.synchronize()
            secs = time.perf_counter() - s
            ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(w.grad[-1]).all())
            del x, w, y, loss
            pf.free()
            return (c_fit if ok else 0), secs, ("finite loss and last-row grad" if ok else "NON-FINITE result")
        except torch.cuda.OutOfMemoryError:
            x = w = y = loss = None
            pf.free()
            note = f"OOM at {c_fit}"
            c_fit = int(c_fit * 0.9) // 65536 * 65536
    return 0, float("nan"), note


def capacity_backend(pf: Profile, be: str) -> None:
    try:
        loss_of = _loss_of(pf, be)
        per_class = bytes_per_class(pf, loss_of)
        free, _ = pf.torch.cuda.mem_get_info()
        c_fit = int(0.97 * free / per_class) // 65536 * 65536
        confirmed, secs, note = confirm_fit(pf, loss_of, c_fit)
        pf.emit(f"| {be} | {per_class:.0f} | {c_fit:,} (2^{math.log2(max(c_fit, 1)):.2f}) "
                f"| {confirmed:,} | {secs:.2f} | {note} |")
        pf.record("fwd+bwd", be, "bytes_per_class", per_class, "bytes")
        pf.record("fwd+bwd", be, "confirmed_C", confirmed, "count")
        pf.record("fwd+bwd", be, "capacity_step_time", secs, "s", c=confirmed or None)
    except Exception as exc:
        pf.emit(f"| {be} | {_failed(exc)} | | | | |")
        pf.free()


def part_capacity(pf: Profile) -> None:
    pf.emit(f"\n### capacity: largest C per backend ({pf.dtype}, B and D as above)\n")
    pf.emit(f"| backend | bytes / class at 2^{pf.args.c_exp} | C that fills 97% of free | confirmed C "
            "| step s | note |")
    pf.emit("|---|---|---|---|---|---|")
    for be in pf.args.capacity_backends:
        if pf.out_of_time():
            pf.emit(f"| {be} | (skipped: time budget) | | | | |")
            continue
        capacity_backend(pf, be)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile: no CUDA device -- nothing to measure (--device cpu: a smoke run)", file=sys.stderr)
        return 2
    pf = Profile(args)
    pf.emit(f"## profile: {pf.rec.header()}\n\nB={pf.B}, C=2^{args.c_exp}, D={pf.D}, "
            f"x {str(pf.dt).replace('torch.', '')}, W {str(pf.w_dt).replace('torch.', '')}\n")
    for part, fn in (("split", part_split), ("variants", part_variants), ("capacity", part_capacity)):
        if part not in args.parts or (part != "split" and pf.out_of_time()):
            continue
        if part == "capacity" and not pf.on_gpu:
            pf.emit("\n(capacity: GPU only, skipped)")
            continue
        fn(pf)
    pf.emit(f"\n(profile: {time.time() - pf.t0:.0f} s)")
    return 0
