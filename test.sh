#!/usr/bin/env bash
# Runs hvkit's tests: installs what is missing first (./setup.sh --no-demo), then pytest.
# Extra arguments go to pytest, e.g. ./test.sh -k vm -x
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --no-demo
exec .venv/bin/python -m pytest -ra --durations=25 "$@"  # the 25 slowest: where CI time goes
