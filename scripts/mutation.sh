#!/usr/bin/env bash
# Mutation check (mutmut) of the safety-critical modules whose bugs are silent: Kasmina's slot
# forward/backward and blend backends, artifact verification and the kernel loader, the
# governor, auth scopes, the Oona publisher's dedup and drop counting. Prints the survival
# rate per module. On demand (it takes 30-60 min on 2 shared cores; see docs/MUTATION.md):
#   bash scripts/mutation.sh                    # every group
#   bash scripts/mutation.sh governor auth      # some groups
#   ESPER_MUTATION_JOBS=1 ESPER_MUTATION_GROUP_TIMEOUT_S=900 bash scripts/mutation.sh kasmina
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import mutmut" 2>/dev/null; then
  echo "mutmut is not installed: .venv/bin/python -m pip install -e '.[mutation]'" >&2
  exit 2
fi
exec .venv/bin/python scripts/mutation.py "$@"
