"""PNG figures of a benchmark run and of the margins themselves.

* ``time_vs_C.png``        fwd+bwd (solid) and fwd (dashed) median time vs C, per
                           backend/peer, log-log, p20–p80 band; the device in the title.
* ``memory_vs_C.png``      peak extra memory (fwd+bwd) vs C per backend, log-log, with
                           the size of W for scale.
* ``margin_sweep.png``     fwd+bwd time of each margin through the same backend.
* ``margins_psi.png``      ψ(θ) over θ ∈ [0, π] for ExpFace m = 0.5, 0.7, 0.9, ArcFace,
                           CosFace, SphereFace and the plain cosine — the ExpFace
                           paper's figure of target similarity vs angle.
* ``margins_grad.png``     ∂z_y/∂c_y per unit s: the exact ψ'(c) (with the library's
                           θ clamp) and the straight-through 1, over θ ∈ [0, π].
* ``scale_memory.png``     (scale preset) peak memory vs weights + gradient.

Every margin curve comes from the library's own ``expface_kernels.margins``.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from expface_kernels.margins import MARGINS, THETA_EPS  # noqa: E402

from . import labels  # noqa: E402

STYLE = {"naive": ("tab:red", "o"), "naive_compile": ("tab:orange", "s"),
         "reference": ("tab:brown", "v"), "chunked": ("tab:blue", "D"),
         "extension": ("tab:green", "^"), "triton": ("tab:purple", "*"),
         "pml": ("tab:pink", "P"), "torch_lce": ("tab:gray", "X"),
         "liger": ("tab:olive", "<"), "cce": ("tab:cyan", ">"), "gemm": ("black", ".")}

MARGIN_CURVES = [
    ("expface", 0.5, "ExpFace m=0.5", "tab:blue", "-"),
    ("expface", 0.7, "ExpFace m=0.7", "tab:blue", "--"),
    ("expface", 0.9, "ExpFace m=0.9", "tab:blue", ":"),
    ("arcface", 0.5, "ArcFace m=0.5", "tab:red", "-"),
    ("cosface", 0.35, "CosFace m=0.35", "tab:green", "-"),
    ("sphereface", 1.7, "SphereFace m=1.7", "tab:purple", "-"),
    ("none", None, "cos θ (no margin)", "black", "-"),
]



def save(fig, path):
    """Lay out, write the PNG (110 dpi) and free the figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def _series(rows, op, metric, dtype, backend):
    pts = sorted((int(r["C"]), float(r["value"])) for r in rows
                 if r["op"] == op and r["metric"] == metric and r["dtype"] == dtype
                 and r["backend"] == backend)
    return [p[0] for p in pts], [p[1] for p in pts]


def _backends(rows, metric):
    out = []
    for r in rows:
        if r["metric"] == metric and r["op"] in ("fwd", "fwd+bwd") and r["backend"] not in out:
            out.append(r["backend"])
    return out


def _label(rows, backend):
    m = next((r["margin"] for r in rows if r["backend"] == backend and r["op"] == "fwd+bwd"), None)
    return f"{backend} ({m})" if m else backend


def _device(rows):
    return rows[0]["device"] if rows else ""


def _log2_ticks(ax, cs):
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs)
    ax.set_xticklabels([labels.class_count(c, tex=True) for c in cs])


