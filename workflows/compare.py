"""Does the middle stage help? Multistage vs ImageNet -> ultrasound vs from scratch, and a naive split.

    python workflows/compare.py --config workflows/configs/cpu.yaml [--arms multistage imagenet scratch] [--no-naive]

Same split, budget and stage-1 checkpoint; paired DeLong and group-bootstrap tests on the AUC; writes
runs/<run.name>/compare/compare.json and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

from workflows.pipeline import CONFIGS  # noqa: E402


def main(argv=None) -> int:
    """Run `msbt compare` with these arguments; `--smoke-test` adds configs/smoke.yaml."""
    from msbt.cli import main as msbt_main

    args = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in args:
        args.remove("--smoke-test")
        args += ["--config", str(CONFIGS / "smoke.yaml")]
    return msbt_main(["compare", *args])


if __name__ == "__main__":
    sys.exit(main())
