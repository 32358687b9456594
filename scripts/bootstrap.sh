#!/usr/bin/env bash
# Create .venv from the project's own files (idempotent: reinstalls only when pyproject.toml changed).
# Quiet unless it fails: pip's output goes to .venv/bootstrap.log, which is printed when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; then
  echo "msbt needs Python 3.10-3.12 (TensorFlow 2.21 and Ray 2.60 wheels); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
log=.venv/bootstrap.log
# Run a set-up step with its output in the log; on failure show the log and stop.
quietly() {
  if ! "$@" >>"$log" 2>&1; then
    echo "set-up failed: $*" >&2
    echo "---- $log ----" >&2
    cat "$log" >&2
    exit 1
  fi
}
if [ ! -x .venv/bin/python ]; then
  mkdir -p .venv
  : >"$log"
  quietly "$PYTHON" -m venv .venv
fi
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.msbt-installed 2>/dev/null)" != "$want" ]; then
  : >"$log"
  echo "setting up .venv (first run, or pyproject.toml changed: a few minutes; log in $log)"
  quietly .venv/bin/python -m pip install --upgrade pip
  quietly .venv/bin/python -m pip install -e '.[test]'
  echo "$want" > .venv/.msbt-installed
fi
