#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in data with the CPU configuration.
# Extra arguments go to workflows/pipeline.py, e.g. `--smoke-test` or `--config my.yaml`.
# --resume: running it again reuses what the last run finished (split, stores, trained stages) and
# continues an interrupted one, instead of refusing the existing run folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python workflows/pipeline.py --config workflows/configs/cpu.yaml --resume "$@"
