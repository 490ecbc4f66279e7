"""Host-side cost of one loss call: dispatcher ops issued and microseconds per call.

    python bench/host_overhead.py [--device cpu|cuda] [--backends extension chunked] [--calls 2000]

At a tiny shape (B=8, C=64, D=16) the work is nothing and what is timed is the host
path: argument checks, the autograd.Function, every op's dispatch (and, on CUDA, its
launch). Each backend is run with the per-row work as extension ops
(expface_kernels/prologue.py) and as PyTorch ops (``prologue.USE_EXTENSION = False``).
On a GPU these are the microseconds the GPU waits through when the loss is not hidden
behind queued work. Printed as a Markdown table; numbers are for the device named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import expface_kernels as ek
from expface_kernels import backends, prologue

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import cli  # noqa: E402  (run as a script: bench/ is not a package on the path)


class CountOps(TorchDispatchMode):
    """Counts the dispatcher ops run inside the ``with`` block (``.n``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _us_per_call(fn, calls: int, sync) -> float:
    for _ in range(max(10, calls // 20)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=["extension", "chunked"],
                   choices=["auto", *backends.BACKEND_NAMES])
    p.add_argument("--calls", type=cli.positive_int, default=2000)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g).to(dev).requires_grad_()
    w = torch.randn(64, 16, generator=g).to(dev).requires_grad_()
    y = torch.randint(0, 64, (8,), generator=g).to(dev)

    def fwd(be):
        with torch.no_grad():
            ek.expface_loss(x, w, y, backend=be)

    def step(be):
        ek.expface_loss(x, w, y, backend=be).backward()

    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=8 C=64 D=16, ExpFace\n")
    print("| backend | per-row work | fwd ops | bwd ops | fwd µs (no grad) | fwd+bwd µs |")
    print("|---|---|---|---|---|---|")
    for be in args.backends:
        for use_ops in (True, False):
            prologue.USE_EXTENSION = use_ops
            try:
                with CountOps() as cf:
                    loss = ek.expface_loss(x, w, y, backend=be)
                with CountOps() as cb:
                    loss.backward()
                f = _us_per_call(lambda: fwd(be), args.calls, sync)
                fb = _us_per_call(lambda: step(be), args.calls, sync)
                how = "extension ops" if use_ops and dev.type in prologue.OPS_DEVICES else "PyTorch ops"
                print(f"| {be} | {how} | {cf.n} | {cb.n} | {f:.0f} | {fb:.0f} |")
            finally:
                prologue.USE_EXTENSION = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
