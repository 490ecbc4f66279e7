"""Optional run-time autotuning of the launch configs (off by default).

    EXPFACE_TRITON_AUTOTUNE=1   on CUDA tensors, the first call of each (device, shape
                                bucket, dtypes) times every candidate of
                                configs.forward_candidates / grads_candidates on the
                                real inputs and keeps the fastest for the process.

Off by default because the first call then compiles and times ~6 kernels variants per
primitive (tens of seconds), and the choice may differ between runs (timing noise) --
which changes rounding. With it off, configs.py's static heuristics are used.
Both primitives are side-effect free (they return new tensors), so running a candidate
on the real inputs is harmless; a candidate that fails (e.g. too much shared memory on
this GPU) is skipped.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

_CACHE: dict = {}


def enabled(device: torch.device) -> bool:
    """True when autotuning is asked for and the tensors are on a GPU (never interpreted)."""
    flag = os.environ.get("EXPFACE_TRITON_AUTOTUNE", "0") not in ("", "0")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return flag and device.type == "cuda" and not interp


def _bucket(n: int) -> int:
    """Shapes within a factor of two share a tuning result."""
    return max(0, int(n) - 1).bit_length()


def key(kind: str, device: torch.device, B: int, C: int, D: int, *dtypes) -> tuple:
    return (kind, device.index, _bucket(B), _bucket(C), D, *map(str, dtypes))


def _time_ms(run: Callable[[], object]) -> float:
    """Median ms of ``run`` (triton.testing.do_bench: warm-up, L2 flush, CUDA events).

    Why a host-level tuner and not ``triton.autotune``: a candidate is a whole launch
    plan (class splits, chunk sizes, persistent or not) spanning several kernels and
    host-side buffer sizes, not one kernel's meta-parameters.
    """
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median"))


def pick(k: tuple, candidates: Sequence, run: Callable[[object], object],
         timer: Callable[[Callable[[], object]], float] = _time_ms):
    """The fastest candidate for key ``k`` (cached); ``run(cfg)`` executes one call."""
    if k in _CACHE:
        return _CACHE[k]
    best, best_t = candidates[0], float("inf")
    for cfg in candidates:
        try:
            t = timer(lambda: run(cfg))
        except Exception:  # out of resources on this GPU, etc.: not a candidate
            continue
        if t < best_t:
            best, best_t = cfg, t
    _CACHE[k] = best
    return best
