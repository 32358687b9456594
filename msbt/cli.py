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
    p.add_argument("--cine", metavar="VIDEO", help="instead: write a synthetic cine loop (one lesion swept under "
                   "the probe) to this .avi/.mp4/.mkv file, the demo source of `msbt stream`")
    p.add_argument("--cine-frames", type=int, default=90, help="frames in the cine loop (default 90)")
    p.add_argument("--cine-fps", type=float, default=30.0, help="its frame rate (default 30)")
    p.add_argument("--cine-class", choices=("benign", "malignant"), default="malignant", help="its lesion's class")
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
    _serve_parsers(sub)
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
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_tune_report)

    p = sub.add_parser("config", help="print the resolved config (paper settings + overlays) as YAML")
    _config_options(p)
    p.set_defaults(func=_cmd_config)
    return parser


def _load(args) -> "object":
    return load_config(args.config, args.overrides)


def _cmd_run(args) -> int:
    from msbt.jobs.pipeline import main_job
    from msbt.raycluster import init_ray
    from msbt.train.stages import refuse_rerun

    config = _load(args)  # a config error should not wait for Ray to start
    if not args.resume:
        refuse_rerun(config)  # nor should a run folder that --resume would be needed for
    init_ray(args.address)
    main_job(config, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_stage1(args) -> int:
    from msbt.jobs.pipeline import stage1_job
    from msbt.raycluster import init_ray
    from msbt.train.stages import refuse_rerun

    config = _load(args)
    if not args.resume:
        refuse_rerun(config, [1])
    init_ray(args.address)
    stage1_job(config, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_stage2(args) -> int:
    from msbt.jobs.pipeline import recorded_checkpoint, stage2_job
    from msbt.raycluster import init_ray
    from msbt.train.stages import refuse_rerun

    config = _load(args)
    if not args.resume:
        refuse_rerun(config, [2])
    if args.parent and not Path(args.parent).is_dir():
        raise ConfigError(f"{args.parent}: no such checkpoint folder (--parent)")
    if not args.parent:
        recorded_checkpoint(config, 1)  # no stage 1 yet: say so before Ray starts
    init_ray(args.address)
    stage2_job(config, parent=args.parent, force_split=args.force_split, resume=args.resume)
    return 0


def _cmd_evaluate(args) -> int:
    from msbt.jobs.pipeline import evaluate_job, recorded_checkpoint
    from msbt.raycluster import init_ray

    config = _load(args)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise ConfigError(f"{args.checkpoint}: no such checkpoint folder (--checkpoint)")
    if not args.checkpoint:
        recorded_checkpoint(config, 2)
    init_ray(args.address)
    evaluate_job(config, checkpoint=args.checkpoint)
    return 0


def _cmd_preprocess(args) -> int:
    from msbt.jobs.pipeline import prepare_data, preprocess, summarize, summarize_stores
    from msbt.raycluster import init_ray

    config = _load(args)
    init_ray(args.address)
    prepared = prepare_data(config, force_split=args.force_split)
    print(summarize(prepared))
    print(summarize_stores(preprocess(config, prepared)))
    return 0


def _cmd_synth(args) -> int:
    import dataclasses

    from msbt.jobs.pipeline import ensure_synth

    config = _load(args)
    if args.cine:
        from msbt.data.synth import write_cine

        path = write_cine(args.cine, seed=config.synth.seed, label=args.cine_class, frames=args.cine_frames,
                          fps=args.cine_fps, size=config.synth.ultrasound_size)
        print(f"cine loop: {path} ({args.cine_frames} frames at {args.cine_fps:g} fps, {args.cine_class} lesion)")
        return 0
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

    p = sub.add_parser("export", help="write a stage-2 checkpoint as Keras model, TensorFlow SavedModel, ONNX and "
                       "OpenVINO IR for serving, each checked against Keras")
    p.add_argument("checkpoint", help="stage-2 checkpoint folder (model.keras + manifest.json)")
    p.add_argument("out_dir", help="new or empty folder for model.keras, manifest.json, saved_model/, model.onnx, "
                   "openvino/, export.json")
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
    print(f"exported {args.checkpoint} -> {args.out_dir} (model.keras, manifest.json, saved_model/, model.onnx, "
          f"openvino/, export.json); threshold {record['threshold']['value']:.4g} from "
          f"{record['threshold']['source']}; model id {record['model_id']}")
    for name, e in record["engines"].items():
        print(f"engine {name} ({e['precision']}): max |p - p_keras| = {e['max_abs_diff']:.2e} on {e['frames']} "
              "synthetic ultrasound frames")
    for note in record["notes"]:
        print(f"note: {note}")
    return 0


def _serve_parsers(sub) -> None:
    """`stream` (msbt.serve.stream) and `serve` (msbt.serve.app); see docs/predict.md."""
    from msbt.config import ServeConfig

    engines = ("keras", "savedmodel", "onnx", "openvino")
    p = sub.add_parser("stream", help="score a video, folder of frames, capture device or DICOM cine loop frame "
                       "by frame in real time")
    p.add_argument("model", help="an `msbt export` folder")
    p.add_argument("source", help="video file, folder of frames (name order), capture device index (0), or .dcm")
    p.add_argument("--out", metavar="CSV", help="per-frame CSV (default: stream.csv in the current folder)")
    p.add_argument("--engine", choices=engines, default="openvino", help="inference engine (default openvino, f32)")
    p.add_argument("--threads", type=int, help="engine threads (default: all cores)")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the run's, from export.json)")
    p.add_argument("--smooth", choices=("ema", "window"), default="ema", help="lesion-level score: exponential "
                   "moving average (default) or mean of the last --window scored frames")
    p.add_argument("--alpha", type=float, default=0.3, help="EMA weight of the newest frame (default 0.3)")
    p.add_argument("--window", type=int, default=8, help="frames in the window mean (default 8)")
    p.add_argument("--fps", type=float, help="source frame rate (default: the video's; 30 for folders and DICOM)")
    p.add_argument("--all-frames", action="store_true", help="score every frame as fast as possible instead of "
                   "reading at the source's pace and dropping frames the engine cannot keep up with")
    p.add_argument("--video", metavar="FILE", help="write an annotated video (.avi/.mp4/.mkv)")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N", help="Grad-CAM of every N-th scored frame, on "
                   "a side thread (skipped while busy)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames (a device never ends)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.set_defaults(func=_cmd_stream)

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve an exported model over HTTP with Ray Serve (POST /predict, GET /healthz)")
    _config_options(p)
    p.add_argument("model", help="an `msbt export` folder")
    p.add_argument("--host", help=f"interface to listen on (default serve.host, {d.host}: this machine only)")
    p.add_argument("--port", type=int, help=f"port (default serve.port, {d.port})")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the run's, from export.json)")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_serve)


def _cmd_stream(args) -> int:
    from msbt.serve.engines import load_served
    from msbt.serve.stream import Smoothing, format_summary, open_source, stream

    smoothing = Smoothing(args.smooth, args.alpha, args.window)  # bad values fail before anything loads
    if args.heatmaps < 0:
        raise ConfigError(f"--heatmaps must be >= 0, got {args.heatmaps}")
    served = load_served(args.model, args.engine, threads=args.threads, threshold=args.threshold)
    source = open_source(args.source, fps=args.fps, sixteen_bit=served.preparation.sixteen_bit)
    summary = stream(served.engine, source, served.preparation, served.threshold, served.class_names,
                     args.out or "stream.csv", smoothing=smoothing, pace=not args.all_frames, video=args.video,
                     heatmap_every=args.heatmaps, model_folder=args.model, max_frames=args.max_frames)
    summary.notes = served.notes + summary.notes
    print(format_summary(summary))
    return 0 if summary.frames_scored else 1


def _cmd_serve(args) -> int:
    import dataclasses

    from msbt.raycluster import init_ray
    from msbt.serve import app

    config = _load(args).serve
    config = dataclasses.replace(config, **{k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    app.application(args.model, config)  # a wrong folder or config fails before Ray starts
    init_ray(args.address)
    print(f"serving {args.model} at http://{config.host}:{config.port}/predict (GET /healthz); Ctrl-C stops it")
    app.run(args.model, config, threshold=args.threshold, blocking=True)
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
    from msbt.raycluster import init_ray
    from msbt.eval.report import write_report

    config = _load(args)
    init_ray(args.address)
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
    from msbt.raycluster import init_ray
    from msbt.tune.search import experiment_dir, format_ranking, read_experiment, run_search, write_best_overlay

    extra = ["tune.fast=true", "stage2.trainable_backbone=false"] if args.fast else []
    config = load_config(args.config, args.overrides + extra)
    init_ray(args.address)
    run_search(config, resume=args.resume, sources=", ".join(args.config) or "the default config")
    exp = experiment_dir(config)
    print(format_ranking(*read_experiment(exp)))
    print(f"best configuration: {write_best_overlay(exp)}")
    return 0


def _cmd_tune_report(args) -> int:
    from msbt.tune.search import format_ranking, read_experiment, write_best_overlay

    print(format_ranking(*read_experiment(args.path)))
    print(f"best configuration: {write_best_overlay(args.path, args.out)}")
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
