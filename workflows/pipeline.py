"""The main job: `python workflows/pipeline.py --config workflows/configs/cpu.yaml`.

preprocess -> stage 1 -> stage 2 -> test metrics. `--resume` continues a stopped run of the same
`run.name`: finished stages (runs/<name>/stages.json) are reused, an interrupted one continues from its
latest checkpoint. A thin entry point, so `ray job submit -- python workflows/pipeline.py ...` runs it
unchanged; everything it does lives in `msbt.jobs.pipeline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python workflows/x.py` puts workflows/ on sys.path, not the project root; under `ray job submit
# --working-dir .` the package is uploaded beside this folder rather than installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(command: str, argv=None) -> int:
    """Run ``msbt <command>`` with this script's arguments as given.

    One parser for scripts and command line alike (msbt.cli): every option, its help and its checks
    exist once; ``python workflows/stage2.py --help`` shows ``msbt stage2 --help``.
    """
    from msbt.cli import main as msbt_main

    return msbt_main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run("run"))
