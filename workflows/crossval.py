"""k-fold cross-validation of stage 2 on the run's saved group-aware folds, all folds from one stage 1.

    python workflows/crossval.py --config workflows/configs/cpu.yaml [--scope trainval|all] [--fresh]
    python workflows/crossval.py --config workflows/configs/cpu.yaml --by site   # leave one site out

Writes runs/<run.name>/crossval/{folds.csv,crossval.json} and the report's experiments section; see
docs/evaluation.md for the fold design.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("crossval"))
