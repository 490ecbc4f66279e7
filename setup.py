"""Build of expface_kernels: the Python packages and the C++/CUDA extension ``expface_kernels._C``.

    pip install --no-build-isolation -e .          # development (editable)
    pip install --no-build-isolation --no-deps .   # offline GPU machines

The CUDA sources (csrc/cuda) are compiled when a CUDA toolkit and a CUDA build of
torch are present, or when FORCE_CUDA=1; FORCE_CUDA=0 forces the CPU-only build.
Architectures: TORCH_CUDA_ARCH_LIST, default "8.0;9.0" (sm_80 and sm_90 SASS).
CUDA_HOME: taken from the environment; else derived from the nvcc on PATH by asking
nvcc itself (`nvcc --dryrun` prints `#$ _HERE_=<toolkit>/bin`), because an nvcc that is
a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) makes
torch.utils.cpp_extension guess the wrong root.  Parallel jobs: MAX_JOBS (default 2).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from setuptools import setup


def _cuda_home_from_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                              timeout=120)
        m = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + "\n" + proc.stderr, re.MULTILINE)
        if m:
            return os.path.dirname(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _resolve_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return _cuda_home_from_nvcc()


_cuda_home = _resolve_cuda_home()
if _cuda_home:
    # must happen before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if _cuda_home:
    cpp_extension.CUDA_HOME = _cuda_home  # in case torch resolved it before us


def _want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "").strip()
    has_toolkit = bool(_cuda_home) and os.path.isfile(os.path.join(_cuda_home, "bin", "nvcc"))
    if force == "0":
        return False
    if force == "1":
        if not has_toolkit:
            raise RuntimeError(
                f"FORCE_CUDA=1 but no CUDA toolkit was found (CUDA_HOME={_cuda_home!r} has no bin/nvcc); "
                "set CUDA_HOME to the toolkit root")
        return True
    return has_toolkit and torch.version.cuda is not None


HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    cpp = ["csrc/ops.cpp", "csrc/ek_driver.cpp", "csrc/ek_prologue.cpp", "csrc/cpu/epilogue_cpu.cpp",
           "csrc/cpu/prologue_cpu.cpp"]
    # -fopenmp: at::parallel_for is header-inline OpenMP in torch's CPU builds; without the
    # flag the CPU epilogues silently ran on one thread (measured: 1 and 2 threads equal).
    # libgomp.so.1 is then resolved to the one torch already loaded (same SONAME).
    # -fno-trapping-math -fno-math-errno (torch's own flags): let GCC if-convert and
    # vectorise the compares / selects of the CPU epilogue's exp (2.5x on that loop).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    link = ["-fopenmp"]
    if _want_cuda():
        print(f"expface_kernels: building CPU + CUDA extension (CUDA_HOME={_cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        return [CUDAExtension(
            "expface_kernels._C",
            cpp + ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/epilogue_cuda.cu", "csrc/cuda/prologue_cuda.cu"],
            define_macros=[("EK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )]
    print("expface_kernels: building the CPU-only extension (no CUDA toolkit / FORCE_CUDA=0)")
    return [CppExtension("expface_kernels._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


setup(
    packages=["expface_kernels", "expface_kernels.triton_kernels"],
    # triton_kernels/ is installed as expface_kernels.triton_kernels, never as a top-level
    # package (PyPI has an unrelated `triton_kernels`).
    package_dir={"expface_kernels.triton_kernels": "triton_kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
