"""The long-format results every benchmark part writes (DESIGN §6).

One CSV row per measurement, with the columns of :data:`CSV_COLUMNS`; the device, the
torch and Triton versions and the date are the same for every row of a run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform

import torch

CSV_COLUMNS = ["op", "backend", "margin", "dtype", "B", "C", "D", "metric", "value", "unit",
               "device", "torch", "triton", "date"]


def versions() -> dict:
    """``{"torch": ..., "triton": ...}`` ("none" when Triton is not installed)."""
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv}


def device_description(device: torch.device) -> str:
    """Human-readable device: GPU name, SM count; or CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"CUDA {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
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


class Recorder:
    """Collects CSV rows with the shared columns filled in."""

    def __init__(self, device: torch.device | str):
        self.rows = []
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.common = {"device": device_description(device), **versions(), "date": date}

    def add(self, op, backend, margin, dtype, b, c, d, metric, value, unit):
        self.rows.append({"op": op, "backend": backend, "margin": margin, "dtype": dtype, "B": b,
                          "C": c, "D": d, "metric": metric, "value": value, "unit": unit,
                          **self.common})

    def get(self, **kw):
        return [r for r in self.rows if all(r[k] == v for k, v in kw.items())]

    def value(self, **kw):
        got = self.get(**kw)
        return got[0]["value"] if got else None

    def header(self) -> str:
        """The first line of every Markdown report: device, versions, date."""
        c = self.common
        return f"Device: **{c['device']}** · torch {c['torch']} · triton {c['triton']} · {c['date']}"

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            wr.writeheader()
            wr.writerows(self.rows)
