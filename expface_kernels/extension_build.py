"""How the C++/CUDA extension is built, recorded and loaded.

One description serves both ways of building it:

* at install time, by ``setup.py`` (``pip install --no-build-isolation .``: against the
  torch installed in the environment), which loads this file by path because the
  package cannot be imported while it is being built;
* on first import, by :func:`load` (after a plain ``pip install .``, whose isolated build
  environment has no torch to build against, or when the installed ``_C`` was built for
  another torch): ``torch.utils.cpp_extension.load`` compiles the same sources into a
  cache directory per torch version, CUDA version and GPU architecture list, under
  torch's own file lock, so that 8 ranks starting together build once.

Every build writes a record (:data:`RECORD_NAME`, JSON) beside the shared object: the
torch and CUDA versions it was built against and the CUDA architectures it carries.
:func:`load` reads it *before* loading the shared object -- an ``_C`` built against
another torch fails to load or, worse, loads with a mismatched ABI -- and the extension
uses its CUDA ops on a GPU only when :func:`code_runs_on` says the carried code runs
there.

This module imports nothing but the standard library at top level (setup.py loads it
in a build environment that may have no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from typing import Optional

RECORD_NAME = "_C.build.json"
"""The build record written beside the shared object."""

DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"
"""SASS for sm_80 (A100), sm_90 (H100/H200), sm_100 (B200) and sm_120 (RTX 50xx), plus
PTX of the newest, which the driver compiles for any later GPU. (Without PTX a GPU newer
than the newest SASS -- a B200 against an sm_80/sm_90 build -- finds no kernel at all.)"""

REBUILD_HINT = ("rebuild it against the running torch: `pip install --no-build-isolation .` from the "
                "source tree (TORCH_CUDA_ARCH_LIST selects the GPUs)")

# Sources relative to csrc/. -fopenmp: at::parallel_for is header-inline OpenMP in torch's
# CPU builds; without the flag the CPU epilogues silently ran on one thread (measured: 1
# and 2 threads equal); libgomp.so.1 then resolves to the one torch already loaded.
# -fno-trapping-math -fno-math-errno (torch's own flags): let GCC if-convert and vectorise
# the compares / selects of the CPU epilogue's exp (2.5x on that loop).
CPP_SOURCES = ("ops.cpp", "ek_driver.cpp", "ek_prologue.cpp", "cpu/epilogue_cpu.cpp", "cpu/prologue_cpu.cpp")
CUDA_SOURCES = ("cuda/ops_cuda.cpp", "cuda/epilogue_cuda.cu", "cuda/prologue_cuda.cu")
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno")
NVCC_FLAGS = ("-O3", "-lineinfo")
LINK_FLAGS = ("-fopenmp",)
CUDA_DEFINE = ("EK_WITH_CUDA", "1")

# torch.utils.cpp_extension's names for architecture families (the ones that still build
# with CUDA 12/13).
_NAMED_ARCHS = {"Turing": "7.5+PTX", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX"}


# ------------------------------------------------------------------ CUDA toolkit
def cuda_home() -> Optional[str]:
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, else asked of the nvcc on PATH.

    nvcc itself prints its root (``nvcc --dryrun`` shows ``#$ _HERE_=<root>/bin``): an
    nvcc that is a wrapper script (/usr/local/bin/nvcc -> exec .../cuda-X/bin/nvcc)
    makes torch.utils.cpp_extension guess the wrong root from its path.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                              text=True, timeout=120)
        m = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + "\n" + proc.stderr, re.MULTILINE)
        if m:
            return os.path.dirname(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def want_cuda(home: Optional[str], torch_cuda: Optional[str], gpu_visible: bool = True) -> bool:
    """Compile the CUDA sources? FORCE_CUDA=1 / 0 decide; else a toolkit, a CUDA torch
    and -- for a first-use build, which serves this machine only -- a visible GPU
    (without one the CUDA code could not run here, and its five targets take minutes)."""
    force = os.environ.get("FORCE_CUDA", "").strip()
    has_toolkit = bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc"))
    if force == "0":
        return False
    if force == "1":
        if not has_toolkit:
            raise RuntimeError(f"FORCE_CUDA=1 but no CUDA toolkit was found (CUDA_HOME={home!r} has no "
                               "bin/nvcc); set CUDA_HOME to the toolkit root")
        return True
    return has_toolkit and torch_cuda is not None and gpu_visible


# ------------------------------------------------------------------ architectures
def parse_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """TORCH_CUDA_ARCH_LIST -> (SASS targets, PTX targets), e.g. "9.0;12.0+PTX" ->
    (["9.0", "12.0"], ["12.0"]). Separators ";", "," or spaces; family names expand as
    torch.utils.cpp_extension expands them; "9.0a" stays arch-specific."""
    s = arch_list
    for name, archs in _NAMED_ARCHS.items():
        s = s.replace(name, archs)
    sass, ptx = [], []
    for a in re.split(r"[;,\s]+", s.strip()):
        if not a:
            continue
        base = a[:-4] if a.endswith("+PTX") else a
        if not re.fullmatch(r"\d+\.\d+[af]?", base):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {a!r} in {arch_list!r}")
        if base not in sass:
            sass.append(base)
        if a.endswith("+PTX") and base not in ptx:
            ptx.append(base)
    return sass, ptx


def _arch_tuple(a: str) -> tuple[int, int, str]:
    major, minor = a.split(".")
    suffix = minor[-1] if minor[-1] in "af" else ""
    return int(major), int(minor.rstrip("af")), suffix


def code_runs_on(capability: tuple[int, int], arch_list: str) -> bool:
    """Can a build for ``arch_list`` run on a GPU of this compute capability?

    SASS for sm_XY runs on X.Y' with Y' >= Y (same major: binary compatibility within a
    family); arch-specific SASS (sm_90a, sm_100a) only on its exact X.Y; PTX for
    compute_XY on any capability >= X.Y (the driver compiles it).
    """
    sass, ptx = parse_arch_list(arch_list)
    cap = tuple(capability)
    for a in sass:
        major, minor, suffix = _arch_tuple(a)
        if (suffix and cap == (major, minor)) or (not suffix and cap[0] == major and cap[1] >= minor):
            return True
    for a in ptx:
        major, minor, suffix = _arch_tuple(a)
        if not suffix and cap >= (major, minor):
            return True
    return False


def resolve_arch_list(visible: list[tuple[int, int]], first_use: bool) -> str:
    """The architectures to compile for.

    A builder's TORCH_CUDA_ARCH_LIST is kept as given. Otherwise an install-time build
    takes :data:`DEFAULT_CUDA_ARCHS` plus the arch of every visible GPU not among them;
    a first-use build takes only the visible GPUs' archs (their newest also as PTX), so
    that the first import compiles one target, not five (and the defaults where no GPU
    is visible, which only FORCE_CUDA=1 asks of a first-use build).
    """
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if explicit:
        return explicit
    own = sorted({f"{a}.{b}" for a, b in visible}, key=lambda a: _arch_tuple(a)[:2])
    if first_use and own:
        return ";".join(own[:-1] + [own[-1] + "+PTX"])
    sass, _ = parse_arch_list(DEFAULT_CUDA_ARCHS)
    extra = [a for a in own if a not in sass]
    return ";".join(extra + DEFAULT_CUDA_ARCHS.split(";"))


def fatbin_entries(path: str) -> list[tuple[str, int]]:
    """The CUDA code in a shared object's .nv_fatbin section: ("sass" | "ptx", sm) each.

    What ``cuobjdump --list-elf --list-ptx`` lists, read from the fatbin headers (magic
    0xBA55ED50, u16 version, u16 header size, u64 size; then entries: u16 kind -- 1 PTX,
    2 ELF --, u16, u32 header size, u64 payload size, ..., u32 arch at byte 28).
    """
    with open(path, "rb") as f:
        b = f.read()
    if b[:4] != b"\x7fELF" or b[4] != 2:
        raise ValueError(f"{path} is not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", b, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    names_off = secs[shstrndx][4]
    out = []
    for sec in secs:
        if b[names_off + sec[0]:b.index(b"\0", names_off + sec[0])] != b".nv_fatbin":
            continue
        pos, end = sec[4], sec[4] + sec[5]
        while pos + 16 <= end:
            magic, _, hsz, fsz = struct.unpack_from("<IHHQ", b, pos)
            if magic != 0xBA55ED50:
                pos += 8
                continue
            e = pos + hsz
            while e < pos + hsz + fsz:
                kind, _, ehsz, psz = struct.unpack_from("<HHIQ", b, e)
                if kind in (1, 2):
                    out.append(("ptx" if kind == 1 else "sass", struct.unpack_from("<I", b, e + 28)[0]))
                e += ehsz + psz
            pos += hsz + fsz
    return out


# ------------------------------------------------------------------ the build record
def make_record(torch_version: str, torch_cuda: Optional[str], with_cuda: bool,
                arch_list: Optional[str]) -> dict:
    return {"torch": torch_version, "torch_cuda": torch_cuda, "with_cuda": with_cuda,
            "cuda_archs": arch_list if with_cuda else None}


def write_record(directory: str, record: dict) -> None:
    with open(os.path.join(directory, RECORD_NAME), "w") as f:
        json.dump(record, f, indent=1)


def read_record(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, RECORD_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record_mismatch(record: Optional[dict], torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why a build with this record must not be loaded under the running torch (None: it may)."""
    if record is None:
        return f"it has no build record ({RECORD_NAME}), so which torch it was built against is unknown"
    if record.get("torch") != torch_version or record.get("torch_cuda") != torch_cuda:
        built = f"{record.get('torch')} (CUDA {record.get('torch_cuda')})"
        return f"it was built against torch {built}, running {torch_version} (CUDA {torch_cuda})"
    return None


