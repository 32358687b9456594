"""Stage 1 only: microscope data, the patch store, then ImageNet -> cell lines with Ray Train.

    python workflows/stage1.py --config workflows/configs/cpu.yaml [--resume]

The best checkpoint is recorded in runs/<name>/stages.json, where workflows/stage2.py finds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("stage1"))
