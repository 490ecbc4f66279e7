"""How to compile the fused CUTLASS kernels: sources, include directories, nvcc flags.

One description for every consumer: tests/test_cutlass_compile.py compiles each source
with it, and the optional build of the package takes the same lists. Plain Python with
no import of torch or of the package (setup.py loads this file by path).

CUTLASS's headers are a build-time requirement only, found in this order:
  1. ``$EXPFACE_CUTLASS_DIR``: a CUTLASS source tree or the wheel's ``source`` folder
     (a machine without network carries it with the working tree);
  2. the installed ``nvidia-cutlass`` wheel (pinned: CUTLASS_WHEEL), whose package
     ``cutlass_library`` holds the C++ headers under ``source/include`` and the
     utilities under ``source/tools/util/include``. Located with importlib's
     find_spec, without importing it (its __init__ needs none of its dependencies
     today, but nothing here should depend on that).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
"""The pinned wheel (6.4 MB, BSD-3-Clause; CUTLASS 4.2 C++ headers inside)."""

HERE = Path(__file__).resolve().parent

SOURCES = ("forward_sm90.cu", "recompute_sm90.cu", "dx_sm90.cu", "dw_sm90.cu")
"""One translation unit per kernel: each takes minutes and GBs of nvcc time, so that a
build with MAX_JOBS > 1 compiles them in parallel and a change recompiles one."""

GENCODE = "-gencode=arch=compute_90a,code=sm_90a"

NVCC_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", GENCODE)
"""Plain nvcc. wgmma and the TMA need the arch-specific target: sm_90a SASS and no PTX
(no other architecture could run it)."""

TORCH_NVCC_FLAGS = (
    "-O3",
    "-DNDEBUG",
    "--expt-relaxed-constexpr",
    # An -arch/-gencode flag among the extension's nvcc flags stops torch.utils.cpp_extension
    # from adding its own (TORCH_CUDA_ARCH_LIST's), so these units get sm_90a alone,
    # whatever the rest of the package is built for.
    GENCODE,
    # torch's extension flags define these to hide CUDA's half/bf16 operators; CUTLASS's
    # numeric types need them (the usual undo of CUTLASS-based torch extensions).
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
)
"""NVCC_FLAGS for a build through torch.utils.cpp_extension, without -std: torch adds its
own (a second -std is an nvcc error)."""


def _tree_include_dirs(root: Path) -> Optional[list[str]]:
    """[include, tools/util/include] under a CUTLASS tree ``root``, or None if absent."""
    inc, util = root / "include", root / "tools" / "util" / "include"
    if (inc / "cutlass" / "cutlass.h").is_file() and (util / "cutlass" / "util" / "packed_stride.hpp").is_file():
        return [str(inc), str(util)]
    return None


def cutlass_include_dirs() -> tuple[Optional[list[str]], str]:
    """(include directories, where they came from), or (None, why none were found)."""
    env = os.environ.get("EXPFACE_CUTLASS_DIR")
    if env:
        dirs = _tree_include_dirs(Path(env))
        if dirs is None:
            return None, (f"EXPFACE_CUTLASS_DIR={env} has no include/cutlass/cutlass.h and "
                          "tools/util/include/cutlass/util/packed_stride.hpp")
        return dirs, f"EXPFACE_CUTLASS_DIR={env}"
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None, f"no CUTLASS headers: pip install {CUTLASS_WHEEL}, or set EXPFACE_CUTLASS_DIR"
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    dirs = _tree_include_dirs(root)
    if dirs is None:
        return None, f"the installed cutlass_library has no C++ headers under {root}"
    return dirs, f"the nvidia-cutlass wheel at {root}"


def build_description() -> dict:
    """Everything a build needs: ``sources`` (absolute paths of the CUDA units),
    ``glue`` (the torch ops, C++), ``include_dirs`` (CUTLASS's and this folder),
    ``nvcc_flags`` (plain nvcc), ``torch_nvcc_flags`` (a build through
    torch.utils.cpp_extension), ``origin`` (where the headers came from)
    and ``missing`` (None, or why the kernels cannot be built here)."""
    dirs, origin = cutlass_include_dirs()
    return {
        "sources": [str(HERE / s) for s in SOURCES],
        "include_dirs": (dirs or []) + [str(HERE)],
        "glue": str(HERE / "ops_cutlass.cpp"),
        "nvcc_flags": list(NVCC_FLAGS),
        "torch_nvcc_flags": list(TORCH_NVCC_FLAGS),
        "origin": origin if dirs else None,
        "missing": None if dirs else origin,
    }
