"""The Markdown report of ``python -m bench.run``: one table per shape, the margin sweep,
the acceptance lines, and the scale run's memory estimate (written to ``table.md``)."""

from __future__ import annotations

import csv
import os

from . import labels

ACCEPT = {"B": 256, "C": 1 << 17, "D": 512, "margin": "expface", "dtype": "fp32"}
"""The CPU acceptance shape (ExpFace, fp32, forward+backward)."""


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def _shapes(rec) -> list:
    """(dtype, B, C) of every timed shape: dtypes in the order measured, then B and C ascending."""
    got = dict.fromkeys((r["dtype"], r["B"], r["C"]) for r in rec.rows if r["op"] in ("fwd", "fwd+bwd"))
    dtypes = list(dict.fromkeys(k[0] for k in got))
    return sorted(got, key=lambda k: (dtypes.index(k[0]), k[1], k[2]))


def _time_cell(v, op: str) -> str:
    med = v(op, "time_median")
    if med is None:
        return "–"
    return f"{labels.ms(med)} ({labels.ms(v(op, 'time_p20'))}–{labels.ms(v(op, 'time_p80'))})"


def _ratio(v, is_naive: bool, fmt: str) -> str:
    if v is None:
        return "1.00" if is_naive else "–"
    return format(v, fmt) + "x"


def _candidate_row(rec, n: str, dtype: str, b: int, c: int, with_err: bool) -> str:
    def v(op, metric):
        return rec.value(op=op, backend=n, B=b, C=c, dtype=dtype, metric=metric)
    margin = next(r["margin"] for r in rec.rows if r["backend"] == n and r["C"] == c and r["B"] == b)
    mem = v("fwd+bwd", "peak_extra_mem")
    ge = v("fwd+bwd", "gemm_equivalents")
    cells = [n, margin, _time_cell(v, "fwd"), _time_cell(v, "fwd+bwd"),
             _ratio(v("fwd+bwd", "time_ratio_vs_naive"), n == "naive", ".2f"),
             mib(mem) if mem is not None else "–",
             _ratio(v("fwd+bwd", "mem_ratio_vs_naive"), n == "naive" and bool(mem), ".3f"),
             f"{ge:.1f}" if ge else "–"]
    if with_err:
        err = v("fwd", "rel_err_vs_fp64")
        cells += [f"{err:.2e}" if err is not None else "–",
                  _ratio(v("fwd", "err_ratio_vs_naive"), n == "naive" and err is not None, ".2f")]
    return "| " + " | ".join(cells) + " |"


def shape_table(rec, dtype: str, b: int, c: int, d: int) -> list:
    """Lines of the table of one shape: every candidate, then the GEMM yardstick."""
    with_err = bool(rec.get(metric="rel_err_vs_fp64"))
    head = ("| backend | margin | fwd ms (p20–p80) | fwd+bwd ms (p20–p80) | fwd+bwd / naive "
            "| peak extra MiB (fwd+bwd) | memory / naive | GEMM equiv. (fwd+bwd) |")
    rule = "|---|---|---|---|---|---|---|---|"
    if with_err:
        head, rule = head + " loss rel. err | err / naive |", rule + "---|---|"
    lines = [f"**B={b}, C={labels.class_count(c)}, D={d}, {dtype}**", "", head, rule]
    names = list(dict.fromkeys(r["backend"] for r in rec.rows if r["C"] == c and r["B"] == b
                               and r["dtype"] == dtype and r["op"] in ("fwd", "fwd+bwd")))
    lines += [_candidate_row(rec, n, dtype, b, c, with_err) for n in names]
    tf = rec.value(op="fwd", backend="gemm", B=b, C=c, dtype=dtype, metric="tflops")
    if tf:
        lines.append(f"\ngemm: one x̂·Wᵀ of this shape, {tf:.3g} TFLOP/s; a forward+backward's "
                     "floor is 4 of them (3 with the fused forward).")
    return lines + [""]


def sweep_table(rec) -> list:
    sweep = rec.get(op="margin_sweep", metric="time_median")
    if not sweep:
        return []
    r0 = sweep[0]
    lines = [f"**Margin sweep: fwd+bwd, B={r0['B']}, C={labels.class_count(r0['C'])}, D={r0['D']}, "
             f"{r0['dtype']}**", "", "| backend | margin | ms (p20–p80) | / margin none |", "|---|---|---|---|"]
    for r in sweep:
        kw = dict(op="margin_sweep", backend=r["backend"], margin=r["margin"])
        ratio = rec.value(metric="time_ratio_vs_none", **kw)
        lines.append(f"| {r['backend']} | {r['margin']} | {labels.ms(r['value'])} "
                     f"({labels.ms(rec.value(metric='time_p20', **kw))}–"
                     f"{labels.ms(rec.value(metric='time_p80', **kw))}) | "
                     f"{f'{ratio:.2f}x' if ratio else '1.00'} |")
    return lines + [""]


