#!/usr/bin/env bash
# Sets up the environment of the `python` on PATH for the tests and the benchmark, and
# builds expface_kernels in place against its torch (C++ always; the CUDA kernels too
# when a CUDA toolkit and a CUDA build of torch are found).
#
# An installed torch is left as it is -- whatever version or build: it is pinned while
# the other requirements install. Only where no torch is installed does this install
# one: the version of CI's default stack (.ci/lock-pinned.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  pin=$(grep -E '^torch==' .ci/lock-pinned.txt)
  echo "setup: no torch in $(python -c 'import sys; print(sys.prefix)'): installing $pin"
  python -m pip install -q "$pin"
fi
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$keep"
python -m pip install -q -c "$keep" -r requirements.txt
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation --no-deps -e .
