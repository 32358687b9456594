"""External evaluation of a trained run on other sites (each source a site).

    python workflows/external.py runs/busi/stage2/checkpoint_... breast=/data/breast-lesions-usg mendeley=/data/mendeley

Writes runs/<name>/external/<site>/{metrics.json,predictions.csv} and a section per site in report.html;
see docs/evaluation.md. A thin entry point: the arguments go to `msbt external` unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("external"))
