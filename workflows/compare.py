"""Does the middle stage help? Multistage vs ImageNet -> ultrasound vs from scratch, and a naive split.

    python workflows/compare.py --config workflows/configs/cpu.yaml [--arms multistage imagenet scratch] [--no-naive]
    python workflows/compare.py --config ... --by site [--arms multistage imagenet]   # at sites never seen
    python workflows/compare.py --config ... --by site --arms multistage imagenet --seeds 0 1 2   # over seeds

Same split, budget and stage-1 checkpoint; paired DeLong and group-bootstrap tests on the AUC; writes
runs/<run.name>/compare/compare.json and prints the table. `--by site`: each arm under leave one site out,
paired per held-out site (runs/<run.name>/loso/compare.json; no naive arm); with several training seeds
(`--seeds`, else run.stage2_seeds) every arm is trained with each, and the arms are compared on their means
over the seeds with the seed spread counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("compare"))
