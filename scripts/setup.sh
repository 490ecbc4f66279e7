#!/usr/bin/env bash
# Installs the requirements and builds expface_kernels in place (C++ always; CUDA sources
# too when a CUDA toolkit is found -- setup.py finds it even behind an nvcc wrapper).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e .
