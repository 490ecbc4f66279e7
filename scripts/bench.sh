#!/usr/bin/env bash
# Sets up and runs the main job: the benchmark on the default device (the gpu preset when
# there is a GPU, else the quick CPU preset). Extra arguments go to `python -m bench.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m bench.run "$@"
