#!/usr/bin/env bash
# Sets up and runs the whole test suite (no GPU needed; GPU tests skip without one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q tests "$@"
