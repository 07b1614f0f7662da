#!/usr/bin/env bash
# The CPU quickstart: installs what it needs, then synthetic task -> SFT -> ReFT PPO -> eval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec megatron-reft demo --out "${1:-runs/demo}" "${@:2}"
