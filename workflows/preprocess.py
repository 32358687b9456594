"""Data step only: scan, group, split and build the Parquet stores with Ray Data.

    python workflows/preprocess.py --config workflows/configs/cpu.yaml
    ray job submit --working-dir . -- python workflows/preprocess.py --config workflows/configs/cpu.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("preprocess"))
