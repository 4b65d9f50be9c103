#!/usr/bin/env bash
# The test suite: sets up ./.venv (see setup_env.sh), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@" tests
