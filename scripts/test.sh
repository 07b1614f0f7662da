#!/usr/bin/env bash
# The test suite: installs what it needs, then runs every test (GPU-only tests skip on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec python -m pytest tests -q -p no:cacheprovider "$@"
