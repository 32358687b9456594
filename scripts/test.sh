#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. `-m "not ray"`, or `-n 0`
# for one process. By default two pytest processes (pytest-xdist; MSBT_TEST_WORKERS changes it) share the
# machine, one test file each at a time (a file's fixtures are built once): a single process keeps only
# about 1.4 of 2 cores busy (Ray start-up, polls, process launches), so a second one fills the gaps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -n "${MSBT_TEST_WORKERS:-2}" --dist loadfile "$@"
