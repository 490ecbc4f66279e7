"""The benchmark CLI (DESIGN §6).

    python -m bench.run [--device cpu|cuda] [--preset quick|full|gpu|scale] [--out DIR]
                        [--backends NAME ...] [--margins NAME ...] [--C N ...] [--B N] [--D N]
                        [--rounds N] [--no-memory] [--no-plots] [--no-sweep]

For each class count C: forward (no_grad) and forward+backward time of every candidate
(alternating rounds; median, p20, p80), a single GEMM x̂·Wᵀ of the same shape as the
yardstick, and peak extra memory (bench/memory.py). Then the margin sweep: every
margin through the same backend at one shape. Writes ``OUT/results.csv`` (long format,
one row per measurement), ``OUT/table.md`` (also printed) and PNG plots.

The presets:
    quick   the default without a GPU: B=256, D=512, C ∈ {2^14, 2^15, 2^17} (2^17 is the
            issue-2 acceptance shape), naive / chunked / extension / pml; margin sweep at
            2^14. 174-193 s on the 2-core CPU including the plots (2026-12-03; the
            C=2^17 timing rounds 87 s of the 193).
    full    C = 2^14 … 2^17 (CPU) or 2^14 … 2^20 (CUDA), more rounds, every peer.
    gpu     the default with a GPU: B=512, D=512, C = 2^14, 2^16, 2^18, 2^20, fp32 and
            bf16, every backend and peer except naive_compile (recompiles per shape; add it
            with --backends).
    scale   C = 2^22, D=512, B=256 on the CPU (chunked, extension): forward+backward,
            peak memory against the weights + their gradient; the naive loss's need is
            extrapolated from its measured bytes per class and never run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys
import time

import torch

from . import cli, labels, memory, peers, timing

ACCEPT = {"B": 256, "C": 1 << 17, "D": 512, "margin": "expface", "dtype": "fp32"}
"""The issue-2 acceptance shape (ExpFace, fp32, forward+backward)."""

CSV_COLUMNS = ["op", "backend", "margin", "dtype", "B", "C", "D", "metric", "value", "unit",
               "device", "torch", "triton", "date"]

PRESETS = {
    # quick: on the 2-core CPU one fwd+bwd round over naive/chunked/extension/pml at
    # C=2^17 takes ~6.6 s at load 1.4 (~15 s while other builds ran on the box); with 5
    # rounds there the preset took 125 s, hence 4. torch.compile is left to `full`:
    # compiling the naive loss's graphs for three shapes cost ~60 s of a loaded quick run.
    "quick": dict(device="cpu", B=256, D=512, Cs=[1 << 14, 1 << 15, 1 << 17],
                  backends=["naive", "chunked", "extension", "pml"],
                  dtypes=["fp32"], rounds={}, default_rounds=4,
                  fwd_rounds={1 << 14: 3, 1 << 15: 3, 1 << 17: 3},
                  warmup=1, sweep=dict(C=1 << 14, backends=["chunked", "extension"], rounds=2),
                  memory_ops=["fwd+bwd"]),
    "full": dict(device="cpu", B=256, D=512, Cs=[1 << k for k in range(14, 18)],
                 backends=["naive", "naive_compile", "reference", "chunked", "extension", "pml",
                           "torch_lce"],
                 dtypes=["fp32"], rounds={}, default_rounds=9, warmup=1,
                 sweep=dict(C=1 << 17, backends=["chunked", "extension"], rounds=5),
                 memory_ops=["fwd+bwd", "fwd"]),
    # gpu: four shapes, no naive_compile by default (each new shape and dtype recompiles;
    # device time is scarce): add it with --backends, or use --preset full --device cuda.
    "gpu": dict(device="cuda", B=512, D=512, Cs=[1 << 14, 1 << 16, 1 << 18, 1 << 20],
                backends=["naive", "chunked", "triton", "extension", "pml", "torch_lce",
                          "liger", "cce"],
                dtypes=["fp32", "bf16"], rounds={}, default_rounds=20, warmup=3,
                sweep=dict(C=1 << 20, backends=["triton", "extension", "chunked"], rounds=10),
                memory_ops=["fwd+bwd", "fwd"]),
    "scale": dict(device="cpu", B=256, D=512, Cs=[1 << 22], backends=["chunked", "extension"],
                  dtypes=["fp32"], rounds={}, default_rounds=1, warmup=0, sweep=None,
                  memory_ops=["fwd+bwd"]),
}

# torch_lce (torch's chunked F.linear_cross_entropy) sizes its row chunks so that a
# (rows, C) logits chunk matches the (B, D) input: at C=2^17, D=512 that is ONE row per
# chunk, and a fwd+bwd took 57–110 s here. Above this C it is skipped on the CPU.
TORCH_LCE_CPU_MAX_C = 1 << 15


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv}


def device_description(device: torch.device) -> str:
    """Human-readable device: GPU name, or CPU model and core count."""
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _gemm_call(x, w):
    xh = torch.nn.functional.normalize(x.detach(), dim=1)
    wd = w.detach()

    def call():
        with torch.no_grad():
            torch.matmul(xh, wd.t())
    return call


class Recorder:
    """Collects CSV rows with the shared columns filled in."""

    def __init__(self, device: str, versions: dict, date: str):
        self.rows = []
        self.common = {"device": device, **versions, "date": date}

    def add(self, op, backend, margin, dtype, b, c, d, metric, value, unit):
        self.rows.append({"op": op, "backend": backend, "margin": margin, "dtype": dtype, "B": b,
                          "C": c, "D": d, "metric": metric, "value": value, "unit": unit,
                          **self.common})

    def get(self, **kw):
        return [r for r in self.rows if all(r[k] == v for k, v in kw.items())]

    def value(self, **kw):
        got = self.get(**kw)
        return got[0]["value"] if got else None

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            wr.writeheader()
            wr.writerows(self.rows)


def time_sweep(rec: Recorder, usable: dict, cfg: dict, device: torch.device, margin: str,
               dtype: str, m, s: float, verbose=True) -> None:
    """Alternating fwd and fwd+bwd timings of every candidate at every C of the preset."""
    b, d = cfg["B"], cfg["D"]
    for c in cfg["Cs"]:
        x, w, y = memory.make_inputs(b, c, d, dtype, device)
        prepared = {}
        for name, cand in usable.items():
            if name == "torch_lce" and device.type == "cpu" and c > TORCH_LCE_CPU_MAX_C:
                continue
            prepared[name] = cand.prepare(x, w, y, cand.margin_for(margin), m, s)
        for op in ("fwd", "fwd+bwd"):
            if op == "fwd":
                rounds = cfg.get("fwd_rounds", {}).get(c, cfg["rounds"].get(c, cfg["default_rounds"]))
            else:
                rounds = cfg["rounds"].get(c, cfg["default_rounds"])
            calls = {n: (lambda p=p: memory.run_op(p, op)) for n, p in prepared.items()}
            if op == "fwd":
                calls["gemm"] = _gemm_call(x, w)
            t0 = time.perf_counter()
            failed: dict = {}
            got = timing.alternating(calls, rounds, cfg["warmup"], device, failures=failed)
            for n, why in failed.items():
                print(f"  {n} failed at C={c} {op} (dropped there): {why}", file=sys.stderr)
                rec.add(op, n, prepared[n].margin if n in prepared else "none", dtype, b, c, d,
                        "failed", 1, why[:200])
            for n, ts in got.items():
                mg = prepared[n].margin if n in prepared else "none"
                st = timing.summary(ts)
                for k in ("median", "p20", "p80"):
                    rec.add(op, n, mg, dtype, b, c, d, f"time_{k}", st[k], "s")
                rec.add(op, n, mg, dtype, b, c, d, "rounds", len(ts), "count")
                if "naive" in got and n != "naive":
                    rec.add(op, n, mg, dtype, b, c, d, "time_ratio_vs_naive",
                            timing.paired_ratio(ts, got["naive"]), "x")
            if verbose:
                print(f"  timed {op:7s} C={labels.class_count(c)} ({rounds} rounds): "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            for p in prepared.values():
                for t in p.leaves:
                    t.grad = None
        del x, w, y, prepared
        # GEMM equivalents: each time over the same-shape GEMM of this run.
        g = rec.value(op="fwd", backend="gemm", C=c, dtype=dtype, metric="time_median")
        for r in list(rec.get(C=c, dtype=dtype, metric="time_median")):
            if g and r["backend"] != "gemm":
                rec.add(r["op"], r["backend"], r["margin"], dtype, b, c, d, "gemm_equivalents",
                        r["value"] / g, "x GEMM")


def memory_sweep(rec: Recorder, usable: dict, cfg: dict, device: torch.device, margin: str,
                 dtype: str, m, s: float, per_process=False, time_rounds: int = 0) -> list:
    """Peak extra memory of every candidate at every C (CPU: worker process; CUDA: here)."""
    b, d = cfg["B"], cfg["D"]
    results = []
    if device.type == "cuda":
        for c in cfg["Cs"]:
            x, w, y = memory.make_inputs(b, c, d, dtype, device)
            for name, cand in usable.items():
                p = cand.prepare(x, w, y, cand.margin_for(margin), m, s)
                for op in cfg["memory_ops"]:
                    try:
                        results.append({"candidate": name, "margin": p.margin, "C": c, "op": op,
                                        "peak_extra": memory.cuda_peak_extra(p, op),
                                        "input_bytes": memory.input_bytes(p)})
                    except Exception as exc:  # OOM, or a peer rejecting these inputs
                        results.append({"candidate": name, "margin": p.margin, "C": c, "op": op,
                                        "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    torch.cuda.empty_cache()
                del p
            del x, w, y
            torch.cuda.empty_cache()
    else:
        jobs = []
        # Candidate-major, C ascending: the worker warms each candidate up once on the
        # smallest C (torch.compile: on every shape, so that no compilation is measured).
        for name, cand in usable.items():
            for c in cfg["Cs"]:
                if name == "torch_lce" and c > TORCH_LCE_CPU_MAX_C:
                    continue
                for op in cfg["memory_ops"]:
                    job = dict(candidate=name, margin=cand.margin_for(margin), m=m, s=s, B=b, C=c,
                               D=d, dtype=dtype, op=op, seed=0)
                    if time_rounds:
                        job["time_rounds"] = time_rounds
                    if per_process:
                        job["warmup_C"] = 1 << 12
                    # Otherwise a warm-up call at the same shape: the extension's first call
                    # at a new C measured 65.6 MiB at 2^17 after warming up at 2^14, its
                    # steady state (every later training step) 33.5 MiB.
                    jobs.append(job)
        results = memory.run_cpu_jobs(jobs, per_process=per_process)
    for r in results:
        name, c = r["candidate"], r["C"]
        if "skipped" in r:
            print(f"  memory {name} C={c}: skipped ({r['skipped']})", file=sys.stderr)
            continue
        rec.add(r["op"], name, r["margin"], dtype, b, c, d, "peak_extra_mem", r["peak_extra"], "bytes")
        rec.add(r["op"], name, r["margin"], dtype, b, c, d, "input_bytes", r["input_bytes"], "bytes")
        if r.get("grad_bytes"):
            rec.add(r["op"], name, r["margin"], dtype, b, c, d, "grad_bytes", r["grad_bytes"], "bytes")
        if r.get("peak_rss"):
            rec.add(r["op"], name, r["margin"], dtype, b, c, d, "peak_rss", r["peak_rss"], "bytes")
        if time_rounds and r.get("times"):
            # scale preset: timed in the worker (first-call-after-small-warm-up included)
            st = timing.summary(r["times"])
            for k in ("median", "p20", "p80"):
                rec.add(r["op"], name, r["margin"], dtype, b, c, d, f"time_{k}", st[k], "s")
            rec.add(r["op"], name, r["margin"], dtype, b, c, d, "rounds", len(r["times"]), "count")
    for r in list(rec.get(metric="peak_extra_mem", dtype=dtype)):
        if r["backend"] == "naive":
            continue
        nv = rec.value(metric="peak_extra_mem", backend="naive", op=r["op"], C=r["C"], dtype=dtype)
        if nv and (device.type == "cuda" or nv >= memory.CPU_RESOLUTION_BYTES):
            rec.add(r["op"], r["backend"], r["margin"], dtype, b, r["C"], d, "mem_ratio_vs_naive",
                    r["value"] / nv, "x")
    return results


def margin_sweep(rec: Recorder, usable: dict, cfg: dict, device: torch.device, margins: list,
                 dtype: str, s: float) -> None:
    """What each margin costs in the same kernel: fwd+bwd time per margin, per backend."""
    sw = cfg["sweep"]
    b, d, c = cfg["B"], cfg["D"], sw["C"]
    x, w, y = memory.make_inputs(b, c, d, dtype, device)
    for name in sw["backends"]:
        if name not in usable:
            continue
        calls = {}
        for mg in margins:
            p = usable[name].prepare(x, w, y, mg, None, s)
            calls[mg] = (lambda p=p: memory.run_op(p, "fwd+bwd"))
        got = timing.alternating(calls, sw["rounds"], 1, device)
        for mg, ts in got.items():
            st = timing.summary(ts)
            for k in ("median", "p20", "p80"):
                rec.add("margin_sweep", name, mg, dtype, b, c, d, f"time_{k}", st[k], "s")
            if "none" in got and mg != "none":
                rec.add("margin_sweep", name, mg, dtype, b, c, d, "time_ratio_vs_none",
                        timing.paired_ratio(ts, got["none"]), "x")
        for t in (x, w):
            t.grad = None
    del x, w, y


def markdown(rec: Recorder, cfg: dict, device_desc: str, command: str) -> str:
    """The Markdown summary: per (dtype, C, op) one table; then the margin sweep."""
    lines = [f"Device: **{device_desc}** · torch {rec.common['torch']} · triton {rec.common['triton']}"
             f" · {rec.common['date']}", "", f"Command: `{command}`", ""]
    if rec.common["device"].startswith("CPU"):
        lines += ["CPU numbers (not GPU numbers).", ""]
    b, d = cfg["B"], cfg["D"]
    dtypes = sorted({r["dtype"] for r in rec.rows if r["op"] in ("fwd", "fwd+bwd")})
    for dt in dtypes:
        for c in sorted({r["C"] for r in rec.rows if r["dtype"] == dt and r["op"] != "margin_sweep"}):
            lines += [f"**B={b}, C={labels.class_count(c)}, D={d}, {dt}**", "",
                      "| backend | margin | fwd ms (p20–p80) | fwd+bwd ms (p20–p80) | fwd+bwd / naive "
                      "| peak extra MiB (fwd+bwd) | memory / naive | GEMM equiv. (fwd+bwd) |",
                      "|---|---|---|---|---|---|---|---|"]
            names = []
            for r in rec.rows:
                if r["C"] == c and r["dtype"] == dt and r["op"] in ("fwd", "fwd+bwd") \
                        and r["backend"] not in names:
                    names.append(r["backend"])
            for n in names:
                def v(op, metric):
                    return rec.value(op=op, backend=n, C=c, dtype=dt, metric=metric)
                margin = next(r["margin"] for r in rec.rows if r["backend"] == n and r["C"] == c)

                def tcell(op):
                    med = v(op, "time_median")
                    if med is None:
                        return "–"
                    return f"{labels.ms(med)} ({labels.ms(v(op, 'time_p20'))}–{labels.ms(v(op, 'time_p80'))})"
                tr = v("fwd+bwd", "time_ratio_vs_naive")
                mem = v("fwd+bwd", "peak_extra_mem")
                mr = v("fwd+bwd", "mem_ratio_vs_naive")
                ge = v("fwd+bwd", "gemm_equivalents")
                lines.append(f"| {n} | {margin} | {tcell('fwd')} | {tcell('fwd+bwd')} | "
                             f"{'1.00' if n == 'naive' else (f'{tr:.2f}x' if tr else '–')} | "
                             f"{_fmt_bytes(mem) if mem is not None else '–'} | "
                             f"{'1.00' if n == 'naive' and mem else (f'{mr:.3f}x' if mr else '–')} | "
                             f"{f'{ge:.1f}' if ge else '–'} |")
            lines.append("")
    sweep = rec.get(op="margin_sweep", metric="time_median")
    if sweep:
        c = sweep[0]["C"]
        lines += [f"**Margin sweep: fwd+bwd, B={b}, C={labels.class_count(c)}, D={d}, {sweep[0]['dtype']}**", "",
                  "| backend | margin | ms (p20–p80) | / margin none |", "|---|---|---|---|"]
        for r in sweep:
            kw = dict(op="margin_sweep", backend=r["backend"], margin=r["margin"])
            ratio = rec.value(metric="time_ratio_vs_none", **kw)
            lines.append(f"| {r['backend']} | {r['margin']} | {labels.ms(r['value'])} "
                         f"({labels.ms(rec.value(metric='time_p20', **kw))}–"
                         f"{labels.ms(rec.value(metric='time_p80', **kw))}) | "
                         f"{f'{ratio:.2f}x' if ratio else '1.00'} |")
        lines.append("")
    return "\n".join(lines)


def acceptance(rec: Recorder) -> str:
    """The issue-2 acceptance lines, when the acceptance shape was measured."""
    a = ACCEPT
    kw = dict(op="fwd+bwd", B=a["B"], C=a["C"], D=a["D"], dtype=a["dtype"])
    out = []
    for name, t_lim, m_lim in (("chunked", 1.0, 0.10), ("extension", 0.7, 0.05)):
        tr = rec.value(backend=name, metric="time_ratio_vs_naive", margin=a["margin"], **kw)
        mr = rec.value(backend=name, metric="mem_ratio_vs_naive", margin=a["margin"], **kw)
        if tr is None and mr is None:
            continue
        ok_t = tr is not None and tr <= t_lim
        ok_m = mr is not None and mr <= m_lim
        out.append(f"- {name} vs naive (ExpFace fp32 B=256 C=2^17 D=512 fwd+bwd, {rec.common['device']}): "
                   f"time {tr if tr is None else f'{tr:.2f}x'} (target <= {t_lim}x: {'PASS' if ok_t else 'FAIL'}), "
                   f"peak extra memory {mr if mr is None else f'{mr:.3f}x'} "
                   f"(target <= {m_lim:.2f}x: {'PASS' if ok_m else 'FAIL'})")
    return ("**Issue-2 acceptance**\n\n" + "\n".join(out) + "\n") if out else ""


def scale_report(rec: Recorder, cfg: dict, out_dir: str) -> str:
    """The naive loss's memory need at the scale shape, from its measured bytes per class."""
    import csv as _csv
    b, d, c = cfg["B"], cfg["D"], cfg["Cs"][0]
    per_class = None
    src = os.path.join(out_dir, "..", "quick", "results.csv")
    # Bytes per class of the naive loss: from a quick run's CSV when there is one, else
    # the hand count below: at its peak (F.normalize's backward over W) four fp32 (C, D)
    # tensors are live besides W and its gradient — ŵ, ∂L/∂ŵ and two temporaries;
    # measured 1,025.6 MiB at C=2^17, D=512 = 8,204 bytes per class ≈ 4·4·D.
    if os.path.exists(src):
        with open(src) as f:
            rows = [r for r in _csv.DictReader(f) if r["backend"] == "naive" and r["op"] == "fwd+bwd"
                    and r["metric"] == "peak_extra_mem" and int(r["B"]) == b and int(r["D"]) == d]
        if len(rows) >= 2:
            rows.sort(key=lambda r: int(r["C"]))
            c0, c1 = int(rows[0]["C"]), int(rows[-1]["C"])
            per_class = (float(rows[-1]["value"]) - float(rows[0]["value"])) / (c1 - c0)
    how = "slope of the measured naive peak extra memory in bench/out/quick/results.csv"
    if per_class is None:
        per_class = 4 * 4 * d
        how = "hand count: four fp32 (C, D) temporaries"
    need_extra = per_class * c
    inputs = 4 * (c * d + b * d)
    need_total = need_extra + 2 * inputs
    rec.add("fwd+bwd", "naive", "expface", "fp32", b, c, d, "est_peak_extra_mem", need_extra, "bytes")
    rec.add("fwd+bwd", "naive", "expface", "fp32", b, c, d, "est_peak_total_mem", need_total, "bytes")
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        avail = float("nan")
    lines = [f"**Scale run: B={b}, C={labels.class_count(c)}, D={d}, fp32, fwd+bwd ({rec.common['device']})**", "",
             f"Weights {_fmt_bytes(4 * c * d)} MiB + their gradient {_fmt_bytes(4 * c * d)} MiB "
             f"(machine: {_fmt_bytes(avail)} MiB RAM).", "",
             "| backend | fwd+bwd s | peak extra MiB | peak total (RSS) MiB | peak total / (W + grad W) |",
             "|---|---|---|---|---|"]
    for r in rec.get(metric="peak_extra_mem", C=c, op="fwd+bwd"):
        n = r["backend"]
        t = rec.value(backend=n, C=c, op="fwd+bwd", metric="time_median")
        rss = rec.value(backend=n, C=c, op="fwd+bwd", metric="peak_rss")
        lines.append(f"| {n} | {t:.1f} | {_fmt_bytes(r['value'])} | {_fmt_bytes(rss)} | "
                     f"{rss / (8 * c * d):.3f} |")
    lines += ["", f"naive (not run): needs ~{_fmt_bytes(need_extra)} MiB extra + "
              f"{_fmt_bytes(2 * inputs)} MiB inputs and gradients = ~{need_total / 2**30:.1f} GiB "
              f"> {avail / 2**30:.1f} GiB RAM ({per_class:,.0f} bytes per class: {how}).", ""]
    return "\n".join(lines)


