#!/usr/bin/env bash
# Set up the environment, then run the whole test suite (what CI runs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup-env.sh")"
cd "$root"
exec "$venv/bin/python" -m pytest Testing -q "$@"
