"""Test set-up shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, so it must be set before any
test module (or torch.compile) imports triton: without a GPU the Triton kernels then
run in the CPU interpreter.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
