#!/usr/bin/env bash
# Create .venv from the project's own files (idempotent: reinstalls only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; then
  echo "msbt needs Python 3.10-3.12 (TensorFlow 2.21 and Ray 2.60 wheels); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.msbt-installed 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$want" > .venv/.msbt-installed
fi
