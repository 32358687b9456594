"""`msbt` command line: one subcommand per step, errors as one clear line (`--debug` for the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import yaml

from msbt import __version__
from msbt.config import ConfigError, load_config, to_dict


def _config_options(parser: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too (`msbt run --debug`); SUPPRESS keeps the top-level value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="config overlay on the paper's settings; repeat to stack (later wins)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key after the overlays, e.g. --set stage1.epochs=2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msbt",
        description="Multistage transfer learning (ImageNet -> cancer cell lines -> breast ultrasound) on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"msbt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the main job (today: data scan, grouping, split, Ray Data preprocessing)")
    _config_options(p)
    p.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, a local `ray start` "
                   "cluster, or a private one)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("preprocess", help="scan, group, split, then cut patches / prepare images into Parquet "
                       "stores with Ray Data")
    _config_options(p)
    p.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("synth", help="generate the built-in synthetic microscope and ultrasound data")
    _config_options(p)
    p.add_argument("--out", help="output folder (default: the cache folder keyed by the synth settings)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("scan", help="scan and validate a class-folder tree or CSV manifest; report rejects")
    _config_options(p)
    p.add_argument("source", help="folder of class folders, or a CSV manifest (path,label[,group])")
    p.add_argument("--classes", nargs="+", help="classes to keep, in label order (default: all found)")
    p.add_argument("--strict", action="store_true", help="stop at the first rejected file")
    p.add_argument("--rejects", metavar="CSV", help="write the rejects manifest here")
    p.set_defaults(func=_cmd_scan)

    p = sub.add_parser("split", help="group near-duplicates and save a leakage-safe train/val/test + k-fold split")
    _config_options(p)
    p.add_argument("source", help="folder of class folders, or a CSV manifest (path,label[,group])")
    p.add_argument("--out", required=True, help="folder for split.csv, split.json and rejects.csv")
    p.add_argument("--classes", nargs="+", help="classes to keep, in label order (default: all found)")
    p.add_argument("--strict", action="store_true", help="stop at the first rejected file")
    p.add_argument("--force", action="store_true", help="replace a split already saved in --out")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("lineage", help="print a stage checkpoint's chain of parents (stage 2 -> stage 1 -> weights)")
    p.add_argument("path", help="a stage checkpoint folder (model.keras + manifest.json)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_lineage)

    p = sub.add_parser("config", help="print the resolved config (paper settings + overlays) as YAML")
    _config_options(p)
    p.set_defaults(func=_cmd_config)
    return parser


def _load(args) -> "object":
    return load_config(args.config, args.overrides)


def _cmd_run(args) -> int:
    from msbt.pipeline import main_job
    from msbt.raycluster import init_ray

    config = _load(args)  # a config error should not wait for Ray to start
    init_ray(args.address)
    main_job(config, force_split=args.force_split)
    return 0


def _cmd_preprocess(args) -> int:
    from msbt.pipeline import prepare_data, preprocess, summarize, summarize_stores
    from msbt.raycluster import init_ray

    config = _load(args)
    init_ray(args.address)
    prepared = prepare_data(config, force_split=args.force_split)
    print(summarize(prepared))
    print(summarize_stores(preprocess(config, prepared)))
    return 0


def _cmd_synth(args) -> int:
    import dataclasses

    from msbt.pipeline import ensure_synth

    config = _load(args)
    if args.out:
        config = dataclasses.replace(config, synth=dataclasses.replace(config.synth, out_dir=args.out))
    print(ensure_synth(config))
    return 0


def _scan(args, config):
    from msbt.discovery import discover

    classes = tuple(args.classes) if args.classes else ()
    d = config.data
    return discover(args.source, classes, strict=args.strict or d.strict, mask_suffixes=d.mask_suffixes,
                    sixteen_bit=d.sixteen_bit)


def _cmd_scan(args) -> int:
    from msbt.discovery import write_rejects

    discovery = _scan(args, _load(args))
    counts = ", ".join(f"{c} {n}" for c, n in discovery.counts().items())
    print(f"{len(discovery.records)} usable images ({counts}); {len(discovery.rejects)} rejected")
    for reason, n in sorted(discovery.skipped.items()):
        print(f"skipped {n}: {reason}")
    for reject in discovery.rejects:
        print(f"rejected {reject.path}: {reject.reason}")
    if args.rejects:
        print(f"rejects manifest: {write_rejects(discovery.rejects, args.rejects)}")
    return 0


def _cmd_split(args) -> int:
    from msbt.discovery import write_rejects
    from msbt.splits import make_split, save_split

    out = Path(args.out)
    if (out / "split.json").exists() and not args.force:
        raise ConfigError(f"{out}: a split is already saved there (use --force to replace it)")
    config = _load(args)
    discovery = _scan(args, config)
    d = config.data
    result = make_split(discovery, ratios=d.split, folds=d.folds, seed=d.seed, grouping=d.grouping,
                        max_distance=d.hash_max_distance, min_similarity=d.min_similarity)
    save_split(result, out)
    write_rejects(discovery.rejects, out / "rejects.csv")
    s = result.summary
    print(json.dumps({k: s[k] for k in ("images", "rejects", "counts", "groups", "leakage")}, indent=2))
    print(f"split saved to {out / 'split.csv'}")
    return 0


def _cmd_lineage(args) -> int:
    from msbt.checkpoint import format_lineage

    if not Path(args.path).exists():
        raise ConfigError(f"{args.path}: no such checkpoint")
    print(format_lineage(args.path))
    return 0


def _cmd_config(args) -> int:
    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `msbt` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("msbt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; --debug shows where it came from
        if args.debug:
            raise
        message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        print(f"msbt: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
