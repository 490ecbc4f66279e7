"""How the extension is built, found and guarded (expface_kernels/extension_build.py).

On the CPU, with a mocked GPU (FakeTensorMode's CUDA tensors allocate nothing and need
no device) and a mocked build record: the CUDA ops are used only on GPUs whose arch the
build carries code for; otherwise the backend says why (the GPU, its capability, the
built archs, the rebuild command), ``auto`` picks another backend and the prologue runs
its PyTorch code. An ``_C`` built against another torch is not loaded.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import expface_kernels as ek
from expface_kernels import backends, extension_build as eb, prologue


# ------------------------------------------------------------------ architectures
@pytest.mark.parametrize("cap, archs, runs", [
    ((8, 0), eb.DEFAULT_CUDA_ARCHS, True),
    ((8, 6), eb.DEFAULT_CUDA_ARCHS, True),     # sm_80 SASS runs on the whole 8.x family
    ((8, 9), eb.DEFAULT_CUDA_ARCHS, True),
    ((9, 0), eb.DEFAULT_CUDA_ARCHS, True),
    ((10, 0), eb.DEFAULT_CUDA_ARCHS, True),    # B200
    ((10, 3), eb.DEFAULT_CUDA_ARCHS, True),
    ((12, 0), eb.DEFAULT_CUDA_ARCHS, True),    # RTX 50xx
    ((13, 0), eb.DEFAULT_CUDA_ARCHS, True),    # a later GPU: the driver compiles the PTX
    ((7, 5), eb.DEFAULT_CUDA_ARCHS, False),    # older than every target
    ((11, 0), eb.DEFAULT_CUDA_ARCHS, False),   # no 11.x SASS, PTX 12.0 is newer
    ((10, 0), "8.0;9.0", False),               # the old default: no PTX, no sm_100
    ((9, 0), "9.0a", True),
    ((10, 0), "9.0a+PTX", False),              # arch-specific code runs on its arch alone
    ((8, 9), "Ampere", True),
    ((9, 0), "8.0 8.6+PTX", True),
])
def test_code_runs_on(cap, archs, runs):
    assert eb.code_runs_on(cap, archs) is runs


def test_parse_arch_list_and_errors():
    assert eb.parse_arch_list(eb.DEFAULT_CUDA_ARCHS) == (["8.0", "9.0", "10.0", "12.0"], ["12.0"])
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        eb.parse_arch_list("8.0;sm_90")


def test_resolve_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert eb.resolve_arch_list([], first_use=False) == eb.DEFAULT_CUDA_ARCHS
    assert eb.resolve_arch_list([(9, 0)], first_use=False) == eb.DEFAULT_CUDA_ARCHS
    assert eb.resolve_arch_list([(8, 9)], first_use=False) == "8.9;" + eb.DEFAULT_CUDA_ARCHS
    assert eb.resolve_arch_list([(9, 0), (8, 0)], first_use=True) == "8.0;9.0+PTX"
    assert eb.resolve_arch_list([], first_use=True) == eb.DEFAULT_CUDA_ARCHS
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert eb.resolve_arch_list([(8, 9)], first_use=False) == "9.0"


# ------------------------------------------------------------------ the build record
def test_record_mismatch_names_both_versions():
    rec = eb.make_record("2.13.0+cpu", None, False, None)
    assert eb.record_mismatch(rec, "2.13.0+cpu", None) is None
    why = eb.record_mismatch(rec, "2.14.1+cu130", "13.0")
    assert "built against torch 2.13.0+cpu" in why and "running 2.14.1+cu130" in why
    assert "no build record" in eb.record_mismatch(None, "2.14.1", None)


def test_record_round_trip(tmp_path):
    rec = eb.make_record("2.15.0", "13.2", True, "9.0;12.0+PTX")
    eb.write_record(str(tmp_path), rec)
    assert eb.read_record(str(tmp_path)) == rec
    assert eb.read_record(str(tmp_path / "absent")) is None


def test_other_torch_is_not_loaded_and_says_why(monkeypatch):
    """A _C recorded for another torch: with first-use builds off, ImportError and one
    warning, both with "built against torch X, running Y" and the fix."""
    pkg = os.path.dirname(eb.__file__)
    if eb.csrc_dir(pkg) is None and not os.path.exists(os.path.join(pkg, eb.RECORD_NAME)):
        pytest.skip("no installed _C to mock")
    monkeypatch.setattr(eb, "read_record", lambda d: eb.make_record("2.11.0", "12.6", True, "9.0"))
    monkeypatch.setenv("EXPFACE_BUILD_EXTENSION", "0")
    with pytest.warns(RuntimeWarning, match="built against torch 2.11.0"):
        with pytest.raises(ImportError, match=r"built against torch 2\.11\.0 .*running") as exc:
            eb.load(pkg)
    assert "pip install --no-build-isolation" in str(exc.value)


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true", reason="only CI must have built the extension")
def test_ci_built_the_extension():
    """In CI every stack builds the extension: its tests must not skip for want of it."""
    assert ek.available_backends("cpu")["extension"] is None


# ------------------------------------------------------------------ the runtime guard
ext = pytest.importorskip("expface_kernels.extension", reason="expface_kernels._C not built")


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A CUDA build of _C for sm_80/sm_90, and cuda:0 of the capability set by the test."""
    def use(name, cap, archs="8.0;9.0"):
        monkeypatch.setattr(ext, "built_with_cuda", lambda: True)
        monkeypatch.setattr(ext, "BUILD_RECORD", eb.make_record(torch.__version__, "13.0", True, archs))
        monkeypatch.setattr(ext, "_device_info", lambda i: (name, cap))
        monkeypatch.setattr(ext, "_CUDA_REASONS", {})
        monkeypatch.setattr(prologue, "OPS_DEVICES", frozenset(("cpu", "cuda")))
    return use


