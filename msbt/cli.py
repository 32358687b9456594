"""`msbt` command line: one subcommand per step, errors as one clear line (`--debug` for the traceback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import yaml

from msbt import __version__
from msbt.config import ConfigError, load_config, to_dict


def _config_options(parser: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too (`msbt run --debug`); SUPPRESS keeps the top-level value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and TensorFlow's own output on the terminal (always in runs/<name>/logs/)")
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="config overlay on the paper's settings; repeat to stack (later wins)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key after the overlays, e.g. --set stage1.epochs=2",
    )


def _step_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser)
    parser.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    parser.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    parser.add_argument("--resume", action="store_true", help="reuse the stage if finished, continue it if "
                        "interrupted (default: refuse a run folder that already holds it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msbt",
        description="Multistage transfer learning (ImageNet -> cancer cell lines -> breast ultrasound) on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"msbt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("--verbose", action="store_true", help="show INFO logs and Ray's and TensorFlow's own "
                        "output on the terminal (by default they go to runs/<name>/logs/ only)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the main job (today: data scan, grouping, split, Ray Data preprocessing)")
    _config_options(p)
    p.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, a local `ray start` "
                   "cluster, or a private one; `local`: always a private one)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run: reuse finished stages "
                   "(stages.json), continue an interrupted one from its latest checkpoint")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("stage1", help="microscope data and store, then stage 1 (ImageNet -> cell lines)")
    _step_options(p)
    p.set_defaults(func=_cmd_stage1)

    p = sub.add_parser("stage2", help="ultrasound data and store, then stage 2 from stage 1's recorded best "
                       "checkpoint (or --parent)")
    _step_options(p)
    p.add_argument("--parent", metavar="CHECKPOINT", help="stage-1 checkpoint folder to start from (default: "
                   "stage 1's best, recorded in the run's stages.json)")
    p.set_defaults(func=_cmd_stage2)

    p = sub.add_parser("evaluate", help="test metrics of stage 2's recorded best checkpoint (or --checkpoint)")
    _config_options(p)
    p.add_argument("--checkpoint", help="stage-2 checkpoint folder (default: stage 2's best, from stages.json)")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_evaluate)

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

    _predict_parsers(sub)
    _experiment_parsers(sub)

    p = sub.add_parser("tune", help="Ray Tune search of stage 2 (head, augmentation, optimizer) around the paper")
    _config_options(p)
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment (tune.experiment)")
    p.add_argument("--fast", action="store_true", help="frozen backbone: heads train on cached backbone features "
                   "(sets tune.fast and stage2.trainable_backbone: false)")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("tune-report", help="rank a tune experiment's trials; write the best as a config overlay")
    p.add_argument("path", help="the experiment folder, runs/<name>/tune/<experiment>")
    p.add_argument("--out", help="where the overlay goes (default: PATH/best.yaml)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="also write rank1.yaml ... rankK.yaml, the K "
                   "best trials' overlays, for re-scoring under cross-validation before one is adopted")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_tune_report)

    p = sub.add_parser("config", help="print the resolved config (paper settings + overlays) as YAML")
    _config_options(p)
    p.set_defaults(func=_cmd_config)
    return parser


def _load(args) -> "object":
    return load_config(args.config, args.overrides)


def _start_ray(args, config, *, tensorflow: bool = True) -> None:
    """Log into ``runs/<name>/logs/``, join or start Ray, and import TensorFlow with its start-up notices
    in the log (``tensorflow``: the command will need it), keeping the console quiet (msbt.console)."""
    from msbt import console
    from msbt.raycluster import init_ray

    console.attach_run(Path(config.run.storage_path).expanduser().resolve() / config.run.name)
    init_ray(args.address)
    if tensorflow:
        console.import_tensorflow()


def _cmd_run(args) -> int:
    from msbt.jobs.pipeline import main_job
    from msbt.train.stages import refuse_rerun

    config = _load(args)  # a config error should not wait for Ray to start
    if not args.resume:
        refuse_rerun(config)  # nor should a run folder that --resume would be needed for
    _start_ray(args, config)
    main_job(config, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_stage1(args) -> int:
    from msbt.jobs.pipeline import stage1_job
    from msbt.train.stages import refuse_rerun

    config = _load(args)
    if not args.resume:
        refuse_rerun(config, [1])
    _start_ray(args, config)
    stage1_job(config, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_stage2(args) -> int:
    from msbt.jobs.pipeline import recorded_checkpoint, stage2_job
    from msbt.train.stages import refuse_rerun

    config = _load(args)
    if not args.resume:
        refuse_rerun(config, [2])
    if args.parent and not Path(args.parent).is_dir():
        raise ConfigError(f"{args.parent}: no such checkpoint folder (--parent)")
    if not args.parent:
        recorded_checkpoint(config, 1)  # no stage 1 yet: say so before Ray starts
    _start_ray(args, config)
    stage2_job(config, parent=args.parent, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_evaluate(args) -> int:
    from msbt.jobs.pipeline import evaluate_job, recorded_checkpoint

    config = _load(args)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise ConfigError(f"{args.checkpoint}: no such checkpoint folder (--checkpoint)")
    if not args.checkpoint:
        recorded_checkpoint(config, 2)
    _start_ray(args, config)
    evaluate_job(config, checkpoint=args.checkpoint)
    return 0


def _cmd_preprocess(args) -> int:
    from msbt.jobs.pipeline import prepare_data, preprocess, summarize, summarize_stores

    config = _load(args)
    _start_ray(args, config, tensorflow=False)
    prepared = prepare_data(config, force_split=args.force_split)
    print(summarize(prepared))
    print(summarize_stores(preprocess(config, prepared)))
    return 0


def _cmd_synth(args) -> int:
    import dataclasses

    from msbt.jobs.pipeline import ensure_synth

    config = _load(args)
    if args.out:
        config = dataclasses.replace(config, synth=dataclasses.replace(config.synth, out_dir=args.out))
    print(ensure_synth(config))
    return 0


def _scan(args, config):
    from msbt.data.discovery import discover

    classes = tuple(args.classes) if args.classes else ()
    d = config.data
    return discover(args.source, classes, strict=args.strict or d.strict, mask_suffixes=d.mask_suffixes,
                    sixteen_bit=d.sixteen_bit)


def _cmd_scan(args) -> int:
    from msbt.data.discovery import write_rejects

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
    from msbt.data.discovery import write_rejects
    from msbt.data.splits import make_split, save_split

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
    from msbt.model.checkpoint import format_lineage

    if not Path(args.path).exists():
        raise ConfigError(f"{args.path}: no such checkpoint")
    print(format_lineage(args.path))
    return 0


def _predict_parsers(sub) -> None:
    """`predict` and `export` (msbt.serve.predict, msbt.serve.export); see docs/predict.md."""
    p = sub.add_parser("predict", help="label new ultrasound images with a stage-2 model (probability, threshold, "
                       "optional Grad-CAM)")
    p.add_argument("model", help="stage-2 checkpoint folder (model.keras + manifest.json) or an `msbt export` folder")
    p.add_argument("images", nargs="+", help="image files and folders (searched recursively; masks skipped)")
    p.add_argument("--out", metavar="CSV", help="write one row per file (predictions and rejects) here")
    p.add_argument("--heatmaps", metavar="DIR", help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the one the run chose on "
                   "validation, from its metrics.json; else 0.5)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write a stage-2 checkpoint as Keras model + TensorFlow SavedModel for serving")
    p.add_argument("checkpoint", help="stage-2 checkpoint folder (model.keras + manifest.json)")
    p.add_argument("out_dir", help="new or empty folder for model.keras, manifest.json, saved_model/, export.json")
    p.add_argument("--threshold", type=float, help="threshold to record (default: the run's validation threshold)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_export)


def _cmd_predict(args) -> int:
    from msbt.serve.predict import format_lines, predict, write_csv

    run = predict(args.model, args.images, threshold=args.threshold, heatmaps=args.heatmaps)
    print("\n".join(format_lines(run)))
    if args.out:
        print(f"predictions: {write_csv(run, args.out)}")
    if not run.predictions:
        print("msbt: error: no image could be predicted", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args) -> int:
    from msbt.serve.export import export

    record = export(args.checkpoint, args.out_dir, threshold=args.threshold)
    print(f"exported {args.checkpoint} -> {args.out_dir} (model.keras, manifest.json, saved_model/, export.json); "
          f"threshold {record['threshold']['value']:.4g} from {record['threshold']['source']}")
    for note in record["notes"]:
        print(f"note: {note}")
    return 0


def _cmd_config(args) -> int:
    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
    return 0


def _experiment_parsers(sub) -> None:
    """`crossval`, `ablation`, `compare` (msbt.jobs.experiments) and `report` (msbt.eval.report); see docs/evaluation.md."""
    for name, text in (("crossval", "k-fold cross-validation of stage 2 over the saved group-aware folds"),
                       ("ablation", "the paper's Table 1: four stage-2 settings from one stage 1"),
                       ("compare", "multistage vs ImageNet-only vs from scratch, and naive vs group-aware split")):
        p = sub.add_parser(name, help=text)
        _config_options(p)
        p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
        p.add_argument("--fresh", action="store_true", help="delete this experiment's earlier results first "
                       "(default: arms with a metrics.json are reused)")
        p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
        if name == "crossval":
            p.add_argument("--scope", choices=("trainval", "all"), default="trainval",
                           help="trainval: folds over the train+val images, test split untouched (default); "
                                "all: every image (do not select on the result)")
        if name == "compare":
            p.add_argument("--arms", nargs="+", choices=("multistage", "imagenet", "scratch"),
                           default=["multistage", "imagenet", "scratch"], help="stage-2 starting points")
            p.add_argument("--no-naive", action="store_true", help="skip the naive-split arm")
        p.set_defaults(func=_cmd_experiment, experiment=name)
    p = sub.add_parser("report", help="(re)write a run folder's report.html")
    p.add_argument("run_dir", help="a run folder (runs/<run.name>)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_report)


def _cmd_experiment(args) -> int:
    from msbt.jobs import experiments
    from msbt.jobs.pipeline import run_dir
    from msbt.eval.report import write_report

    config = _load(args)
    _start_ray(args, config)
    common = {"fresh": args.fresh, "n_boot": args.n_boot}
    if args.experiment == "crossval":
        experiments.crossval(config, scope=args.scope, **common)
    elif args.experiment == "ablation":
        experiments.ablation(config, **common)
    else:
        experiments.compare(config, arms=args.arms, naive=not args.no_naive, **common)
    print(f"report: {write_report(run_dir(config))}")
    return 0


def _cmd_report(args) -> int:
    from msbt.eval.report import write_report

    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir}: no such run folder")
    print(write_report(args.run_dir))
    return 0


def _cmd_tune(args) -> int:
    from msbt.tune.search import experiment_dir, format_ranking, read_experiment, run_search, write_best_overlay

    extra = ["tune.fast=true", "stage2.trainable_backbone=false"] if args.fast else []
    config = load_config(args.config, args.overrides + extra)
    _start_ray(args, config)
    run_search(config, resume=args.resume, sources=", ".join(args.config) or "the default config")
    exp = experiment_dir(config)
    print(format_ranking(*read_experiment(exp)))
    print(f"best configuration: {write_best_overlay(exp)}")
    from msbt.tune.review import write_review

    print(f"review: {write_review(exp)}")
    return 0


def _review(exp, top_k: int) -> None:
    """Write the experiment's review.html (and the top-k overlays) and say where."""
    from msbt.tune.review import crossval_commands, write_hparams, write_review, write_top_overlays

    print(f"review: {write_review(exp, top_k=max(top_k, 3))}")
    print(f"TensorBoard HParams: {write_hparams(exp)} (tensorboard --logdir {Path(exp).resolve().parent})")
    if top_k > 0:
        for path in write_top_overlays(exp, top_k):
            print(f"re-score under cross-validation: {path}")
        print("\n".join(crossval_commands(exp, top_k)[1:]))


def _cmd_tune_report(args) -> int:
    from msbt.tune.search import format_ranking, read_experiment, write_best_overlay

    print(format_ranking(*read_experiment(args.path)))
    print(f"best configuration: {write_best_overlay(args.path, args.out)}")
    _review(args.path, args.top_k)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `msbt` console script."""
    from msbt import console

    args = build_parser().parse_args(argv)
    # Before anything imports TensorFlow or Ray: their notices go to the run's log file (see msbt.console).
    console.setup(verbose=args.verbose, debug=args.debug)
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
