"""The measurements of ``python -m bench.run``'s sweep: time, memory, error, margins.

Per shape (B, C, D, dtype): forward (no_grad) and forward+backward time of every
candidate in alternating rounds (bench/timing.py), one GEMM x̂·Wᵀ of the same shape as
the yardstick, optionally the loss's error against float64, and peak extra memory
(bench/memory.py: in this process on CUDA, a worker process on the CPU). Then the margin
sweep: every margin through the same backend at one shape. Every number goes to a
:class:`bench.records.Recorder`.
"""

from __future__ import annotations

import sys
import time

import torch

import expface_kernels as ek

from . import labels, memory, timing

# torch_lce (torch's chunked F.linear_cross_entropy) sizes its row chunks so that a
# (rows, C) logits chunk matches the (B, D) input: at C=2^17, D=512 that is ONE row per
# chunk, and a fwd+bwd took 57–110 s here. Above this C it is skipped on the CPU.
TORCH_LCE_CPU_MAX_C = 1 << 15


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _runs_here(name: str, device: torch.device, c: int) -> bool:
    return not (name == "torch_lce" and device.type == "cpu" and c > TORCH_LCE_CPU_MAX_C)


def prepare_all(usable: dict, x, w, y, margin: str, s: float, device: torch.device) -> dict:
    """name -> Prepared for every candidate that runs at this C on this device."""
    return {n: cand.prepare(x, w, y, cand.margin_for(margin), None, s)
            for n, cand in usable.items() if _runs_here(n, device, w.shape[0])}


def gemm_call(x, w):
    """One (B, D) x (D, C) GEMM of normalised rows in the lower-precision dtype of x and W
    (the dtype the fused backends' GEMMs run in: fp16 for fp16 x with an fp32 W)."""
    low = x.dtype if x.element_size() <= w.element_size() else w.dtype
    xh = torch.nn.functional.normalize(x.detach().float(), dim=1).to(low)
    wd = w.detach().to(low)

    def call():
        with torch.no_grad():
            torch.matmul(xh, wd.t())
    return call


def _rounds(cfg: dict, c: int, op: str) -> int:
    if op == "fwd" and c in cfg.get("fwd_rounds", {}):
        return cfg["fwd_rounds"][c]
    return cfg["rounds"].get(c, cfg["default_rounds"])


def _record_times(rec, got: dict, prepared: dict, op: str, shape: tuple) -> None:
    dtype, b, c, d = shape
    for n, ts in got.items():
        mg = prepared[n].margin if n in prepared else "none"
        st = timing.summary(ts)
        for k in ("median", "p20", "p80"):
            rec.add(op, n, mg, dtype, b, c, d, f"time_{k}", st[k], "s")
        rec.add(op, n, mg, dtype, b, c, d, "rounds", len(ts), "count")
        if "naive" in got and n != "naive":
            rec.add(op, n, mg, dtype, b, c, d, "time_ratio_vs_naive",
                    timing.paired_ratio(ts, got["naive"]), "x")
    if op == "fwd" and "gemm" in got:
        rec.add("fwd", "gemm", "none", dtype, b, c, d, "tflops",
                2.0 * b * c * d / timing.summary(got["gemm"])["median"] / 1e12, "TFLOP/s")


def time_shape(rec, prepared: dict, x, w, cfg: dict, device: torch.device, shape: tuple) -> None:
    """Alternating fwd and fwd+bwd timings of every prepared candidate at one shape."""
    dtype, b, c, d = shape
    for op in ("fwd", "fwd+bwd"):
        rounds = _rounds(cfg, c, op)
        calls = {n: (lambda p=p: memory.run_op(p, op)) for n, p in prepared.items()}
        if op == "fwd":
            calls["gemm"] = gemm_call(x, w)
        t0 = time.perf_counter()
        failed: dict = {}
        got = timing.alternating(calls, rounds, cfg["warmup"], device, failures=failed)
        for n, why in failed.items():
            _log(f"  {n} failed at C={c} {op} (dropped there): {why}")
            rec.add(op, n, prepared[n].margin if n in prepared else "none", dtype, b, c, d,
                    "failed", 1, why[:200])
        _record_times(rec, got, prepared, op, shape)
        _log(f"  timed {op:7s} B={b} C={labels.class_count(c)} {dtype} ({rounds} rounds): "
             f"{time.perf_counter() - t0:.1f} s")
        for p in prepared.values():
            for t in p.leaves:
                t.grad = None


def gemm_equivalents(rec, shape: tuple) -> None:
    """Each time at this shape over the same-shape GEMM's (4.0 = the four-GEMM floor of a
    forward+backward, DESIGN §4)."""
    dtype, b, c, d = shape
    g = rec.value(op="fwd", backend="gemm", B=b, C=c, dtype=dtype, metric="time_median")
    if not g:
        return
    for r in list(rec.get(B=b, C=c, dtype=dtype, metric="time_median")):
        if r["backend"] != "gemm" and r["op"] in ("fwd", "fwd+bwd"):
            rec.add(r["op"], r["backend"], r["margin"], dtype, b, c, d, "gemm_equivalents",
                    r["value"] / g, "x GEMM")