def _pretend_cuda_is_available(monkeypatch):
    """For available_backends("cuda"), which asks torch.cuda.is_available() first. A fake
    CUDA tensor then wants a real CUDA context on torch <= 2.11 (fake_tensor's
    init_gpu_context, called when is_available() says True): made a no-op here."""
    import torch._subclasses.fake_tensor as fake_tensor
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None, raising=False)


@pytest.mark.parametrize("name, cap", [("NVIDIA B200", (10, 0)), ("NVIDIA GeForce RTX 2080", (7, 5))])
def test_gpu_without_code_is_not_used(mocked_gpu, monkeypatch, name, cap):
    mocked_gpu(name, cap)
    why = ext.cuda_unusable_reason(0)
    assert why and name in why and f"{cap[0]}.{cap[1]}" in why and "8.0;9.0" in why
    assert "pip install --no-build-isolation" in why
    with FakeTensorMode():
        x, w = torch.empty(4, 8, device="cuda"), torch.empty(10, 8, device="cuda")
        assert not prologue._use_ops(x)
        assert any(name in r for r in ext.unsupported_reasons(x, w))
        assert backends.select_backend("auto", x, w).name != "extension"
        with pytest.raises(RuntimeError, match="compute capability"):
            backends.select_backend("extension", x, w)
    # the prologue's margin step takes its PyTorch code (the op would find no kernel there)
    monkeypatch.setattr(prologue, "torch_target_terms", lambda *args: "the PyTorch code")
    from expface_kernels.margins import resolve_margin
    spec, m = resolve_margin("expface", None)
    with FakeTensorMode():
        c_t = torch.empty(4, device="cuda")
        assert prologue.target_terms(c_t, spec, m, 64.0, "exact") == "the PyTorch code"
    _pretend_cuda_is_available(monkeypatch)
    assert name in ek.available_backends("cuda")["extension"]


def test_gpu_with_code_is_used(mocked_gpu):
    mocked_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert ext.cuda_unusable_reason(0) is None
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda")
        assert prologue._use_ops(x)
        assert ext.unsupported_reasons(x, x) == []
        assert backends.select_backend("auto", x, x).name == "extension"


def test_later_gpu_runs_the_default_builds_ptx(mocked_gpu):
    mocked_gpu("a GPU of compute capability 13.0", (13, 0), archs=eb.DEFAULT_CUDA_ARCHS)
    assert ext.cuda_unusable_reason(0) is None


# ------------------------------------------------------------------ the first-use build
_FIRST_USE_SCRIPT = r"""
import importlib.util, math, os, sys
spec = importlib.util.spec_from_file_location("eb", sys.argv[1])
eb = importlib.util.module_from_spec(spec); spec.loader.exec_module(eb)
module, record = eb._first_use_build(os.path.dirname(sys.argv[1]), "a test")
import torch
assert record["torch"] == torch.__version__ and record["with_cuda"] is False, record
assert eb.read_record(sys.argv[2]) == record
c = torch.tensor([0.3, -0.2], dtype=torch.float64)
logit, factor = torch.ops.expface_kernels.margin_terms(c, 3, 0.7, 0.0, 0.0, 64.0, True)
want = [64.0 * math.cos(math.pi * (math.acos(v) / math.pi) ** 0.7) for v in c.tolist()]
assert max(abs(a - b) for a, b in zip(logit.tolist(), want)) < 1e-9, (logit, want)
print("first-use build OK:", module.__name__)
"""


@pytest.mark.skipif(os.environ.get("EXPFACE_TEST_FIRST_USE_BUILD") != "1",
                    reason="compiles the extension (1-3 min): set EXPFACE_TEST_FIRST_USE_BUILD=1 (CI's pinned stack does)")
def test_first_use_build_compiles_caches_and_loads(tmp_path):
    """What a plain `pip install .` relies on: the sources compile into the cache for the
    running torch, the record is written, the ops register and compute ExpFace's margin;
    a second load prints nothing (the cache is fresh)."""
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(eb.__file__), "extension_build.py")
    env = dict(os.environ, EXPFACE_CACHE_DIR=str(tmp_path), FORCE_CUDA="0")
    cache = os.path.join(str(tmp_path), os.path.basename(eb._cache_dir(torch.__version__, torch.version.cuda, None)))
    # FORCE_CUDA=0 builds no CUDA: the cache key's CUDA part is still torch's own version
    runs = [subprocess.run([sys.executable, "-c", _FIRST_USE_SCRIPT, src, cache], env=env, capture_output=True,
                           text=True, timeout=1200) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "first-use build OK" in r.stdout
    assert "compiling the C++ extension" in runs[0].stderr
    assert "compiling" not in runs[1].stderr
