#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. `-m "not ray"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Two test processes (pytest-xdist; tests/conftest.py hands each a whole file): the suite is mostly CPU work
# with waits between (process and Ray start-up), and one process keeps about 1.4 of 2 cores busy.
# `bash scripts/test.sh -n 0` runs it in one process; MSBT_TEST_PROCESSES sets how many.
exec .venv/bin/python -m pytest -n "${MSBT_TEST_PROCESSES:-2}" "$@"