def loss_errors(rec, prepared: dict, x, w, y, s: float, shape: tuple) -> None:
    """|loss − loss64| / |loss64| per candidate, loss64 from the chunked backend in float64
    on the same (rounded) inputs; and each error over the naive loss's."""
    dtype, b, c, d = shape
    ref = {}
    errs = {}
    for n, p in prepared.items():
        try:
            with torch.no_grad():
                got = float(p.loss_fn())
                if p.margin not in ref:
                    ref[p.margin] = float(ek.margin_softmax_loss(
                        x.detach().double(), w.detach().double(), y, p.margin, s=s, backend="chunked"))
        except Exception as exc:  # the timing round reports it; no error figure here
            _log(f"  error of {n} not measured: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        want = ref[p.margin]
        errs[n] = abs(got - want) / max(abs(want), 1e-30)
        rec.add("fwd", n, p.margin, dtype, b, c, d, "rel_err_vs_fp64", errs[n], "1")
    naive = errs.get("naive")
    for n, e in errs.items():
        if naive and n != "naive" and prepared[n].margin == prepared["naive"].margin:
            rec.add("fwd", n, prepared[n].margin, dtype, b, c, d, "err_ratio_vs_naive", e / naive, "x")


def memory_cuda_shape(rec, prepared: dict, cfg: dict, shape: tuple) -> None:
    """Peak extra CUDA memory of every candidate at this shape (in this process)."""
    dtype, b, c, d = shape
    for name, p in prepared.items():
        for op in cfg["memory_ops"]:
            try:
                extra = memory.cuda_peak_extra(p, op)
            except Exception as exc:  # OOM, or a peer rejecting these inputs
                _log(f"  memory {name} C={c} {op}: skipped ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            finally:
                torch.cuda.empty_cache()
            rec.add(op, name, p.margin, dtype, b, c, d, "peak_extra_mem", extra, "bytes")
            rec.add(op, name, p.margin, dtype, b, c, d, "input_bytes", memory.input_bytes(p), "bytes")


def _cpu_jobs(usable: dict, cfg: dict, margin: str, dtype: str, b: int, s: float,
              per_process: bool, time_rounds: int) -> list:
    jobs = []
    # Candidate-major, C ascending: the worker warms each candidate up once per shape
    # (torch.compile: on every shape, so that no compilation is measured).
    for name, cand in usable.items():
        for c in sorted(cfg["Cs"]):
            if not _runs_here(name, torch.device("cpu"), c):
                continue
            for op in cfg["memory_ops"]:
                job = dict(candidate=name, margin=cand.margin_for(margin), m=None, s=s, B=b, C=c,
                           D=cfg["D"], dtype=dtype, op=op, seed=0)
                if time_rounds:
                    job["time_rounds"] = time_rounds
                if per_process:
                    job["warmup_C"] = 1 << 12
                # Otherwise a warm-up call at the same shape: the extension's first call
                # at a new C measured 65.6 MiB at 2^17 after warming up at 2^14, its
                # steady state (every later training step) 33.5 MiB.
                jobs.append(job)
    return jobs


def _record_cpu_result(rec, r: dict, dtype: str, b: int, d: int, timed: bool) -> None:
    name, c, op, mg = r["candidate"], r["C"], r["op"], r["margin"]
    if "skipped" in r:
        _log(f"  memory {name} C={c}: skipped ({r['skipped']})")
        return
    for metric in ("peak_extra", "input_bytes", "grad_bytes", "peak_rss"):
        if metric == "peak_extra" or r.get(metric):
            rec.add(op, name, mg, dtype, b, c, d, "peak_extra_mem" if metric == "peak_extra" else metric,
                    r[metric], "bytes")
    if timed and r.get("times"):
        # scale preset: timed in the worker (first call after a small warm-up included)
        st = timing.summary(r["times"])
        for k in ("median", "p20", "p80"):
            rec.add(op, name, mg, dtype, b, c, d, f"time_{k}", st[k], "s")
        rec.add(op, name, mg, dtype, b, c, d, "rounds", len(r["times"]), "count")


def memory_cpu(rec, usable: dict, cfg: dict, margin: str, dtype: str, b: int, s: float,
               per_process=False, time_rounds: int = 0) -> None:
    """Peak extra resident memory of every candidate at every C, in worker processes."""
    jobs = _cpu_jobs(usable, cfg, margin, dtype, b, s, per_process, time_rounds)
    for r in memory.run_cpu_jobs(jobs, per_process=per_process):
        _record_cpu_result(rec, r, dtype, b, cfg["D"], bool(time_rounds))


def memory_ratios(rec, device: torch.device) -> None:
    """Each peak extra memory over the naive loss's at the same shape and op (on the CPU
    only where the naive reading is above the resident-set resolution)."""
    for r in list(rec.get(metric="peak_extra_mem")):
        if r["backend"] == "naive":
            continue
        nv = rec.value(metric="peak_extra_mem", backend="naive", op=r["op"], B=r["B"], C=r["C"],
                       dtype=r["dtype"])
        if nv and (device.type == "cuda" or nv >= memory.CPU_RESOLUTION_BYTES):
            rec.add(r["op"], r["backend"], r["margin"], r["dtype"], r["B"], r["C"], r["D"],
                    "mem_ratio_vs_naive", r["value"] / nv, "x")


def margin_sweep(rec, usable: dict, cfg: dict, device: torch.device, margins: list,
                 dtype: str, s: float) -> None:
    """What each margin costs in the same kernel: fwd+bwd time per margin, per backend."""
    sw = cfg["sweep"]
    b, d, c = cfg["Bs"][0], cfg["D"], sw["C"]
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
