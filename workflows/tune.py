"""Ray Tune search of stage 2 around the paper: `python workflows/tune.py --config workflows/configs/cpu.yaml
--config workflows/configs/tune.yaml`.

A thin entry point like workflows/pipeline.py (`ray job submit -- python workflows/tune.py ...` runs it
unchanged); everything it does lives in `msbt.tune.search`. `--resume` continues an interrupted experiment,
`--fast` trains heads on cached features of a frozen backbone, `--smoke-test` is the smallest real search.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see workflows/pipeline.py

# The smallest real search: smoke.yaml's data and epochs, four trials, early stopping after one epoch.
SMOKE = ["stage2.epochs=2", "tune.num_samples=4", "tune.grace_period=1", "tune.max_concurrent_trials=2",
         "tune.cpus_per_trial=0.5", "tune.experiment=smoke"]


def entry(argv=None) -> int:
    """Parse the workflow options and run `msbt tune` with them."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--smoke-test", action="store_true", help="add configs/smoke.yaml and a 4-trial search")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment")
    parser.add_argument("--fast", action="store_true", help="frozen backbone: heads on cached features")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a local one)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    parser.add_argument("--verbose", action="store_true", help="Ray's and TensorFlow's own output on the terminal "
                        "too (it is always in runs/<name>/logs/)")
    args = parser.parse_args(argv)

    from msbt.cli import main as msbt_main

    configs = args.config + ([str(CONFIGS / "smoke.yaml")] if args.smoke_test else [])
    overrides = (SMOKE if args.smoke_test else []) + args.overrides
    cli = (["--debug"] if args.debug else []) + (["--verbose"] if args.verbose else []) + ["tune"]
    for path in configs:
        cli += ["--config", path]
    for item in overrides:
        cli += ["--set", item]
    cli += (["--resume"] if args.resume else []) + (["--fast"] if args.fast else [])
    if args.address:
        cli += ["--address", args.address]
    return msbt_main(cli)


if __name__ == "__main__":
    sys.exit(entry())