def markdown(rec, d: int, command: str, skipped_shapes=()) -> str:
    """The Markdown summary: per (dtype, B, C) one table; then the margin sweep."""
    lines = [rec.header(), "", f"Command: `{command}`", ""]
    if rec.common["device"].startswith("CPU"):
        lines += ["CPU numbers (not GPU numbers).", ""]
    for dtype, b, c in _shapes(rec):
        lines += shape_table(rec, dtype, b, c, d)
    for dtype, b, c in skipped_shapes:
        lines += [f"B={b}, C={labels.class_count(c)}, {dtype}: not measured (time budget).", ""]
    return "\n".join(lines + sweep_table(rec))


def acceptance(rec) -> str:
    """The CPU acceptance lines, when the acceptance shape was measured."""
    a = ACCEPT
    kw = dict(op="fwd+bwd", B=a["B"], C=a["C"], D=a["D"], dtype=a["dtype"], margin=a["margin"])
    out = []
    for name, t_lim, m_lim in (("chunked", 1.0, 0.10), ("extension", 0.7, 0.05)):
        tr = rec.value(backend=name, metric="time_ratio_vs_naive", **kw)
        mr = rec.value(backend=name, metric="mem_ratio_vs_naive", **kw)
        if tr is None and mr is None:
            continue
        ok_t = tr is not None and tr <= t_lim
        ok_m = mr is not None and mr <= m_lim
        out.append(f"- {name} vs naive (ExpFace fp32 B=256 C=2^17 D=512 fwd+bwd, {rec.common['device']}): "
                   f"time {tr if tr is None else f'{tr:.2f}x'} (target <= {t_lim}x: {'PASS' if ok_t else 'FAIL'}), "
                   f"peak extra memory {mr if mr is None else f'{mr:.3f}x'} "
                   f"(target <= {m_lim:.2f}x: {'PASS' if ok_m else 'FAIL'})")
    return ("**CPU acceptance**\n\n" + "\n".join(out) + "\n") if out else ""


def _naive_bytes_per_class(out_dir: str, b: int, d: int):
    """Bytes per class of the naive loss's peak, from a quick run's CSV next to out_dir."""
    src = os.path.join(out_dir, "..", "quick", "results.csv")
    if not os.path.exists(src):
        return None
    with open(src) as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] == "naive" and r["op"] == "fwd+bwd"
                and r["metric"] == "peak_extra_mem" and int(r["B"]) == b and int(r["D"]) == d]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: int(r["C"]))
    c0, c1 = int(rows[0]["C"]), int(rows[-1]["C"])
    return (float(rows[-1]["value"]) - float(rows[0]["value"])) / (c1 - c0)


def scale_report(rec, b: int, c: int, d: int, out_dir: str) -> str:
    """The naive loss's memory need at the scale shape, from its measured bytes per class."""
    per_class = _naive_bytes_per_class(out_dir, b, d)
    how = "slope of the measured naive peak extra memory in bench/out/quick/results.csv"
    if per_class is None:
        # At its peak (F.normalize's backward over W) four fp32 (C, D) tensors are live
        # besides W and its gradient — ŵ, ∂L/∂ŵ and two temporaries; measured 1,025.6 MiB
        # at C=2^17, D=512 = 8,204 bytes per class ≈ 4·4·D.
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
             f"Weights {mib(4 * c * d)} MiB + their gradient {mib(4 * c * d)} MiB "
             f"(machine: {mib(avail)} MiB RAM).", "",
             "| backend | fwd+bwd s | peak extra MiB | peak total (RSS) MiB | peak total / (W + grad W) |",
             "|---|---|---|---|---|"]
    for r in rec.get(metric="peak_extra_mem", C=c, op="fwd+bwd"):
        n = r["backend"]
        t = rec.value(backend=n, C=c, op="fwd+bwd", metric="time_median")
        rss = rec.value(backend=n, C=c, op="fwd+bwd", metric="peak_rss")
        lines.append(f"| {n} | {t:.1f} | {mib(r['value'])} | {mib(rss)} | {rss / (8 * c * d):.3f} |")
    lines += ["", f"naive (not run): needs ~{mib(need_extra)} MiB extra + "
              f"{mib(2 * inputs)} MiB inputs and gradients = ~{need_total / 2**30:.1f} GiB "
              f"> {avail / 2**30:.1f} GiB RAM ({per_class:,.0f} bytes per class: {how}).", ""]
    return "\n".join(lines)
