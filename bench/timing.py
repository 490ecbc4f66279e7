"""Timing: alternating runs, median / p20 / p80, paired ratios.

All candidates at one shape are timed round-robin: round r runs every candidate once,
starting at a rotated position, so that slow drifts of the machine (thermal, other
processes on a shared 2-core box, page-cache state) hit every candidate alike and the
per-round ratio ``t_a[r] / t_b[r]`` compares runs that happened seconds apart. The
reported ratio is the median of those per-round ratios.

CPU: ``time.perf_counter`` around the call (the call is synchronous).
CUDA: a pair of device events around the call, read after a synchronize (no host
overhead in the number). :func:`do_bench` wraps ``triton.testing.do_bench`` for a
single callable when Triton is present (it also flushes L2 between runs).
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import numpy as np
import torch


def _time_once(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternating(calls: dict, rounds: int, warmup: int = 1, device="cpu", failures=None) -> dict:
    """Time every callable of ``calls`` ``rounds`` times, round-robin.

    Args:
        calls: name -> zero-argument callable (one full measured operation).
        rounds: measured rounds; warmup: unmeasured rounds first (compilation, lazy
            initialisation, first-touch page faults).
        failures: optional dict; a callable that raises during the warm-up (a peer that
            rejects these inputs) is dropped and its error stored there by name.
    Returns:
        name -> list of ``rounds`` seconds, index r = round r (paired across names).
    """
    device = torch.device(device)
    names = list(calls)
    out: dict = {}
    for r in range(-warmup, rounds):
        k = r % max(1, len(names))
        order = names[k:] + names[:k]
        for n in order:
            if n not in names:
                continue
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r < 0 and failures is not None:
                try:
                    _time_once(calls[n], device)
                except Exception as exc:  # noqa: BLE001 - reported, not swallowed
                    failures[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    names.remove(n)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                continue
            t = _time_once(calls[n], device)
            if r >= 0:
                out.setdefault(n, [0.0] * rounds)[r] = t
    return {n: out[n] for n in names if n in out} if rounds else {}


def summary(times) -> dict:
    """median, p20, p80 (seconds) of a list of times."""
    a = np.asarray(times, dtype=float)
    return {"median": float(np.median(a)), "p20": float(np.percentile(a, 20)),
            "p80": float(np.percentile(a, 80))}


def paired_ratio(a, b) -> float:
    """Median over rounds of ``a[r] / b[r]`` (both from :func:`alternating`)."""
    return float(np.median(np.asarray(a, dtype=float) / np.asarray(b, dtype=float)))


def device_ms(fn: Callable[[], None], cuda: bool, *, warmup_ms: int = 25, rep_ms: int = 100,
              grad_to_none=None) -> list[float]:
    """[median, p20, p80] of ``fn()`` in ms.

    CUDA: ``triton.testing.do_bench`` (device events, L2 flushed between runs; the
    tensors in ``grad_to_none`` get ``.grad = None`` before each run). Elsewhere -- the
    GPU scripts' CPU smoke runs, whose numbers mean nothing -- three perf_counter runs.
    """
    if cuda:
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8]))
    ts = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return [ts[1], ts[0], ts[2]]


def do_bench(fn: Callable[[], None], rep_ms: int = 200) -> dict:
    """``triton.testing.do_bench`` on CUDA: median/p20/p80 in seconds."""
    q = device_ms(fn, True, rep_ms=rep_ms)
    return {"median": q[0] / 1e3, "p20": q[1] / 1e3, "p80": q[2] / 1e3}
