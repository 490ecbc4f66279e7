"""Test set-up shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, so it must be set before any
test module (or torch.compile) imports triton: without a GPU the Triton kernels then
run in the CPU interpreter.

Global torch state: a test that changes a process-wide setting and leaves it changed
breaks later tests in ways that depend on the order and on pytest's version (a
monkeypatch of Inductor's config, undone by pytest 9.2 as a deletion, failed 35 later
tests). The session-wide fixture below fails the run if Inductor's config, the default
dtype or the autograd / deterministic switches differ at its end from its start.
"""

import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _global_torch_state() -> dict:
    import torch
    import torch._inductor.config as inductor_config

    return {
        "inductor_config": {k: repr(v) for k, v in inductor_config.get_config_copy().items()},
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
    }


@pytest.fixture(scope="session", autouse=True)
def global_torch_state_unchanged():
    before = _global_torch_state()
    yield
    after = _global_torch_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if "inductor_config" in changed:
        b, a = changed.pop("inductor_config")
        changed["inductor_config"] = {k: (b.get(k, "<absent>"), a.get(k, "<absent>"))
                                      for k in set(b) | set(a) if b.get(k, "<absent>") != a.get(k, "<absent>")}
    assert not changed, f"the tests left global torch state changed: {changed}"
