"""Host-side cost of one loss call: dispatcher ops issued and microseconds per call.

    python -m bench.run host [--device cpu|cuda] [--backends extension chunked] [--calls 2000]
                             [--out DIR]

At a tiny shape (B=8, C=64, D=16) the work is nothing and what is timed is the host
path: argument checks, the autograd.Function, every op's dispatch (and, on CUDA, its
launch). Each backend is run with the per-row work as extension ops
(expface_kernels/prologue.py) and as PyTorch ops (``prologue.USE_EXTENSION = False``).
On a GPU these are the microseconds the GPU waits through when the loss is not hidden
behind queued work. Printed as a Markdown table; with ``--out`` also written to
``DIR/host_overhead.md`` and ``DIR/host_overhead.csv`` (long format).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import expface_kernels as ek
from expface_kernels import backends, prologue

from . import cli
from .records import Recorder

B, C, D = 8, 64, 16


class CountOps(TorchDispatchMode):
    """Counts the dispatcher ops run inside the ``with`` block (``.n``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_of_one_step(x, w, y, backend: str) -> tuple[int, int]:
    """(forward ops, backward ops) of one ExpFace loss step through ``backend``.

    x (B, D) requiring grad, w (C, D) requiring grad, y (B,) int. On a GPU each op is a
    kernel launch and its host-side dispatch. Leaves the gradients in x.grad, w.grad.
    """
    with CountOps() as fwd:
        loss = ek.expface_loss(x, w, y, backend=backend)
    with CountOps() as bwd:
        loss.backward()
    return fwd.n, bwd.n


def us_per_call(fn, calls: int, sync) -> float:
    """Mean wall microseconds of ``fn()`` over ``calls`` calls, after a warm-up."""
    for _ in range(max(10, calls // 20)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def tiny_inputs(dev: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(dev).requires_grad_()
    w = torch.randn(C, D, generator=g).to(dev).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g).to(dev)
    return x, w, y


def measure(be: str, use_ops: bool, inputs, calls: int, sync) -> dict:
    """Ops and µs of one call of ``be`` with the per-row work as extension or PyTorch ops."""
    x, w, y = inputs
    prologue.USE_EXTENSION = use_ops
    try:
        f_ops, b_ops = ops_of_one_step(x, w, y, be)

        def fwd():
            with torch.no_grad():
                ek.expface_loss(x, w, y, backend=be)

        def step():
            ek.expface_loss(x, w, y, backend=be).backward()
        return {"fwd_ops": f_ops, "bwd_ops": b_ops, "fwd_us": us_per_call(fwd, calls, sync),
                "step_us": us_per_call(step, calls, sync)}
    finally:
        prologue.USE_EXTENSION = True


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run host", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=["extension", "chunked"],
                   choices=["auto", *backends.BACKEND_NAMES])
    p.add_argument("--calls", type=cli.positive_int, default=2000)
    p.add_argument("--out", default=None, help="also write host_overhead.md / .csv here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    return args


def _record(rec: Recorder, label: str, got: dict) -> None:
    for op, metric, key, unit, scale in (
            ("fwd", "dispatch_ops", "fwd_ops", "count", 1), ("bwd", "dispatch_ops", "bwd_ops", "count", 1),
            ("fwd", "host_time", "fwd_us", "s", 1e-6), ("fwd+bwd", "host_time", "step_us", "s", 1e-6)):
        rec.add(op, label, "expface", "fp32", B, C, D, metric, got[key] * scale, unit)


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    inputs = tiny_inputs(dev)
    rec = Recorder(dev)
    lines = [rec.header(), "", f"{torch.get_num_threads()} threads, B={B} C={C} D={D}, ExpFace, fp32", "",
             "| backend | per-row work | fwd ops | bwd ops | fwd µs (no grad) | fwd+bwd µs |",
             "|---|---|---|---|---|---|"]
    for be in args.backends:
        for use_ops in (True, False):
            got = measure(be, use_ops, inputs, args.calls, sync)
            how = "extension ops" if use_ops and dev.type in prologue.OPS_DEVICES else "PyTorch ops"
            lines.append(f"| {be} | {how} | {got['fwd_ops']} | {got['bwd_ops']} | "
                         f"{got['fwd_us']:.0f} | {got['step_us']:.0f} |")
            _record(rec, f"{be} ({how})", got)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        rec.write_csv(os.path.join(args.out, "host_overhead.csv"))
        with open(os.path.join(args.out, "host_overhead.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
