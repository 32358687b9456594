"""Stage 2 only: ultrasound data and store, then cell lines -> benign vs malignant with Ray Train.

    python workflows/stage2.py --config workflows/configs/cpu.yaml [--resume] [--parent CHECKPOINT]

It starts from stage 1's best checkpoint recorded in runs/<name>/stages.json (workflows/stage1.py with
the same config), or from an explicit --parent.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("stage2"))