def plot_time(rows, path, dtype):
    """Median time vs C (log-log): fwd+bwd solid with the p20–p80 band, fwd dashed."""
    fig, ax = plt.subplots(figsize=(10, 5))
    cs_all = set()
    for n in _backends(rows, "time_median"):
        color, marker = STYLE.get(n, ("black", "."))
        for op, ls in (("fwd+bwd", "-"), ("fwd", "--")):
            cs, ts = _series(rows, op, "time_median", dtype, n)
            if not cs:
                continue
            cs_all.update(cs)
            lab = _label(rows, n) + (" fwd+bwd" if op == "fwd+bwd" else " fwd") if n != "gemm" \
                else "one GEMM x̂·Wᵀ"
            ax.plot(cs, [t * 1e3 for t in ts], ls, color=color, marker=marker, label=lab)
            if op == "fwd+bwd":
                _, lo = _series(rows, op, "time_p20", dtype, n)
                _, hi = _series(rows, op, "time_p80", dtype, n)
                ax.fill_between(cs, [t * 1e3 for t in lo], [t * 1e3 for t in hi], color=color, alpha=0.15)
    if not cs_all:
        plt.close(fig)
        return None
    _log2_ticks(ax, sorted(cs_all))
    ax.set_yscale("log")
    b, d = rows[0]["B"], rows[0]["D"]
    ax.set_xlabel("classes C")
    ax.set_ylabel("median time [ms]")
    ax.set_title(f"Margin-softmax loss time, B={b}, D={d}, {dtype}\n{_device(rows)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no data hidden
    return save(fig, path)


def plot_memory(rows, path, dtype):
    """Peak extra memory of fwd+bwd vs C (log-log), with W's own size for scale."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    cs_all = set()
    for n in _backends(rows, "peak_extra_mem"):
        cs, ms = _series(rows, "fwd+bwd", "peak_extra_mem", dtype, n)
        if not cs:
            continue
        cs_all.update(cs)
        color, marker = STYLE.get(n, ("black", "."))
        ax.plot(cs, [max(v, 1) / 2**20 for v in ms], "-", color=color, marker=marker, label=_label(rows, n))
    if not cs_all:
        plt.close(fig)
        return None
    cs = sorted(cs_all)
    d = int(rows[0]["D"])
    item = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}.get(dtype, 4)  # W's element size
    ax.plot(cs, [c * d * item / 2**20 for c in cs], ":", color="gray", label="size of W (C·D)")
    _log2_ticks(ax, cs)
    ax.set_yscale("log")
    ax.set_xlabel("classes C")
    ax.set_ylabel("peak extra memory, fwd+bwd [MiB]\n(above inputs and their gradients)")
    ax.set_title(f"Peak extra memory, B={rows[0]['B']}, D={d}, {dtype}\n{_device(rows)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_margin_sweep(rows, path):
    """Grouped bars: fwd+bwd median time of each margin per backend."""
    sw = [r for r in rows if r["op"] == "margin_sweep" and r["metric"] == "time_median"]
    if not sw:
        return None
    backends = list(dict.fromkeys(r["backend"] for r in sw))
    margins = list(dict.fromkeys(r["margin"] for r in sw))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / len(backends)
    for i, n in enumerate(backends):
        vals, lo, hi = [], [], []
        for mg in margins:
            def g(metric):
                return next((float(r["value"]) for r in rows if r["op"] == "margin_sweep"
                             and r["backend"] == n and r["margin"] == mg and r["metric"] == metric), float("nan"))
            v = g("time_median")
            vals.append(v * 1e3)
            lo.append((v - g("time_p20")) * 1e3)
            hi.append((g("time_p80") - v) * 1e3)
        xs = [k + (i - (len(backends) - 1) / 2) * width for k in range(len(margins))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=n, color=STYLE.get(n, ("gray", ""))[0])
    ax.set_xticks(range(len(margins)))
    ax.set_xticklabels(margins)
    ax.set_ylabel("fwd+bwd median time [ms] (bars: p20–p80)")
    c = sw[0]["C"]
    ax.set_title(f"What each margin costs in the same kernel: B={sw[0]['B']}, C={labels.class_count(c)}, "
                 f"D={sw[0]['D']}, {sw[0]['dtype']}\n{_device(rows)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, path)


def _theta_grid(n=2001):
    return torch.linspace(0.0, math.pi, n, dtype=torch.float64)


def plot_margins_psi(path):
    """ψ(θ) of every margin, from the library's margins.py (float64)."""
    theta = _theta_grid()
    c = torch.cos(theta)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, m, lab, color, ls in MARGIN_CURVES:
        spec = MARGINS[name]
        mv = spec.default if m is None else m
        ax.plot(theta.numpy(), spec.psi(c, mv).numpy(), ls, color=color, label=lab)
    ax.set_xlim(0, math.pi)
    ax.set_xticks([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi])
    ax.set_xticklabels(["0", "π/4", "π/2", "3π/4", "π"])
    ax.set_xlabel("angle θ between embedding and its class centre")
    ax.set_ylabel("target similarity ψ(cos θ)  (logit / s)")
    ax.set_title("Target-logit curves: ExpFace cos(π(θ/π)^m) vs the classical margins", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_margins_grad(path):
    """∂z_y/∂c_y / s: exact ψ'(c) (library, θ clamped to [THETA_EPS, π−THETA_EPS]) and
    straight-through (1); right panel: |dψ/dθ|, the pull on the angle."""
    theta = _theta_grid()
    c = torch.cos(theta)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    a1.axhline(1.0, color="gray", lw=5, alpha=0.4, zorder=1, label="straight-through (every margin)")
    for name, m, lab, color, ls in MARGIN_CURVES:
        spec = MARGINS[name]
        mv = spec.default if m is None else m
        dp = spec.dpsi(c, mv)
        flat = spec.psi_theta is None  # cosface, none: ψ' = 1, the straight-through value
        a1.plot(theta.numpy(), dp.numpy(), ":" if flat else ls, color=color, zorder=2,
                lw=2 if flat else 1.5, label=lab + (" (exact = 1)" if flat else " (exact)"))
        # dψ/dθ = ψ'(c)·(−sin θ): the gradient on the angle itself
        a2.plot(theta.numpy(), (dp * torch.sin(theta)).numpy(), ls, color=color, label=lab)
    a1.set_yscale("symlog", linthresh=1.0)
    a1.set_ylabel("∂z_y/∂c_y per unit s  (ψ'(c))")
    a1.set_title(f"Gradient through the margin: exact (θ clamped at {THETA_EPS:g} rad) vs straight-through",
                 fontsize=9)
    a2.set_ylabel("−dψ/dθ  (pull on the target angle)")
    a2.set_title("The same gradient with respect to the angle θ", fontsize=9)
    for ax in (a1, a2):
        ax.set_xlim(0, math.pi)
        ax.set_xticks([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi])
        ax.set_xticklabels(["0", "π/4", "π/2", "3π/4", "π"])
        ax.set_xlabel("target angle θ")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    return save(fig, path)


def plot_scale(rows, path):
    """Scale preset: peak resident memory per backend against W + grad W."""
    rs = [r for r in rows if r["metric"] == "peak_rss" and r["op"] == "fwd+bwd"]
    est = [r for r in rows if r["metric"] == "est_peak_total_mem"]
    if not rs or not est:  # only the scale preset estimates the naive loss's need
        return None
    c, d = int(rs[0]["C"]), int(rs[0]["D"])
    names = [r["backend"] for r in rs] + [f"{r['backend']} (estimate, not run)" for r in est]
    vals = [float(r["value"]) / 2**30 for r in rs] + [float(r["value"]) / 2**30 for r in est]
    colors = [STYLE.get(r["backend"], ("gray", ""))[0] for r in rs] + ["tab:red"] * len(est)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bars = ax.bar(names, vals, color=colors, hatch=None)
    for b, r in zip(bars[len(rs):], est):
        b.set_hatch("//")
        b.set_alpha(0.5)
    wg = 2 * 4 * c * d / 2**30
    ax.axhline(wg, color="black", ls="--", label=f"W + grad W = {wg:.1f} GiB")
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        ax.axhline(ram, color="tab:red", ls=":", label=f"machine RAM = {ram:.1f} GiB")
    except (ValueError, OSError):
        pass
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak memory of the process [GiB]")
    ax.set_title(f"fwd+bwd at B={rs[0]['B']}, C={labels.class_count(c)}, D={d}, fp32\n{_device(rows)}", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def make_all(rows, out_dir, with_margins=True) -> list:
    """Every figure the rows allow; returns the written paths. The C curves are drawn
    for the first batch size measured (a run over several B would mix them)."""
    made = []
    timed = [r for r in rows if r["op"] in ("fwd", "fwd+bwd")]
    if timed:
        b0 = timed[0]["B"]
        rows = [r for r in rows if r["op"] not in ("fwd", "fwd+bwd") or r["B"] == b0]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows if r["op"] in ("fwd", "fwd+bwd")))
    if len({r["C"] for r in rows if r["op"] in ("fwd", "fwd+bwd")}) < 2:
        dtypes = []  # one class count (the scale preset): no curve to draw
    for dt in dtypes:
        sfx = "" if dt == dtypes[0] else f"_{dt}"
        made.append(plot_time(rows, os.path.join(out_dir, f"time_vs_C{sfx}.png"), dt))
        made.append(plot_memory(rows, os.path.join(out_dir, f"memory_vs_C{sfx}.png"), dt))
    made.append(plot_margin_sweep(rows, os.path.join(out_dir, "margin_sweep.png")))
    made.append(plot_scale(rows, os.path.join(out_dir, "scale_memory.png")))
    if with_margins:
        made.append(plot_margins_psi(os.path.join(out_dir, "margins_psi.png")))
        made.append(plot_margins_grad(os.path.join(out_dir, "margins_grad.png")))
    return [p for p in made if p]
