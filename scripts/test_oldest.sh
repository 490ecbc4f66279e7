#!/usr/bin/env bash
# Runs the whole test suite against the OLDEST supported stack, torch 2.11 + Triton 3.6:
# the versions preinstalled on the GPU machine (bench/gpu_check.sh builds and runs there).
# CI (.ci/run) runs it after scripts/test.sh, so that a break with those versions shows
# up here rather than in the few minutes of a GPU session. On 2026-12-02 it found one:
# torch 2.11's clamp passes the gradient at its bound, which made reference_loss's
# autograd NaN at c = ±1 (D = 1) where torch 2.14 gives 0 (see margins._theta).
#
# How: a virtual environment that sees the system's packages (pytest, hypothesis, ninja,
# pybind11, ... from scripts/setup.sh) but has its own torch, triton and numpy < 2.4
# (Triton < 3.7's interpreter fails with NumPy >= 2.4: backend.interpreter_numpy_conflict),
# and a copy of the working tree, so that the extension built against torch 2.11 does not
# replace the one built in place against the requirements' torch.
#
#   bash scripts/test_oldest.sh [pytest args]
#
# Knobs: EXPFACE_OLDEST_VENV (default /tmp/expface-oldest-venv; reused when present),
#        EXPFACE_OLDEST_PINS (default "torch==2.11.0 triton==3.6.0 numpy<2.4").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EXPFACE_OLDEST_VENV:-/tmp/expface-oldest-venv}
PINS=${EXPFACE_OLDEST_PINS:-"torch==2.11.0 triton==3.6.0 numpy<2.4"}
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
# shellcheck disable=SC2086  # PINS is a list of requirement specifiers
"$VENV/bin/python" -m pip install -q $PINS
"$VENV/bin/python" - <<'PY'
import numpy, torch, triton
print("oldest stack: torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)
PY
TREE=$(mktemp -d /tmp/expface-oldest-tree.XXXXXX)
trap 'rm -rf "$TREE"' EXIT
# tracked files and untracked ones git does not ignore (less any deleted here): the tree
# as it would be committed
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
  xargs -0 cp --parents -t "$TREE"
cd "$TREE"
MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
