"""The main job: `python workflows/pipeline.py --config workflows/configs/cpu.yaml`.

A thin entry point, so `ray job submit -- python workflows/pipeline.py ...` runs it unchanged; everything it
does lives in `msbt.pipeline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
# `python workflows/x.py` puts workflows/ on sys.path, not the project root; under `ray job submit
# --working-dir .` the package is uploaded beside this folder rather than installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def entry(command: str, doc: str, argv=None) -> int:
    """Parse the common workflow options and run `msbt <command>` with them."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--smoke-test", action="store_true", help="add configs/smoke.yaml: the smallest real run")
    parser.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a local one)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)

    from msbt.cli import main as msbt_main

    configs = args.config + ([str(CONFIGS / "smoke.yaml")] if args.smoke_test else [])
    cli = (["--debug"] if args.debug else []) + [command]
    for path in configs:
        cli += ["--config", path]
    for item in args.overrides:
        cli += ["--set", item]
    if args.force_split:
        cli.append("--force-split")
    if args.address:
        cli += ["--address", args.address]
    return msbt_main(cli)


if __name__ == "__main__":
    sys.exit(entry("run", __doc__))
