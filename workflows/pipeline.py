"""The main job: `python workflows/pipeline.py --config workflows/configs/cpu.yaml`.

preprocess -> stage 1 -> stage 2 -> test metrics. `--resume` continues a stopped run of the same
`run.name`: finished stages (runs/<name>/stages.json) are reused, an interrupted one continues from its
latest checkpoint. A thin entry point, so `ray job submit -- python workflows/pipeline.py ...` runs it
unchanged; everything it does lives in `msbt.jobs.pipeline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
# `python workflows/x.py` puts workflows/ on sys.path, not the project root; under `ray job submit
# --working-dir .` the package is uploaded beside this folder rather than installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Options a step may take beyond the common ones: name -> (argparse keywords).
STEP_OPTIONS = {
    "force_split": dict(flags=["--force-split"], action="store_true",
                        help="make a new split even if the run has one"),
    "resume": dict(flags=["--resume"], action="store_true",
                   help="reuse finished stages and continue an interrupted one (default: refuse a run "
                        "folder that already holds a trained stage)"),
    "parent": dict(flags=["--parent"], metavar="CHECKPOINT",
                   help="stage-1 checkpoint to start from (default: stage 1's best in the run's stages.json)"),
    "checkpoint": dict(flags=["--checkpoint"], metavar="CHECKPOINT",
                       help="stage-2 checkpoint to score (default: stage 2's best in the run's stages.json)"),
}


def entry(command: str, doc: str, argv=None, options=("force_split", "resume")) -> int:
    """Parse the common workflow options (and the step's `options`) and run `msbt <command>` with them."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--smoke-test", action="store_true", help="add configs/smoke.yaml: the smallest real run")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, a `ray start` cluster "
                        "on this machine, or a private one; `local`: always a private one)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    parser.add_argument("--verbose", action="store_true", help="Ray's and TensorFlow's own output on the terminal "
                        "too (it is always in runs/<name>/logs/)")
    for name in options:
        spec = dict(STEP_OPTIONS[name])
        parser.add_argument(*spec.pop("flags"), dest=name, **spec)
    args = parser.parse_args(argv)

    from msbt.cli import main as msbt_main

    configs = args.config + ([str(CONFIGS / "smoke.yaml")] if args.smoke_test else [])
    cli = (["--debug"] if args.debug else []) + (["--verbose"] if args.verbose else []) + [command]
    for path in configs:
        cli += ["--config", path]
    for item in args.overrides:
        cli += ["--set", item]
    if args.address:
        cli += ["--address", args.address]
    for name in options:
        value = getattr(args, name)
        if value is True:
            cli.append(STEP_OPTIONS[name]["flags"][0])
        elif value:
            cli += [STEP_OPTIONS[name]["flags"][0], value]
    return msbt_main(cli)


def passthrough(command: str, argv=None) -> int:
    """Run `msbt <command>` with the arguments as given (the experiment workflows have options of their
    own, which `msbt <command> --help` lists); `--smoke-test` becomes `--config configs/smoke.yaml`."""
    from msbt.cli import main as msbt_main

    args = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in args:
        args.remove("--smoke-test")
        args += ["--config", str(CONFIGS / "smoke.yaml")]
    return msbt_main([command, *args])


if __name__ == "__main__":
    sys.exit(entry("run", __doc__))
