"""The benchmark CLI (DESIGN §6): one entry point for every measurement.

    python -m bench.run [--device cpu|cuda] [--preset quick|full|gpu|scale] [--out DIR]
                        [--backends NAME ...] [--margins NAME ...] [--C N ...] [--B N ...]
                        [--D N] [--dtypes NAME ...] [--rounds N] [--errors] [--budget-s S]
                        [--no-memory] [--no-plots] [--no-sweep]
    python -m bench.run profile [--parts split variants capacity] ...   (bench/profile.py)
    python -m bench.run host [--device cpu|cuda] ...                    (bench/host_overhead.py)

The sweep: for each shape (dtype, B, C): forward (no_grad) and forward+backward time of
every candidate (alternating rounds; median, p20, p80), a single GEMM x̂·Wᵀ of the same
shape as the yardstick, with ``--errors`` the loss's error against float64, and peak
extra memory (bench/memory.py). Then the margin sweep: every margin through the same
backend at one shape. Writes ``OUT/results.csv`` (long format, one row per measurement)
and ``OUT/table.md`` (also printed) after every shape, and PNG plots at the end.

The presets:
    quick   the default without a GPU: B=256, D=512, C ∈ {2^14, 2^15, 2^17} (2^17 is the
            CPU acceptance shape), naive / chunked / extension / pml; margin sweep at
            2^14. 174-193 s on the 2-core CPU including the plots (2026-12-03; the
            C=2^17 timing rounds 87 s of the 193).
    full    C = 2^14 … 2^17 (CPU) or 2^14 … 2^20 (CUDA), more rounds, every peer.
    gpu     the default with a GPU: B=512, D=512, C = 2^20, 2^18, 2^16, 2^14 (largest
            first, so that a --budget-s cut keeps the large shapes), fp32 and bf16, every
            backend and peer except naive_compile (one compilation per shape; add it with
            --backends), errors against float64.
    scale   C = 2^22, D=512, B=256 on the CPU (chunked, extension): forward+backward,
            peak memory against the weights + their gradient; the naive loss's need is
            extrapolated from its measured bytes per class and never run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import cli, memory, peers, report, sweep
from .records import CSV_COLUMNS, Recorder  # noqa: F401  (CSV_COLUMNS: the CSV's columns)

PRESETS = {
    # quick: on the 2-core CPU one fwd+bwd round over naive/chunked/extension/pml at
    # C=2^17 takes ~6.6 s at load 1.4 (~15 s while other builds ran on the box); with 5
    # rounds there the preset took 125 s, hence 4. torch.compile is left to `full`:
    # compiling the naive loss's graphs for three shapes cost ~60 s of a loaded quick run.
    "quick": dict(device="cpu", Bs=[256], D=512, Cs=[1 << 14, 1 << 15, 1 << 17],
                  backends=["naive", "chunked", "extension", "pml"],
                  dtypes=["fp32"], rounds={}, default_rounds=4,
                  fwd_rounds={1 << 14: 3, 1 << 15: 3, 1 << 17: 3},
                  warmup=1, sweep=dict(C=1 << 14, backends=["chunked", "extension"], rounds=2),
                  memory_ops=["fwd+bwd"]),
    "full": dict(device="cpu", Bs=[256], D=512, Cs=[1 << k for k in range(14, 18)],
                 backends=["naive", "naive_compile", "reference", "chunked", "extension", "pml",
                           "torch_lce"],
                 dtypes=["fp32"], rounds={}, default_rounds=9, warmup=1, errors=True,
                 sweep=dict(C=1 << 17, backends=["chunked", "extension"], rounds=5),
                 memory_ops=["fwd+bwd", "fwd"]),
    "gpu": dict(device="cuda", Bs=[512], D=512, Cs=[1 << 14, 1 << 16, 1 << 18, 1 << 20],
                backends=["naive", "chunked", "triton", "extension", "pml", "torch_lce",
                          "liger", "cce"],
                dtypes=["fp32", "bf16"], rounds={}, default_rounds=20, warmup=3, errors=True,
                largest_first=True,
                sweep=dict(C=1 << 20, backends=["triton", "extension", "chunked"], rounds=10),
                memory_ops=["fwd+bwd", "fwd"]),
    "scale": dict(device="cpu", Bs=[256], D=512, Cs=[1 << 22], backends=["chunked", "extension"],
                  dtypes=["fp32"], rounds={}, default_rounds=1, warmup=0, sweep=None,
                  memory_ops=["fwd+bwd"]),
}

SUBCOMMANDS = {"profile": "bench.profile", "host": "bench.host_overhead"}


def default_device(preset: str | None) -> str:
    """The device when --device is not given: the gpu and scale presets' own (CUDA, the
    CPU), otherwise the GPU when there is one, else the CPU -- the README quickstart's
    "default device"."""
    if preset in ("gpu", "scale"):
        return PRESETS[preset]["device"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--B", type=cli.positive_int, nargs="+", default=None, help="batch sizes")
    ap.add_argument("--D", type=cli.positive_int, default=None)
    ap.add_argument("--dtypes", nargs="+", choices=list(memory.DTYPES), default=None,
                    help="input dtypes ('fp16-fp32': fp16 embeddings, fp32 weight)")
    ap.add_argument("--rounds", type=cli.positive_int, default=None, help="measured rounds at every C")
    ap.add_argument("--sweep-C", type=cli.positive_int, default=None,
                    help="class count of the margin sweep")
    ap.add_argument("--s", type=cli.positive_float, default=64.0)
    ap.add_argument("--errors", action="store_true",
                    help="also each loss's relative error against float64 (on in full and gpu)")
    ap.add_argument("--budget-s", type=cli.positive_float, default=None,
                    help="no new shape (or margin sweep) starts after this many seconds")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    return ap


def _apply_args(cfg: dict, args, preset: str, device: torch.device) -> None:
    if preset == "full" and device.type == "cuda":
        cfg["Cs"] = [1 << k for k in range(14, 21)]
        cfg["backends"] = cfg["backends"] + ["triton", "liger", "cce"]
    if args.C is not None:
        cfg["Cs"] = sorted(args.C)
    if args.B is not None:
        cfg["Bs"] = list(args.B)
    if args.D is not None:
        cfg["D"] = args.D
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
    cfg["errors"] = cfg.get("errors", False) or args.errors


def config(args) -> tuple:
    """(preset, device, cfg) from the arguments, or an error message."""
    device = torch.device(args.device or default_device(args.preset))
    preset = args.preset or ("gpu" if device.type == "cuda" else "quick")
    if preset == "scale" and device.type != "cpu":
        return "--preset scale is the CPU-RAM run (resident-set memory); use --preset gpu on CUDA"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available here"
    cfg = {**PRESETS[preset], "rounds": dict(PRESETS[preset]["rounds"])}
    if cfg["sweep"]:
        cfg["sweep"] = dict(cfg["sweep"])
    _apply_args(cfg, args, preset, device)
    return preset, device, cfg


def shapes(cfg: dict) -> list:
    """(dtype, B, C) in measuring order: C ascending per dtype, or (``largest_first``)
    C descending across dtypes and batch sizes."""
    if cfg.get("largest_first"):
        return [(dt, b, c) for c in sorted(cfg["Cs"], reverse=True) for dt in cfg["dtypes"] for b in cfg["Bs"]]
    return [(dt, b, c) for dt in cfg["dtypes"] for b in cfg["Bs"] for c in sorted(cfg["Cs"])]


class Run:
    """One sweep: the recorder, the output folder and the time budget."""

    def __init__(self, args, preset, device, cfg, command):
        self.args, self.preset, self.device, self.cfg, self.command = args, preset, device, cfg, command
        self.rec = Recorder(device)
        self.t0 = time.perf_counter()
        self.skipped_shapes: list = []
        self.out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", preset)
        os.makedirs(self.out_dir, exist_ok=True)

    def out_of_time(self) -> bool:
        b = self.args.budget_s
        return b is not None and time.perf_counter() - self.t0 > b

    def measure_shape(self, usable: dict, margin: str, shape: tuple) -> None:
        """Errors, times and (CUDA) memory of every candidate at one (dtype, B, C)."""
        dtype, b, c = shape
        full = (dtype, b, c, self.cfg["D"])
        x, w, y = memory.make_inputs(b, c, self.cfg["D"], dtype, self.device)
        prepared = sweep.prepare_all(usable, x, w, y, margin, self.args.s, self.device)
        if self.cfg["errors"]:
            sweep.loss_errors(self.rec, prepared, x, w, y, self.args.s, full)
        sweep.time_shape(self.rec, prepared, x, w, self.cfg, self.device, full)
        if self.device.type == "cuda" and not self.args.no_memory:
            sweep.memory_cuda_shape(self.rec, prepared, self.cfg, full)
        del x, w, y, prepared
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sweep.gemm_equivalents(self.rec, full)

    def write(self, text: str) -> None:
        self.rec.write_csv(os.path.join(self.out_dir, "results.csv"))
        with open(os.path.join(self.out_dir, "table.md"), "w") as f:
            f.write(text)

    def partial_report(self) -> None:
        """CSV and table so far: a run cut short still leaves the shapes it measured."""
        self.write(report.markdown(self.rec, self.cfg["D"], self.command, self.skipped_shapes))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sweep_all(run: Run, usable: dict, margins: list) -> None:
    """Every shape of the preset (budget allowing), the CPU memory, the margin sweep."""
    cfg, margin = run.cfg, margins[0]
    for shape in shapes(cfg):
        if run.out_of_time():
            run.skipped_shapes.append(shape)
            continue
        run.measure_shape(usable, margin, shape)
        run.partial_report()
    if run.device.type == "cpu" and not run.args.no_memory:
        t0 = time.perf_counter()
        for dtype in cfg["dtypes"]:
            for b in cfg["Bs"]:
                sweep.memory_cpu(run.rec, usable, cfg, margin, dtype, b, run.args.s)
        _log(f"  memory: {time.perf_counter() - t0:.1f} s")
    sweep.memory_ratios(run.rec, run.device)
    if cfg["sweep"] and len(margins) > 1 and not run.out_of_time():
        t0 = time.perf_counter()
        sweep.margin_sweep(run.rec, usable, cfg, run.device, margins, cfg["dtypes"][0], run.args.s)
        _log(f"  margin sweep: {time.perf_counter() - t0:.1f} s")


def scale_run(run: Run, usable: dict) -> str:
    cfg = run.cfg
    b, c = cfg["Bs"][0], cfg["Cs"][0]
    sweep.memory_cpu(run.rec, usable, cfg, "expface", "fp32", b, run.args.s, per_process=True,
                     time_rounds=cfg["default_rounds"])
    return report.scale_report(run.rec, b, c, cfg["D"], run.out_dir)


def finish(run: Run, text: str, skipped: dict, load: float) -> str:
    text += "\n" + report.acceptance(run.rec)
    if skipped:
        text += "\nSkipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()) + "\n"
    if not run.args.no_plots:
        from . import plots
        t0 = time.perf_counter()
        made = plots.make_all(run.rec.rows, run.out_dir, with_margins=(run.preset != "scale"))
        text += "\nPlots: " + ", ".join(os.path.basename(p) for p in made) + "\n"
        _log(f"  plots: {time.perf_counter() - t0:.1f} s")
    text += f"\nWall time: {time.perf_counter() - run.t0:.1f} s (load average at start {load:.1f})\n"
    run.write(text)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = parser().parse_args(argv)
    got = config(args)
    if isinstance(got, str):
        print(got, file=sys.stderr)
        return 2
    preset, device, cfg = got
    names = args.backends or cfg["backends"]
    margins = args.margins or (["expface"] if preset == "scale" else list(peers.ALL_MARGINS))
    usable, skipped = peers.resolve(names, device)
    for n, why in skipped.items():
        _log(f"skipped {n}: {why}")
    if cfg["sweep"]:
        cfg["sweep"]["backends"] = [n for n in cfg["sweep"]["backends"] if n in usable] or \
            [n for n in usable if n in peers.LIBRARY_BACKENDS][:1]
    run = Run(args, preset, device, cfg, "python -m bench.run " + " ".join(argv))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    _log(f"{run.rec.common['device']} | preset {preset} | candidates {list(usable)} | load avg {load:.1f}")
    if preset == "scale":
        text = scale_run(run, usable)
    else:
        sweep_all(run, usable, margins)
        text = report.markdown(run.rec, cfg["D"], run.command, run.skipped_shapes)
    text = finish(run, text, skipped, load)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