def default_device(preset: str | None) -> str:
    """The device when --device is not given: the gpu and scale presets' own (CUDA, the
    CPU), otherwise the GPU when there is one, else the CPU -- the README quickstart's
    "default device"."""
    if preset in ("gpu", "scale"):
        return PRESETS[preset]["device"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: the GPU when there is one, else the CPU "
                         "(--preset gpu: cuda, --preset scale: cpu)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: quick on cpu, gpu on cuda")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/PRESET)")
    ap.add_argument("--backends", nargs="+", default=None, choices=peers.ALL_CANDIDATES,
                    metavar="NAME", help=f"candidates, from {list(peers.ALL_CANDIDATES)}")
    ap.add_argument("--margins", nargs="+", default=None, choices=peers.ALL_MARGINS, metavar="NAME",
                    help=f"margins of the margin sweep, from {list(peers.ALL_MARGINS)} "
                         "(the C sweep uses the first; default expface)")
    ap.add_argument("--C", type=cli.positive_int, nargs="+", default=None, help="class counts")
    ap.add_argument("--B", type=cli.positive_int, default=None)
    ap.add_argument("--D", type=cli.positive_int, default=None)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(memory.DTYPES), default=None)
    ap.add_argument("--rounds", type=cli.positive_int, default=None, help="measured rounds at every C")
    ap.add_argument("--sweep-C", type=cli.positive_int, default=None,
                    help="class count of the margin sweep")
    ap.add_argument("--s", type=cli.positive_float, default=64.0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device_name = args.device or default_device(args.preset)
    preset = args.preset or ("gpu" if device_name == "cuda" else "quick")
    cfg = {**PRESETS[preset], "rounds": dict(PRESETS[preset]["rounds"])}
    if cfg["sweep"]:
        cfg["sweep"] = dict(cfg["sweep"])
    device = torch.device(device_name)
    if preset == "scale" and device.type != "cpu":
        print("--preset scale is the CPU-RAM run (resident-set memory); use --preset gpu on CUDA",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    if preset == "full" and device.type == "cuda":
        cfg["Cs"] = [1 << k for k in range(14, 21)]
        cfg["backends"] = cfg["backends"] + ["triton", "liger", "cce"]
    if args.C is not None:
        cfg["Cs"] = sorted(args.C)
    for k in ("B", "D"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.rounds is not None:
        cfg["rounds"], cfg["fwd_rounds"], cfg["default_rounds"] = {}, {}, args.rounds
        if cfg["sweep"]:
            cfg["sweep"]["rounds"] = args.rounds
    if args.dtypes:
        cfg["dtypes"] = args.dtypes
    if args.sweep_C is not None and cfg["sweep"]:
        cfg["sweep"]["C"] = args.sweep_C
    if args.no_sweep:
        cfg["sweep"] = None
    names = args.backends or cfg["backends"]
    margins = args.margins or (["expface"] if preset == "scale" else list(peers.ALL_MARGINS))
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", preset)
    os.makedirs(out_dir, exist_ok=True)

    usable, skipped = peers.resolve(names, device)
    for n, why in skipped.items():
        print(f"skipped {n}: {why}", file=sys.stderr)
    if cfg["sweep"]:
        cfg["sweep"]["backends"] = [n for n in cfg["sweep"]["backends"] if n in usable] or \
            [n for n in usable if n in peers.LIBRARY_BACKENDS][:1]
    desc = device_description(device)
    versions = _versions()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rec = Recorder(desc, versions, date)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"{desc} | preset {preset} | candidates {list(usable)} | load avg {load:.1f}", file=sys.stderr)

    margin = margins[0]
    for dtype in cfg["dtypes"]:
        if preset == "scale":
            memory_sweep(rec, usable, cfg, device, margin, dtype, None, args.s, per_process=True,
                         time_rounds=cfg["default_rounds"])
            continue
        time_sweep(rec, usable, cfg, device, margin, dtype, None, args.s)
        if not args.no_memory:
            t0 = time.perf_counter()
            memory_sweep(rec, usable, cfg, device, margin, dtype, None, args.s)
            print(f"  memory: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if cfg["sweep"] and len(margins) > 1:
        t0 = time.perf_counter()
        margin_sweep(rec, usable, cfg, device, margins, cfg["dtypes"][0], args.s)
        print(f"  margin sweep: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    text = markdown(rec, cfg, desc, command) if preset != "scale" else scale_report(rec, cfg, out_dir)
    text += "\n" + acceptance(rec)
    if skipped:
        text += "\nSkipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()) + "\n"
    rec.write_csv(os.path.join(out_dir, "results.csv"))
    if not args.no_plots:
        from . import plots
        t0 = time.perf_counter()
        made = plots.make_all(rec.rows, out_dir, with_margins=(preset != "scale"))
        text += "\nPlots: " + ", ".join(os.path.basename(p) for p in made) + "\n"
        print(f"  plots: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    wall = time.perf_counter() - t_start
    text += f"\nWall time: {wall:.1f} s (load average at start {load:.1f})\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
