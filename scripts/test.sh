#!/usr/bin/env bash
# Set everything up and run the test suite. Idempotent.
#   bash scripts/test.sh                 # default suite: everything not marked `slow`
#   ESPER_TEST_MARKERS=slow bash scripts/test.sh   # the slow suites
#   bash scripts/test.sh tests/unit/kasmina -x     # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Urza's storage suite runs against a real PostgreSQL; this installs it once (apt) if missing.
bash scripts/ensure_postgres.sh
exec .venv/bin/python -m pytest -m "${ESPER_TEST_MARKERS:-not slow}" "$@"
