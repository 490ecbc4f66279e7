"""Build of expface_kernels: the Python packages and the C++/CUDA extension ``expface_kernels._C``.

    pip install --no-build-isolation .      # builds _C against the torch installed here
    pip install --no-build-isolation -e .   # the same, editable (development)
    pip install .                           # Python package only when pip isolates the build
                                            # (no torch there); _C is compiled on first import

The extension must be compiled against the torch it will run with. pip's default build
isolation installs build requirements into a throw-away environment, which would mean
the newest torch from the registry rather than the user's (a CPU torch 2.13 user got an
_C linked against torch 2.14's libc10_cuda.so). So torch is no build requirement: where
torch is importable (no isolation), _C is built now; where it is not, the wheel carries
the sources (expface_kernels/csrc) and expface_kernels/extension_build.py compiles them
on first import, cached per torch version and GPU arch.

Knobs: TORCH_CUDA_ARCH_LIST (default: extension_build.DEFAULT_CUDA_ARCHS plus the visible
GPUs' archs), FORCE_CUDA=1 / 0 (force / skip the CUDA sources; default: compiled when a
CUDA toolkit and a CUDA build of torch are found), CUDA_HOME (default: asked of the nvcc
on PATH), MAX_JOBS (default 2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

if int(setuptools.__version__.split(".")[0]) < 77:
    # pyproject.toml's licence is a PEP 639 SPDX expression, which older setuptools reject
    # with a schema dump; pip's isolated builds get a new one from [build-system] anyway
    raise SystemExit(f"expface_kernels: building needs setuptools >= 77, found {setuptools.__version__}: "
                     "pip install -U 'setuptools>=77' wheel ninja")

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    # by path: the package itself cannot be imported while it is being built
    path = os.path.join(HERE, "expface_kernels", "extension_build.py")
    spec = importlib.util.spec_from_file_location("_expface_extension_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


eb = _load_build_module()


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the wheel as expface_kernels/csrc, for the first-use build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install finds csrc/ in the source tree
            return
        dst = os.path.join(self.build_lib, "expface_kernels", "csrc")
        shutil.copytree(os.path.join(HERE, "csrc"), dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extension_and_cmdclass():
    """(ext_modules, cmdclass entries) -- none when torch is not importable here."""
    if importlib.util.find_spec("torch") is None:
        print("expface_kernels: torch is not importable in this build environment (pip's build isolation, or "
              "no torch yet): installing the Python package; the C++/CUDA extension is compiled on first "
              "import. To build it now against your torch: pip install --no-build-isolation .")
        return [], {}
    home = eb.cuda_home()
    if home:
        # before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import
        os.environ["CUDA_HOME"] = home
    os.environ.setdefault("MAX_JOBS", "2")

    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if home:
        cpp_extension.CUDA_HOME = home  # in case torch resolved it before us
    with_cuda = eb.want_cuda(home, torch.version.cuda)
    arch_list = None
    if with_cuda:
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        arch_list = eb.resolve_arch_list(visible, first_use=False)
        eb.parse_arch_list(arch_list)  # a clear error for an unreadable list, before any compiling
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    record = eb.make_record(torch.__version__, torch.version.cuda, with_cuda, arch_list)

    class BuildExtensionWithRecord(BuildExtension):
        """Writes the build record beside _C -- also in the source tree for an editable or
        --inplace build (setuptools builds into build_lib, then copies only the .so)."""

        def run(self):
            self._to_source = bool(self.inplace)  # editable_mode sets inplace; run() clears it
            super().run()

        def build_extension(self, ext):
            super().build_extension(ext)
            eb.write_record(os.path.dirname(self.get_ext_fullpath(ext.name)), record)
            if self._to_source:
                eb.write_record(os.path.join(HERE, *ext.name.split(".")[:-1]), record)

    srcs = [os.path.relpath(p, HERE) for p in eb.sources(os.path.join(HERE, "csrc"), with_cuda)]
    cxx, link = list(eb.CXX_FLAGS), list(eb.LINK_FLAGS)
    if with_cuda:
        print(f"expface_kernels: building the CPU + CUDA extension against torch {torch.__version__} "
              f"(CUDA_HOME={home}, TORCH_CUDA_ARCH_LIST={arch_list})")
        ext = CUDAExtension("expface_kernels._C", srcs, define_macros=[eb.CUDA_DEFINE],
                            extra_compile_args={"cxx": cxx, "nvcc": list(eb.NVCC_FLAGS)}, extra_link_args=link)
    else:
        print(f"expface_kernels: building the CPU-only extension against torch {torch.__version__} "
              "(no CUDA toolkit or CPU torch, or FORCE_CUDA=0)")
        ext = CppExtension("expface_kernels._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtensionWithRecord.with_options(use_ninja=True)}


_ext_modules, _cmdclass = _extension_and_cmdclass()
setup(
    packages=["expface_kernels", "expface_kernels.triton_kernels"],
    # triton_kernels/ is installed as expface_kernels.triton_kernels, never as a top-level
    # package (PyPI has an unrelated `triton_kernels`).
    package_dir={"expface_kernels.triton_kernels": "triton_kernels"},
    ext_modules=_ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **_cmdclass},
    zip_safe=False,
)
