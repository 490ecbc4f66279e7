"""Peak EXTRA memory of one loss call: the peak above the inputs and the two gradients.

    extra = peak(bytes in use during the call) − bytes in use before it − bytes(x.grad, W.grad)

so that a loss that writes its gradients straight into the result buffers and holds
nothing else scores ~0, and one that materialises B×C logits scores its temporaries.
Each measurement follows one warm-up call at the same shape (lazy initialisation, the
BLAS's buffers, torch.compile's graph: steady-state training memory, not first-call).

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching
allocator's count of live tensor bytes), in the benchmark process.

CPU — why the resident set, in a separate worker process:
    torch has no CPU counterpart of ``max_memory_allocated``, and its profiler's memory
    events proved unusable here (torch 2.14.1: the allocation events were missing, only
    the frees came back, and recording cost seconds). A dispatch-mode tensor tracker
    would not see the temporaries that a C++ extension allocates inside its op, nor the
    BLAS's workspaces. The kernel's own count sees everything: Linux keeps the resident
    set's high-water mark (``VmHWM`` in ``/proc/self/status``) and resets it to the
    current value on ``echo 5 > /proc/self/clear_refs`` (Linux ≥ 4.0). So:
    reset → read ``VmRSS`` (baseline) → run → read ``VmHWM`` (peak).
    For the count to follow the tensors, freed memory must leave the process: the
    worker runs with ``MALLOC_MMAP_THRESHOLD_=65536``, which puts every allocation of
    64 KiB or more in its own mmap, returned to the kernel on free (glibc's default
    raises that threshold up to 32 MiB at run time, after which freed 8 MiB tiles would
    stay resident and be reused invisibly). Checked here: allocate a, b (n floats
    each), free a, allocate 2n, free all → measured peak / (3n·4 bytes) = 0.99–1.00 for
    n from 2^18 to 2^24. That malloc setting changes timings (page faults on every
    large allocation), so the worker only measures memory, in its own process: the
    timings come from the benchmark process with the default allocator; only the
    ``scale`` preset times inside the worker (one process per backend, so that no two
    processes hold 8 GiB of weights at once).

Usage as a worker: ``python -m bench.memory`` reads a JSON list of jobs on stdin and
writes one JSON result per line on stdout (see :func:`run_job`).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
# Below this a CPU reading is noise, not a figure to divide by: blocks under the 64 KiB
# mmap threshold come from the heap, which may be resident already, and the resident set
# moves in 4 KiB pages. At B=8, C=1000, D=16 every candidate read between -0.1 and
# +0.05 MiB, and a ratio to the naive loss's reading came out as -2.2x.
CPU_RESOLUTION_BYTES = 1 << 20

DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp16": (torch.float16, torch.float16), "fp64": (torch.float64, torch.float64),
          # fp16 embeddings with an fp32 weight: the common face-recognition set-up
          "fp16-fp32": (torch.float16, torch.float32)}
"""Input dtypes by name: (x's dtype, W's dtype)."""


def make_inputs(b: int, c: int, d: int, dtype: str = "fp32", device="cpu", seed: int = 0):
    """Embeddings (B, D), centres (C, D) — both requiring grad — and labels (B,) int64.

    ``dtype`` names an entry of :data:`DTYPES` (x's and W's dtypes). Random Gaussian
    data: target cosines near 0, angles near π/2, where every margin is smooth (the
    exact gradients are finite for all of them).
    """
    # drawn on the device itself: at C = 2^20 a CPU draw and copy cost seconds per shape
    g = torch.Generator(device=device).manual_seed(seed)
    x_dt, w_dt = DTYPES[dtype]
    x = torch.randn(b, d, generator=g, device=device).to(x_dt).requires_grad_(True)
    w = torch.empty(c, d, dtype=w_dt, device=device)
    step = 1 << 18  # fill in slices: no fp32 temporary of W's size for bf16/fp16
    for i in range(0, c, step):
        n = min(step, c - i)
        w[i:i + n] = torch.randn(n, d, generator=g, device=device).to(w_dt)
    w.requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g, device=device)
    return x, w, y


def run_op(prepared, op: str) -> None:
    """One measured operation: ``fwd`` (no_grad forward) or ``fwd+bwd`` (grads reset)."""
    if op == "fwd":
        with torch.no_grad():
            prepared.loss_fn()
        return
    for t in prepared.leaves:
        t.grad = None
    prepared.loss_fn().backward()


def grad_bytes(prepared) -> int:
    return sum(t.grad.nbytes for t in prepared.leaves if t.grad is not None)


def input_bytes(prepared) -> int:
    return sum(t.nbytes for t in prepared.leaves)


# --- CUDA: in-process ----------------------------------------------------------------

def cuda_peak_extra_of(fn, keep_bytes: int = 0) -> int:
    """Peak bytes allocated on CUDA during ``fn()`` above those in use before it, minus
    ``keep_bytes`` (what the call leaves behind on purpose: the gradients)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base - keep_bytes)


