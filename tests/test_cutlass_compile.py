"""The fused CUTLASS kernels (csrc/cutlass/) compile for sm_90a with no register spills.

No GPU needed: nvcc compiles each translation unit with the build description of
csrc/cutlass/cutlass_build.py plus ``-Xptxas -v``, and every kernel entry in ptxas's
report must show 0 bytes of spill stores and loads, a 0-byte stack frame (a register
array indexed at run time lives in local memory: spill traffic by another name) and no
"Potential Performance Loss" advisory (C7515: serialised wgmma). Each unit takes 2-4 minutes and up to ~4 GB of
memory (2-core CPU, nvcc 13.0), so the units compile one at a time, and a report is kept
under $EXPFACE_CUTLASS_CACHE (default /tmp/expface-cutlass-compile), keyed by a hash of
the nvcc version, flags, the sources and every CUTLASS header: a second run of the
suite on unchanged inputs reads the report (CI compiles them once, in its pinned stack, into a fresh cache).

Skips, with the reason, where nvcc or CUTLASS's headers are absent -- unless
EXPFACE_REQUIRE_CUTLASS=1 (CI), where that is a failure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cutlass_build", ROOT / "csrc" / "cutlass" / "cutlass_build.py")
cutlass_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cutlass_build)

CACHE = Path(os.environ.get("EXPFACE_CUTLASS_CACHE", "/tmp/expface-cutlass-compile"))
REQUIRED = os.environ.get("EXPFACE_REQUIRE_CUTLASS") == "1"


def _unavailable() -> str | None:
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    return cutlass_build.build_description()["missing"]


def _skip_or_fail(why: str):
    if REQUIRED:
        pytest.fail(f"EXPFACE_REQUIRE_CUTLASS=1 but {why}")
    pytest.skip(why)


def ptxas_entries(log: str) -> list[dict]:
    """Per kernel entry of an ``nvcc -Xptxas -v`` log: name, stack frame and spill
    store/load bytes, registers, and the ptxas performance advisories (code, message)."""
    from expface_kernels.triton_kernels.compile_check import ptxas_advisories

    out = []
    for block in re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        out.append({"name": name,
                    "stack": int(spill.group(1)) if spill else -1,
                    "spill_stores": int(spill.group(2)) if spill else -1,
                    "spill_loads": int(spill.group(3)) if spill else -1,
                    "registers": int(regs.group(1)) if regs else -1,
                    "advisories": ptxas_advisories(block)})
    return out


def test_ptxas_entries_parser():
    """The parser reads what ptxas prints (nvcc 13.0, two entries, one spilling)."""
    log = ("ptxas info    : 11 bytes gmem\n"
           "ptxas info    : Compiling entry function '_Z1av' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1av\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 2 barriers\n"
           "ptxas info    : Compiling entry function '_Z1bv' for 'sm_90a'\n"
           "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to x in the function '_Z1bv'\n"
           "    8 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    a, b = ptxas_entries(log)
    assert a == {"name": "_Z1av", "stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 168,
                 "advisories": []}
    assert (b["stack"], b["spill_stores"], b["spill_loads"], b["registers"]) == (8, 24, 16, 255)
    assert b["advisories"] == [("C7515", "wgmma.mma_async instructions are serialized due to x")]


def test_build_description_reports_missing_headers(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPFACE_CUTLASS_DIR", str(tmp_path))
    desc = cutlass_build.build_description()
    assert desc["missing"] and "EXPFACE_CUTLASS_DIR" in desc["missing"]
    assert [Path(s).name for s in desc["sources"]] == list(cutlass_build.SOURCES)
    assert all(Path(s).is_file() for s in desc["sources"])
    # a tree with both header folders is taken
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    util = tmp_path / "tools" / "util" / "include" / "cutlass" / "util"
    util.mkdir(parents=True)
    (util / "packed_stride.hpp").write_text("")
    desc = cutlass_build.build_description()
    assert desc["missing"] is None
    assert desc["include_dirs"][:2] == [str(tmp_path / "include"), str(tmp_path / "tools/util/include")]


def test_backend_refuses_with_reasons():
    """Without the built ops (CPU CI) the cutlass backend runs nothing and says why; the
    other reasons name the argument at fault."""
    import torch

    from expface_kernels import cutlass_backend

    x = torch.zeros(2, 12, dtype=torch.float32)
    why = " / ".join(cutlass_backend.BACKEND.unsupported_reasons(x, x))
    if cutlass_backend.ops_missing():
        assert "EXPFACE_CUTLASS=1" in why
    assert "CUDA tensors only" in why
    assert "both be bfloat16 or both float16" in why and "torch.float32" in why
    assert "multiple of 8" in why and "12" in why
    ok = torch.zeros(2, 16, dtype=torch.bfloat16)
    assert "multiple of 8" not in " / ".join(cutlass_backend.BACKEND.unsupported_reasons(ok, ok))


def _input_hash(source: Path, flags: list[str], include_dirs: list[str]) -> str:
    h = hashlib.sha256()
    h.update(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.encode())
    h.update("\0".join(flags).encode())
    for d in include_dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file() and p.suffix in (".h", ".hpp", ".cuh", ".inl", ".cu"):
                h.update(str(p.relative_to(d)).encode())
                h.update(p.read_bytes())
    h.update(source.read_bytes())
    return h.hexdigest()[:24]


@pytest.mark.parametrize("source", cutlass_build.SOURCES)
def test_compiles_for_sm90a_without_spills(source, tmp_path):
    why = _unavailable()
    if why:
        _skip_or_fail(why)
    desc = cutlass_build.build_description()
    src = Path(next(s for s in desc["sources"] if s.endswith(source)))
    flags = desc["nvcc_flags"] + ["-Xptxas", "-v"]
    key = _input_hash(src, flags, desc["include_dirs"])
    report = CACHE / f"{src.stem}-{key}.log"
    if not report.is_file():
        cmd = (["nvcc", *flags, *[f"-I{d}" for d in desc["include_dirs"]], "-c", str(src),
                "-o", str(tmp_path / (src.stem + ".o"))])
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-6000:]}"
        CACHE.mkdir(parents=True, exist_ok=True)
        report.write_text(proc.stdout + proc.stderr + f"\n# compile seconds: {time.monotonic() - t0:.0f}\n")
    entries = ptxas_entries(report.read_text())
    # One kernel per element type (bf16, fp16).
    assert len(entries) == 2, [e["name"] for e in entries]
    assert {"bfloat16_t" in e["name"] for e in entries} == {True, False}
    for e in entries:
        assert (e["stack"], e["spill_stores"], e["spill_loads"]) == (0, 0, 0), e
        assert e["advisories"] == [], e
        assert 0 < e["registers"] <= 255, e
