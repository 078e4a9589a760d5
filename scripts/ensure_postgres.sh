#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl, postgres) available for Urza's
# storage tests. Idempotent: does nothing when they are already there.
#   bash scripts/ensure_postgres.sh        # prints the bin dir it found or installed
# Installs with apt (postgresql-15 where the distro has it, else the distro default)
# and needs root; the test fixture runs the server as the `postgres` OS user.
set -euo pipefail

find_bindir() {
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  # Debian/Ubuntu keep the server binaries off PATH, one dir per major version.
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/pg_ctl" && -x "$d/initdb" ]]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

if bindir="$(find_bindir)"; then
  echo "$bindir"
  exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
  echo "ensure_postgres: PostgreSQL is not installed and installing it needs root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_postgres: PostgreSQL is not installed and there is no apt-get here;" \
       "install the PostgreSQL server (initdb, pg_ctl) by hand" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
if apt-cache show postgresql-15 >/dev/null 2>&1; then
  pkg=postgresql-15
else
  pkg=postgresql
fi
# The package's own cluster is not used: tests start throwaway servers in tmp dirs.
apt-get install -y -qq --no-install-recommends "$pkg" >&2

if ! bindir="$(find_bindir)"; then
  echo "ensure_postgres: installed $pkg but found no pg_ctl/initdb" >&2
  exit 1
fi
echo "$bindir"
