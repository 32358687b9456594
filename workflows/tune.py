"""Ray Tune search of stage 2 around the paper: `python workflows/tune.py --config workflows/configs/cpu.yaml
--config workflows/configs/tune.yaml`.

A thin entry point like workflows/pipeline.py (`ray job submit -- python workflows/tune.py ...` runs it
unchanged); everything it does lives in `msbt.tune.search`. `--resume` continues an interrupted experiment,
`--fast` trains heads on cached features of a frozen backbone, `--smoke-test` is the smallest real search
(workflows/configs/tune-smoke.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("tune"))
