#!/usr/bin/env bash
# Sets up and runs the main job: the quick benchmark on the default device (the GPU when
# there is one, else the CPU). Extra arguments go to `python -m bench.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m bench.run "$@"
