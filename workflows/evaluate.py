"""Evaluation only: test metrics of stage 2's recorded best checkpoint, or of --checkpoint.

    python workflows/evaluate.py --config workflows/configs/cpu.yaml [--checkpoint CHECKPOINT]

The threshold is chosen on the validation split; the test split is scored once; metrics.json goes into
the run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("evaluate"))
