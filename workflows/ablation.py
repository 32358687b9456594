"""The paper's Table 1 as one command: four stage-2 settings, same split, seeds and stage-1 checkpoint.

    python workflows/ablation.py --config workflows/configs/cpu.yaml [--fresh]

Writes runs/<run.name>/ablation/ablation.json and prints our loss/accuracy/AUC (95% CIs) beside the
paper's accuracies; the rows are defined in msbt.jobs.experiments.ABLATION_ROWS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("ablation"))