def cuda_peak_extra(prepared, op: str) -> int:
    """Peak extra bytes of one call (after one warm-up call) on CUDA."""
    run_op(prepared, op)
    for t in prepared.leaves:
        t.grad = None
    extra = cuda_peak_extra_of(lambda: run_op(prepared, op), grad_bytes(prepared) if op != "fwd" else 0)
    for t in prepared.leaves:
        t.grad = None
    return extra


# --- CPU: the resident-set worker ------------------------------------------------------

def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_job(job: dict) -> dict:
    """Measure one job in this process (the worker side).

    job keys: candidate, margin, m, s, B, C, D, dtype, op, seed; optional
    ``warmup_C`` (absent: warm up on the same shape; N: on N classes instead — the
    scale preset, where a second full-size call would double the run time; 0: no
    warm-up, the previous job of the same candidate in this worker warmed it up) and
    ``time_rounds`` (also time that many measured calls; the first one's peak is the
    memory figure).
    Returns job + peak_extra, base_rss, peak_rss, grad_bytes, input_bytes, times.
    """
    from . import peers

    usable, skipped = peers.resolve([job["candidate"]], "cpu")
    if job["candidate"] in skipped:
        return {**job, "skipped": skipped[job["candidate"]]}
    cand = usable[job["candidate"]]
    b, c, d = job["B"], job["C"], job["D"]
    wc = job.get("warmup_C")
    if wc == 0:
        pass  # warmed up by the previous job of this candidate in this worker
    elif wc:
        x, w, y = make_inputs(b, wc, d, job["dtype"], seed=job.get("seed", 0))
        run_op(cand.prepare(x, w, y, job["margin"], job["m"], job["s"]), job["op"])
        del x, w, y
    x, w, y = make_inputs(b, c, d, job["dtype"], seed=job.get("seed", 0))
    prepared = cand.prepare(x, w, y, job["margin"], job["m"], job["s"])
    if wc is None:
        run_op(prepared, job["op"])
    times, res = [], {}
    for r in range(max(1, job.get("time_rounds", 1))):
        for t in prepared.leaves:
            t.grad = None
        gc.collect()
        _reset_hwm()
        base = _status()["VmRSS"]
        t0 = time.perf_counter()
        run_op(prepared, job["op"])
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak = _status()["VmHWM"]
            gb = grad_bytes(prepared) if job["op"] != "fwd" else 0
            # Negative when the gradients took heap memory that was resident before the
            # call (small shapes): nothing extra is measurable then, hence 0.
            res = {"peak_extra": max(0, peak - base - gb), "base_rss": base, "peak_rss": peak,
                   "grad_bytes": gb, "input_bytes": input_bytes(prepared)}
    return {**job, **res, "times": times}


def run_cpu_jobs(jobs: list, per_process: bool = False, timeout: float | None = None) -> list:
    """Run jobs in worker subprocesses (``python -m bench.memory``) with MALLOC_ENV.

    One worker for all jobs, or one per job with ``per_process``. A worker that dies
    (e.g. killed for memory) yields ``{"skipped": reason}`` for its jobs.
    """
    env = {**os.environ, **MALLOC_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    groups = [[j] for j in jobs] if per_process else [jobs]
    results = []
    for group in groups:
        if not group:
            continue
        proc = subprocess.run([sys.executable, "-m", "bench.memory"], input=json.dumps(group),
                              capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
        got = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                got.append(json.loads(line))
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            why = f"memory worker exited with {proc.returncode}: {' | '.join(tail)}"
            got += [{**j, "skipped": why} for j in group[len(got):]]
        results += got
    return results


def main() -> None:
    jobs = json.load(sys.stdin)
    for job in jobs:
        try:
            res = run_job(job)
        except Exception as exc:  # report, go on with the next job
            res = {**job, "skipped": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(res), flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