# ------------------------------------------------------------------ sources
def csrc_dir(package_dir: str) -> Optional[str]:
    """csrc/ beside the package (a wheel carries it as expface_kernels/csrc) or above it
    (a source tree or an editable install)."""
    for cand in (os.path.join(package_dir, "csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(cand, CPP_SOURCES[0])):
            return cand
    return None


def sources(root: str, with_cuda: bool) -> list[str]:
    names = CPP_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [os.path.join(root, n) for n in names]


# ------------------------------------------------------------------ loading
def _cache_dir(torch_version: str, torch_cuda: Optional[str], arch_list: Optional[str]) -> str:
    base = os.environ.get("EXPFACE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "expface_kernels")
    archs = hashlib.sha1(arch_list.encode()).hexdigest()[:8] if arch_list else "cpu"
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(base, f"torch{torch_version}-cuda{torch_cuda or 'none'}-{archs}-{py}")


_FIRST_USE_NAME = "expface_kernels_C"


def _is_built(build_dir: str, root: str, srcs: list[str]) -> bool:
    """A first-use build already in the cache, newer than every source and header?
    (Then loading it prints nothing; ninja still checks it.)"""
    so = os.path.join(build_dir, _FIRST_USE_NAME + ".so")
    if not os.path.exists(so):
        return False
    inputs = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs] + srcs
    return os.path.getmtime(so) >= max(os.path.getmtime(p) for p in inputs)


def _first_use_build(package_dir: str, why: str):
    """Compile the extension for the running torch into the cache; returns (module, record)."""
    import torch
    from torch.utils import cpp_extension

    root = csrc_dir(package_dir)
    if root is None:
        raise ImportError(f"{why}; and the C++ sources (csrc/) are not installed, so it cannot be built here")
    home = cuda_home()
    n_gpus = torch.cuda.device_count()
    with_cuda = want_cuda(home, torch.version.cuda, gpu_visible=n_gpus > 0)
    arch_list = None
    if with_cuda:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        visible = [torch.cuda.get_device_capability(i) for i in range(n_gpus)]
        arch_list = resolve_arch_list(visible, first_use=True)
    build_dir = _cache_dir(torch.__version__, torch.version.cuda, arch_list)
    os.makedirs(build_dir, exist_ok=True)
    srcs = sources(root, with_cuda)
    if not _is_built(build_dir, root, srcs):
        print(f"expface_kernels: {why}: compiling the C++{'/CUDA' if with_cuda else ''} extension for torch "
              f"{torch.__version__} (once, 1-3 minutes) into {build_dir}", file=sys.stderr, flush=True)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    define = [f"-D{CUDA_DEFINE[0]}={CUDA_DEFINE[1]}"] if with_cuda else []
    try:
        module = cpp_extension.load(
            name=_FIRST_USE_NAME, sources=srcs, build_directory=build_dir, extra_cflags=list(CXX_FLAGS) + define,
            extra_cuda_cflags=list(NVCC_FLAGS) + define, extra_ldflags=list(LINK_FLAGS), with_cuda=with_cuda,
            verbose=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    record = make_record(torch.__version__, torch.version.cuda, with_cuda, arch_list)
    write_record(build_dir, record)
    return module, record


def load(package_dir: str):
    """The extension module for the running torch and its build record.

    The installed ``_C`` when its record matches the running torch; else (unless
    EXPFACE_BUILD_EXTENSION=0) a first-use build, cached. Raises ImportError with the
    reason and the fix, after one warning, when there is none.
    """
    import importlib
    import importlib.util

    import torch

    why = "the C++/CUDA extension is not built"
    spec = importlib.util.find_spec("expface_kernels._C")
    if spec is not None and spec.origin:
        record = read_record(os.path.dirname(spec.origin))
        mismatch = record_mismatch(record, torch.__version__, torch.version.cuda)
        if mismatch is None:
            return importlib.import_module("expface_kernels._C"), record
        why = f"the installed expface_kernels._C cannot be used: {mismatch}"
    try:
        if os.environ.get("EXPFACE_BUILD_EXTENSION", "").strip() == "0":
            raise ImportError(f"{why}; first-use builds are off (EXPFACE_BUILD_EXTENSION=0): {REBUILD_HINT}")
        return _first_use_build(package_dir, why)
    except Exception as exc:
        msg = str(exc) if isinstance(exc, ImportError) else (
            f"{why}, and compiling it failed ({type(exc).__name__}: {str(exc).strip()[-600:]}); needs a C++ "
            f"compiler, ninja, and for CUDA a toolkit matching torch's; {REBUILD_HINT}")
        warnings.warn(f"expface_kernels: the 'extension' backend is unavailable: {msg}", RuntimeWarning,
                      stacklevel=3)
        raise ImportError(msg) from exc
