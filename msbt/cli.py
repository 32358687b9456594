"""`msbt` command line: one subcommand per step, errors as one clear line (`--debug` for the traceback)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Sequence

import yaml

from msbt import __version__
from msbt.config import ConfigError, check_ranges, load_config, to_dict

# The smallest real run, for `--smoke-test`: shipped beside the workflow scripts, not in the package.
CONFIGS = Path(__file__).resolve().parents[1] / "workflows" / "configs"
SMOKE_CONFIG = CONFIGS / "smoke.yaml"
SMOKE_CONFIGS = {"tune": CONFIGS / "tune-smoke.yaml"}  # a command whose smallest run needs more settings


def _output_options(parser: argparse.ArgumentParser) -> None:
    """--debug and --verbose, accepted after every subcommand too (`msbt predict --verbose`; only some took
    --verbose there); SUPPRESS keeps the top-level value."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and TensorFlow's own output on the terminal (a command that writes a "
                        "run folder keeps it in the folder's logs/ either way)")


def _config_options(parser: argparse.ArgumentParser) -> None:
    _output_options(parser)
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="config overlay on the paper's settings; repeat to stack (later wins)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key after the overlays, e.g. --set stage1.epochs=2",
    )
    parser.add_argument("--smoke-test", action="store_true", help="add workflows/configs/smoke.yaml (tune: "
                        "tune-smoke.yaml) after the overlays: the smallest real run")


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

    p = sub.add_parser("run", help="run the main job: data scan, grouping, split, Ray Data stores, stage 1, "
                       "stage 2, test metrics, report")
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
                       "checkpoint (or --parent; from none when stage2.weights is not parent)")
    _step_options(p)
    p.add_argument("--parent", metavar="CHECKPOINT", help="stage-1 checkpoint folder to start from (default: "
                   "stage 1's best, recorded in the run's stages.json)")
    p.set_defaults(func=_cmd_stage2)

    p = sub.add_parser("evaluate", help="test metrics of the run's model (or --checkpoint)")
    _config_options(p)
    p.add_argument("--checkpoint", help="stage-2 checkpoint folder (default: the run's model: stage 2's best, from "
                   "stages.json, or with run.stage2_seeds > 1 the average of its seeds)")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("preprocess", help="scan, group, split, then cut patches / prepare images into Parquet "
                       "stores with Ray Data")
    _config_options(p)
    p.add_argument("--force-split", action="store_true", help="make a new split even if the run has one")
    p.add_argument("--only", choices=("microscope", "ultrasound"),
                   help="prepare this modality alone (default: those the main job uses: both, or only ultrasound "
                        "when stage 2 does not start from stage 1)")
    p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("synth", help="generate the built-in synthetic microscope and ultrasound data")
    _config_options(p)
    p.add_argument("--out", help="output folder (default: the cache folder keyed by the synth settings)")
    p.add_argument("--cine", metavar="VIDEO", help="instead: write a synthetic cine loop (one lesion swept under "
                   "the probe) to this .avi/.mp4/.mkv file, the demo source of `msbt stream`")
    p.add_argument("--cine-frames", type=int, help="frames in the cine loop (default 90)")
    p.add_argument("--cine-fps", type=float, help="its frame rate (default 30)")
    p.add_argument("--cine-class", choices=("benign", "malignant"), help="its lesion's class (default malignant)")
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
    p.add_argument("path", help="a stage checkpoint folder (model.keras + manifest.json), or a run folder (its model)")
    _output_options(p)
    p.set_defaults(func=_cmd_lineage)

    p = sub.add_parser("ensemble", help="average several stage-2 checkpoints of one split into one model, and "
                       "score it and each member on their test rows")
    p.add_argument("checkpoints", nargs="+", help="two or more stage-2 checkpoint folders trained on the same data "
                   "and split (e.g. a leave-one-site-out fold's seeds)")
    p.add_argument("--out", required=True, help="the ensemble's folder (<out>/checkpoint for predict, external, "
                   "export and serve); inside the members' run folder, predict finds the run's preparation")
    p.add_argument("--store", help="their ultrasound store (default: found at or above the first checkpoint)")
    _add_n_boot(p)
    _output_options(p)
    p.set_defaults(func=_cmd_ensemble)

    _predict_parsers(sub)
    _external_parser(sub)
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
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="also write rank1.yaml ... rankK.yaml, the K "
                   "best trials' overlays, for re-scoring under cross-validation before one is adopted")
    _output_options(p)
    p.set_defaults(func=_cmd_tune_report)

    p = sub.add_parser("config", help="print the resolved config (paper settings + overlays) as YAML")
    _config_options(p)
    p.set_defaults(func=_cmd_config)
    return parser


def _configs(args) -> list:
    """The overlays of a command: ``--config`` files, then the smoke config with ``--smoke-test``."""
    if not getattr(args, "smoke_test", False):
        return list(args.config)
    smoke = SMOKE_CONFIGS.get(args.command, SMOKE_CONFIG)
    if not smoke.is_file():
        raise ConfigError(f"--smoke-test: {smoke} not found (it ships with the project's workflows/)")
    return [*args.config, str(smoke)]


def _load(args) -> "object":
    return load_config(_configs(args), args.overrides)


def _load_run(args) -> "object":
    """The config of a command that writes a run folder, the folder's location checked before Ray
    starts: `run.name` one folder name, `run.storage_path` not inside Ray's copy of a submitted job's
    code (msbt.containment). Rerun and --resume checks are the jobs' (msbt.jobs.pipeline.check_rerun)."""
    from msbt.runfolder import run_dir

    config = _load(args)
    run_dir(config)
    return config


def _preflight(config, modalities=("microscope", "ultrasound"), *, always: bool = False) -> None:
    """A misnamed or unreadable data folder or manifest: an error in seconds, before Ray starts.

    Only for data a step will scan: a later step whose recorded split and store fit reads no data
    (``always`` for the data step itself)."""
    from msbt.data.prepare import check_data

    check_data(config, modalities, always=always)


def _attach(config, *, tensorflow: bool = True) -> None:
    """Log into ``runs/<name>/logs/`` and import TensorFlow with its start-up notices in that log
    (``tensorflow``: the command will need it), keeping the console quiet (msbt.console)."""
    from msbt import console
    from msbt.runfolder import run_dir

    console.attach_run(run_dir(config))
    if tensorflow:
        console.import_tensorflow()


def _start_ray(args, config, *, tensorflow: bool = True) -> None:
    """:func:`_attach`, then join or start Ray (the jobs that train start it themselves, after their
    rerun check)."""
    from msbt.raycluster import init_ray

    _attach(config, tensorflow=tensorflow)
    init_ray(args.address)


def _cmd_run(args) -> int:
    from msbt.jobs.pipeline import main_job
    from msbt.runfolder import run_modalities

    config = _load_run(args)  # a config error should not wait for Ray to start
    # data folders named wrongly: an error before Ray starts (those of the stages this run trains)
    _preflight(config, run_modalities(config), always=True)
    # main_job checks the run folder (--resume) before it opens the run's log or starts Ray
    main_job(config, force_split=args.force_split, resume=args.resume, address=args.address)
    return 0


def _cmd_stage1(args) -> int:
    from msbt.jobs.pipeline import stage1_job

    config = _load_run(args)
    _preflight(config, ["microscope"])
    stage1_job(config, force_split=args.force_split, resume=args.resume, address=args.address)
    return 0


def _cmd_stage2(args) -> int:
    from msbt.jobs.pipeline import stage2_job

    config = _load_run(args)
    _preflight(config, ["ultrasound"])
    # stage2_job refuses a rerun, a missing --parent folder or a missing stage 1 before Ray starts
    stage2_job(config, parent=args.parent, force_split=args.force_split, resume=args.resume, address=args.address)
    return 0


def _cmd_evaluate(args) -> int:
    from msbt.jobs.pipeline import evaluate_job, run_model
    from msbt.model.checkpoint import check_integrity

    config = _load_run(args)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise ConfigError(f"{args.checkpoint}: no such checkpoint folder (--checkpoint)")
    # said before Ray starts: no model recorded, or the recorded or given one deleted or changed since (it was
    # named only after Ray's start and the data step, about 10 s in)
    check_integrity(args.checkpoint or run_model(config))
    _preflight(config, ["ultrasound"])
    _start_ray(args, config)
    evaluate_job(config, checkpoint=args.checkpoint)
    return 0


def _cmd_preprocess(args) -> int:
    from msbt.data.prepare import build_stores, prepare_data, summarize, summarize_stores

    from msbt.runfolder import run_modalities

    config = _load_run(args)
    # A lab with only a microscope collection (or only ultrasound) prepares that alone: the other modality's data
    # (the built-in one when none is given) is neither generated nor scanned.
    modalities = (args.only,) if args.only else run_modalities(config)
    _preflight(config, modalities, always=True)
    _start_ray(args, config, tensorflow=False)
    prepared = prepare_data(config, force_split=args.force_split, modalities=modalities)
    print(summarize(prepared, config))
    print(summarize_stores(build_stores(config, prepared), config))
    return 0


def _cmd_synth(args) -> int:
    import dataclasses
    import math

    from msbt.data.prepare import ensure_synth, ensure_synth_sites

    config = _load(args)
    given = [o for o, v in (("--cine-frames", args.cine_frames), ("--cine-fps", args.cine_fps),
                            ("--cine-class", args.cine_class)) if v is not None]
    if given and not args.cine:  # they were ignored, and the data set was made instead
        raise ConfigError(f"{', '.join(given)}: for a cine loop only; add --cine VIDEO")
    if args.cine:
        from msbt.data.synth import write_cine

        frames = 90 if args.cine_frames is None else args.cine_frames
        fps = 30.0 if args.cine_fps is None else args.cine_fps
        label = args.cine_class or "malignant"
        if frames < 1 or not (math.isfinite(fps) and fps > 0):
            raise ConfigError(f"--cine-frames must be >= 1 and --cine-fps a finite number > 0, got {frames} and {fps}")
        path = write_cine(args.cine, seed=config.synth.seed, label=label, frames=frames, fps=fps,
                          size=config.synth.ultrasound_size)
        print(f"cine loop: {path} ({frames} frames at {fps:g} fps, {label} lesion)")
        return 0
    if args.out:
        config = dataclasses.replace(config, synth=dataclasses.replace(config.synth, out_dir=args.out))
    print(ensure_synth(config))
    if config.synth.sites >= 2:  # the multi-site set too (it was left out: synth.sites had no effect here)
        import shlex

        for source in ensure_synth_sites(config):
            name, path = source.split("=", 1)
            # as data.ultrasound takes a site (or msbt external, for a run that did not train on it)
            print(f"site {name}: {path}  (as a source: {shlex.quote(source)})")
    return 0


def _scan(args, config):
    from msbt.data.discovery import discover

    classes = tuple(args.classes) if args.classes else ()
    if len(set(classes)) != len(classes):
        raise ConfigError(f"--classes names a class twice: {' '.join(classes)}")
    d = config.data
    return discover(args.source, classes, strict=args.strict or d.strict, mask_suffixes=d.mask_suffixes,
                    sixteen_bit=d.sixteen_bit, max_pixels=d.max_pixels, on_partial=d.on_partial,
                    on_conflict=d.on_conflict)


def _cmd_scan(args) -> int:
    from msbt.data.discovery import DataError, dim_sixteen_bit, refuse_output_in_inputs, write_rejects
    from msbt.data.prepare import minority_warning

    if args.rejects:
        refuse_output_in_inputs(args.rejects, [args.source], "--rejects")
    config = _load(args)
    try:
        discovery = _scan(args, config)
    except DataError as err:  # the scan gave up (no usable image, a class without one): its rejects still say why
        if args.rejects and err.rejects:
            print(f"rejects manifest: {write_rejects(err.rejects, args.rejects)}")
        raise
    counts = ", ".join(f"{c} {n}" for c, n in discovery.counts().items())
    print(f"{len(discovery.records)} usable images ({counts}); {len(discovery.rejects)} rejected")
    for reason, n in sorted(discovery.skipped.items()):
        print(f"skipped {n}: {reason}")
    for reject in discovery.rejects:
        print(f"rejected {reject.path}: {reject.reason}")
    for warning in discovery.warnings:
        print(f"warning {warning.path}: {warning.reason} (used; data.on_partial: warn)")
    if dim := dim_sixteen_bit(discovery, config.data.sixteen_bit):
        print(f"warning: {dim}")
    if minority := minority_warning(discovery.counts(), "usable images"):
        print(minority)
    if args.rejects:
        print(f"rejects manifest: {write_rejects(discovery.rejects, args.rejects)}")
    return 0


def _cmd_split(args) -> int:
    from msbt.data.discovery import refuse_output_in_inputs, write_rejects
    from msbt.data.prepare import minority_warning, split_detail_lines, split_lines
    from msbt.data.splits import make_split, previous_rows, save_split

    refuse_output_in_inputs(args.out, [args.source], "--out")
    out = Path(args.out)
    if (out / "split.json").exists() and not args.force:
        raise ConfigError(f"{out}: a split is already saved there (use --force to replace it)")
    config = _load(args)
    discovery = _scan(args, config)
    d = config.data
    result = make_split(discovery, ratios=d.split, folds=d.folds, seed=d.seed, grouping=d.grouping,
                        max_distance=d.hash_max_distance, min_similarity=d.min_similarity,
                        tolerance=d.split_tolerance,
                        previous=previous_rows(out, seed=d.seed, ratios=d.split, folds=d.folds))
    save_split(result, out)
    write_rejects(discovery.rejects, out / "rejects.csv")
    # as the data step says it (this printed the summary's raw JSON); split.json holds all of it
    minority = minority_warning(discovery.counts(), "usable images")
    print("\n".join(split_lines(result.summary, "data", args.source, out, reused=False) +
                    (["  " + minority] if minority else []) + split_detail_lines(result.summary)))
    print(f"split saved to {out / 'split.csv'} (the whole summary: {out / 'split.json'})")
    return 0


def _cmd_ensemble(args) -> int:
    from msbt.jobs.ensemble import format_ensemble, make_ensemble

    for path in args.checkpoints:
        if not Path(path).is_dir():
            raise ConfigError(f"{path}: no such checkpoint folder")
    if args.store and not Path(args.store).is_dir():
        raise ConfigError(f"{args.store}: no such store folder (--store)")
    _quiet_tensorflow()
    print(format_ensemble(make_ensemble(args.checkpoints, args.out, store=args.store, n_boot=args.n_boot)))
    return 0


def _run_model(given: str, *, say: bool = True) -> tuple[str, Path | None]:
    """A run folder given where a stage-2 checkpoint is expected stands for the run's model (stage 2's
    recorded best checkpoint, or its average of seeds: msbt.jobs.pipeline.run_model), said on the terminal;
    anything else is returned as given. The checkpoints' own folder names (``checkpoint_2026-12-...``) need not
    be looked up, and a glob of them (several checkpoints) is not passed where one is meant.

    Returns:
        ``(model, run folder)``: the run folder when one was named (its metrics.json holds the model's threshold,
        also for a stage reused from another run's folder), else None."""
    folder = Path(given).expanduser()
    if not folder.is_dir() or (folder / "manifest.json").is_file() or not (folder / "config.yaml").is_file() \
            or not any((folder / name).exists() for name in ("stages.json", "stores")):
        return given, None
    import dataclasses

    from msbt.jobs.pipeline import run_model
    from msbt.train.stages import RunStateError

    resolved = folder.resolve()
    config = load_config([resolved / "config.yaml"])
    # where the folder is now (moved or copied since), set as values: a `--set` string would be read as YAML
    # (a run named 2026-12-01 became a date, a path with " #" lost its tail)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, storage_path=str(resolved.parent),
                                                                  name=resolved.name))
    try:
        model = run_model(config)
    except RunStateError as err:  # its advice names the workflows' --checkpoint, which these commands lack
        raise RunStateError(f"{given}: a run folder without a model of its own yet ({str(err).split('; ')[0]}); "
                            "finish its stage 2 first, or name a stage-2 checkpoint folder instead") from None
    if say:  # `say=False`: the command's own output names the model (export's line, lineage's chain)
        print(f"model: {model} (the model of run folder {given})", flush=True)
    return model, resolved


def _cmd_lineage(args) -> int:
    from msbt.model.checkpoint import format_lineage

    if not Path(args.path).exists():
        raise ConfigError(f"{args.path}: no such checkpoint")
    args.path = _run_model(args.path, say=False)[0]  # the chain printed below starts with it
    if Path(args.path).is_dir() and not (Path(args.path) / "manifest.json").is_file():
        found = sorted(p.name for p in Path(args.path).glob("checkpoint_*/manifest.json"))
        hint = f" (it holds checkpoints: {Path(args.path) / Path(found[-1]).parent.name}, ...)" if found else ""
        raise ConfigError(f"{args.path}: not a checkpoint folder (no manifest.json){hint}")
    text = format_lineage(args.path)
    print(text)
    # A broken chain is a failure a script must see: a checkpoint missing, or a model missing or changed since it
    # was recorded (the flags in brackets that msbt.model.checkpoint.format_lineage writes).
    if re.search(r"MISSING checkpoint |\[[^\]]*(CHANGED|MISSING)[^\]]*\]", text):
        print("msbt: error: the lineage is broken (MISSING or CHANGED above)", file=sys.stderr)
        return 1
    return 0


def _predict_parsers(sub) -> None:
    """`predict` and `export` (msbt.serve.predict, msbt.serve.export); see docs/predict.md."""
    p = sub.add_parser("predict", help="label new ultrasound images with a stage-2 model (probability, threshold, "
                       "optional Grad-CAM)")
    p.add_argument("model", help="stage-2 checkpoint folder (model.keras + manifest.json), a run folder (its "
                   "model), or an `msbt export` folder")
    p.add_argument("images", nargs="+", help="image files and folders (searched recursively; masks skipped)")
    p.add_argument("--out", metavar="CSV", help="write one row per file (predictions and rejects) here")
    p.add_argument("--heatmaps", metavar="DIR", help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the one the run chose on "
                   "validation, from its metrics.json; else 0.5)")
    _output_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write a stage-2 checkpoint as Keras model, TensorFlow SavedModel, ONNX and "
                       "OpenVINO IR for serving, each checked against Keras")
    p.add_argument("checkpoint", help="stage-2 checkpoint folder (model.keras + manifest.json), or a run folder "
                   "(its model)")
    p.add_argument("out_dir", help="new or empty folder for model.keras, manifest.json, saved_model/, model.onnx, "
                   "openvino/, export.json")
    p.add_argument("--threshold", type=float, help="threshold to record (default: the run's validation threshold)")
    p.add_argument("--int8", action="store_true", help="also an int8 model (ONNX Runtime and OpenVINO), calibrated "
                   "on the run's training split, kept only if its test-split AUC holds (--int8-max-auc-change)")
    p.add_argument("--int8-store", metavar="STORE", help="the run's ultrasound store (default: <run>/stores/ultrasound "
                   "beside the checkpoint's stage2/)")
    # --int8-max-auc-drop: its name until the bound became two-sided (2026-12-07); scripts that use it still run
    p.add_argument("--int8-max-auc-change", "--int8-max-auc-drop", type=float, metavar="D", dest="int8_max_auc_change",
                   help="largest accepted change of the test AUC, int8 against float32, either way (default 0.01)")
    _output_options(p)
    p.set_defaults(func=_cmd_export)


def _quiet_tensorflow() -> None:
    """For a command that loads a Keras model without a run folder to log into: TensorFlow's start-up notices
    (oneDNN, "failed call to cuInit" on every machine without a GPU) are held back, shown only if the import
    fails (msbt.console.captured_stderr)."""
    from msbt import console

    console.import_tensorflow()


def _cmd_predict(args) -> int:
    from msbt.data.discovery import refuse_output_in_inputs
    from msbt.serve.predict import format_lines, predict, write_csv

    for option, out in (("--out", args.out), ("--heatmaps", args.heatmaps)):
        if out:
            refuse_output_in_inputs(out, args.images, option)
    if args.heatmaps and Path(args.heatmaps).exists() and not Path(args.heatmaps).is_dir():  # before the model loads
        raise ConfigError(f"--heatmaps {args.heatmaps}: a file is there; --heatmaps names a folder for the PNGs")
    model, run_folder = _run_model(args.model)
    run = predict(model, args.images, threshold=args.threshold, heatmaps=args.heatmaps, run_folder=run_folder)
    print("\n".join(format_lines(run, model_said=run_folder is not None)))  # _run_model named it
    if args.out:
        print(f"predictions: {write_csv(run, args.out)}")
    if not run.predictions:
        found = "every image file was rejected" if run.rejects else \
            f"no image file in {', '.join(str(i) for i in args.images)}"
        print(f"msbt: error: no image could be predicted: {found}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args) -> int:
    import math

    from msbt.eval.metrics import threshold_text
    from msbt.serve.export import export

    if (args.int8_store or args.int8_max_auc_change is not None) and not args.int8:
        raise ConfigError("--int8-store and --int8-max-auc-change apply to --int8 only: add --int8, or leave them out")
    bound = 0.01 if args.int8_max_auc_change is None else args.int8_max_auc_change
    if not (math.isfinite(bound) and 0.0 <= bound <= 1.0):  # NaN or < 0 always refused int8, inf never checked
        raise ConfigError(f"--int8-max-auc-change must be an AUC difference in [0, 1], got {bound}")
    given = args.checkpoint
    args.checkpoint, run_folder = _run_model(args.checkpoint, say=False)
    _quiet_tensorflow()
    record = export(args.checkpoint, args.out_dir, threshold=args.threshold, int8=args.int8,
                    int8_store=args.int8_store, int8_max_auc_change=bound, run_folder=run_folder)
    of_run = f" (the model of run folder {given})" if run_folder else ""
    print(f"exported {args.checkpoint}{of_run} -> {args.out_dir} (model.keras, manifest.json, saved_model/, model.onnx, "
          f"openvino/, export.json); threshold {threshold_text(record['threshold']['value'])} from "
          f"{record['threshold']['source']}; model id {record['model_id']}")
    for name, e in record["engines"].items():
        if "max_abs_diff" not in e:  # e.g. bf16 on a CPU without it
            print(f"engine {name} ({e['precision']}): {e['note']}")
            continue
        reduced = ("" if e["precision"] == "f32" else
                   "; reduced precision, for information: no parity bound and no AUC check (f32 is what is checked)")
        print(f"engine {name} ({e['precision']}): max |p - p_keras| = {e['max_abs_diff']:.2e} on {e['frames']} "
              f"synthetic ultrasound frames{reduced}")
    int8 = record.get("int8")
    if int8:
        verdict = (f"kept: {int8['file']}, engines onnx and openvino with --precision int8" if int8["accepted"]
                   else f"refused (AUC change beyond ±{int8['max_auc_change']:g}): no int8 model written")
        print(f"int8: test AUC {int8['auc_f32']:.4f} (float32) -> {int8['auc_int8']:.4f} (int8), change "
              f"{int8['auc_change']:+.4f} on {int8['test_images']} test images ({int8['labels_changed']} labels "
              f"change at threshold {threshold_text(int8['threshold'])}; max |p_int8 - p_f32| {int8['max_abs_diff']:.3f}), "
              f"calibrated on {int8['calibration']['images']} training images; {verdict}")
    for note in record["notes"]:
        print(f"note: {note}")
    return 0


def _external_parser(sub) -> None:
    """`external` (msbt.serve.external, msbt.eval.external); see docs/evaluation.md."""
    p = sub.add_parser("external", help="score a trained run on other sites: metrics with CIs at the run's "
                       "threshold, threshold transfer, calibration, contamination check")
    p.add_argument("checkpoint", help="stage-2 checkpoint folder of a run, or the run folder (its model)")
    p.add_argument("sources", nargs="+", help="folders of class folders or CSV manifests, one site each "
                   "(NAME=PATH, or PATH: named after its folder)")
    p.add_argument("--out", help="folder that receives external/<site>/ (default: the checkpoint's run folder)")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the run's validation threshold)")
    p.add_argument("--keep-duplicates", action="store_true", help="also score near-duplicates of the run's "
                   "train/val images (default: excluded and counted)")
    _add_n_boot(p)
    _output_options(p)
    p.set_defaults(func=_cmd_external)


def _cmd_external(args) -> int:
    from msbt.data.discovery import refuse_output_in_inputs
    from msbt.eval.external import format_site
    from msbt.eval.report import RUN_MARKERS, write_report
    from msbt.serve.external import external
    from msbt.serve.predict import find_run_dir

    if args.out:  # the sources' paths: a NAME=PATH item is no path itself
        from msbt.data.sites import parse_sources

        refuse_output_in_inputs(args.out, [site.path for site in parse_sources(args.sources)], "--out")
    args.checkpoint, run_folder = _run_model(args.checkpoint)
    _quiet_tensorflow()
    results = external(args.checkpoint, args.sources, out=args.out, threshold=args.threshold,
                       keep_duplicates=args.keep_duplicates, n_boot=args.n_boot, run_folder=run_folder)
    for site, result in results.items():
        print("\n".join(format_site(site, result)))
    for note in next(iter(results.values()), {}).get("run_notes", []):
        print(f"note: {note}")
    folder = Path(args.out) if args.out else run_folder or find_run_dir(args.checkpoint)
    if any((folder / name).is_file() for name in RUN_MARKERS):
        print(f"results in {folder}/external/; report: {write_report(folder)}")
    else:  # --out is any folder: the results are complete without a report, which belongs to a run folder
        print(f"results in {folder}/external/ (not a run folder, so no report.html; `msbt report RUN` makes one "
              "for a run folder)")
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
    p.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32", help="f32 (default); bf16 "
                   "(openvino); int8 (onnx, openvino: an export made with --int8, whose AUC change export.json "
                   "records)")
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
    _output_options(p)
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
    for option, value in (("--threads", args.threads), ("--max-frames", args.max_frames)):
        if value is not None and value < 1:  # TensorFlow aborted on --threads -2; --max-frames 0 scored nothing
            raise ConfigError(f"{option} must be >= 1, got {value}")
    if not str(args.source).isdigit():  # a capture device index reads no folder
        from msbt.data.discovery import refuse_output_in_inputs

        out_csv = Path(args.out or "stream.csv")
        outputs = [("--out", out_csv), ("--video", args.video)]
        outputs += [("--heatmaps", out_csv.with_name(out_csv.stem + "-gradcam"))] if args.heatmaps else []
        for option, path in outputs:
            if path:  # frames written as PNGs into the folder being streamed would be read as frames next time
                refuse_output_in_inputs(path, [args.source], option)
    if args.engine in ("keras", "savedmodel") or args.heatmaps:  # TensorFlow runs them (ONNX, OpenVINO: not)
        _quiet_tensorflow()
    served = load_served(args.model, args.engine, precision=args.precision, threads=args.threads,
                         threshold=args.threshold)
    source = open_source(args.source, fps=args.fps, sixteen_bit=served.preparation.sixteen_bit)
    summary = stream(served.engine, source, served.preparation, served.threshold, served.class_names,
                     args.out or "stream.csv", smoothing=smoothing, pace=not args.all_frames, video=args.video,
                     heatmap_every=args.heatmaps, model_folder=args.model, max_frames=args.max_frames)
    summary.notes = served.notes + summary.notes
    print(format_summary(summary))
    return 0 if summary.frames_scored else 1


def _cmd_serve(args) -> int:
    import dataclasses

    config = _load(args).serve
    config = dataclasses.replace(config, **{k: v for k, v in (("host", args.host), ("port", args.port))
                                            if v is not None})
    if getattr(args, "verbose", False) and config.log_level not in ("DEBUG", "INFO"):
        config = dataclasses.replace(config, log_level="INFO")  # --verbose shows Serve's own lines too
    check_ranges(config, "command line (--host, --port)", "serve.")

    from msbt.raycluster import init_ray
    from msbt.serve import app

    app.application(args.model, config, threshold=args.threshold)  # folder, config, threshold: refused before Ray
    if args.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):  # the proxy will run on this machine
        app.check_port_free(config)
    init_ray(args.address)
    # said once the application answers, so that a request sent on reading it is served
    app.run(args.model, config, threshold=args.threshold, blocking=True, on_ready=lambda: print(
        f"serving {args.model} at {app.url(config)}/predict (GET /healthz); Ctrl-C stops it", flush=True))
    return 0


def _cmd_config(args) -> int:
    # every setting, also those the run's records leave out while at their default (config.ADDED_LATER)
    print(yaml.safe_dump(to_dict(_load(args), every_field=True), sort_keys=False), end="")
    return 0


def _experiment_parsers(sub) -> None:
    """`crossval`, `ablation`, `compare` (msbt.jobs.experiments) and `report` (msbt.eval.report).

    See docs/evaluation.md.
    """
    for name, text in (("crossval", "k-fold cross-validation of stage 2 over the saved group-aware folds"),
                       ("ablation", "the paper's Table 1: four stage-2 settings from one stage 1"),
                       ("compare", "multistage vs ImageNet-only vs from scratch, and naive vs group-aware split")):
        p = sub.add_parser(name, help=text)
        _config_options(p)
        p.add_argument("--address", help="Ray cluster to join (default: as for `run`)")
        p.add_argument("--fresh", action="store_true", help="delete this experiment's earlier results first "
                       "(default: arms with a metrics.json are reused)")
        _add_n_boot(p)
        if name == "crossval":
            p.add_argument("--scope", choices=("trainval", "all"), default="trainval",
                           help="trainval: folds over the train+val images, test split untouched (default); "
                                "all: every image (do not select on the result)")
            p.add_argument("--by", choices=("fold", "site"), default="fold",
                           help="fold: k group-aware folds (default); site: leave one site out, for every site")
        if name in ("crossval", "compare"):
            p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                           help="with --by site: repeat the design (compare: every arm) with these training seeds "
                                "(run.train_seed) on the same split, and summarise the mean and spread over them "
                                "(e.g. 0 1 2; default: run.stage2_seeds seeds counting up from the config's "
                                "training seed, run.train_seed else data.seed, which reuses a finished "
                                "single-seed run)")
        if name == "compare":
            p.add_argument("--arms", nargs="+", choices=("multistage", "imagenet", "scratch"),
                           default=["multistage", "imagenet", "scratch"], help="stage-2 starting points")
            p.add_argument("--no-naive", action="store_true", help="skip the naive-split arm")
            p.add_argument("--by", choices=("split", "site"), default="split",
                           help="split: the arms on the run's test split, and the naive-split arm (default); "
                                "site: the arms under leave one site out, paired per held-out site (no naive arm)")
        p.set_defaults(func=_cmd_experiment, experiment=name)
    p = sub.add_parser("loso-diff", help="leave-one-site-out results of several runs against the first, paired "
                       "per held-out site (did a lever help?)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (runs/<run.name>) with loso/loso.json, "
                   "or RUN_DIR:ARM for an arm of `compare --by site` (loso/compare.json), or A+B: their probabilities "
                   "averaged (an ensemble); the first is the baseline")
    _add_n_boot(p)
    p.add_argument("--out", help="also write the table as JSON here")
    _output_options(p)
    p.set_defaults(func=_cmd_loso_diff)
    p = sub.add_parser("report", help="(re)write a run folder's report.html")
    p.add_argument("run_dir", help="a run folder (runs/<run.name>)")
    _output_options(p)
    p.set_defaults(func=_cmd_report)


def _cmd_experiment(args) -> int:
    from msbt.jobs import experiments
    from msbt.runfolder import MODALITIES, run_dir, run_modalities
    from msbt.eval.report import write_report

    config = _load_run(args)
    if getattr(args, "seeds", None) and args.by != "site":
        raise ConfigError("--seeds repeats leave one site out (--by site); k-fold crossval and compare on the run's "
                          "split over seeds are not built")
    if args.experiment == "compare" and len(set(args.arms)) + (args.by == "split" and not args.no_naive) < 2:
        # one arm compares nothing, and its compare.json replaced the comparison of an earlier run in the same
        # folder (its arms are reused when asked for again)
        raise ConfigError(f"--arms {' '.join(args.arms)}: compare needs two arms or more (e.g. --arms multistage "
                          "imagenet); finished arms of an earlier comparison are reused, not trained again")
    if args.by == "site":
        experiments.check_several_sites(config)
    # compare's arms may start from stage 1 whatever the config says; the other experiments train its stage 2
    _preflight(config, MODALITIES if args.experiment == "compare" else run_modalities(config))
    _start_ray(args, config)
    from msbt.train.runner import check_workers_fit

    check_workers_fit(config.run, "the experiment's Ray Train workers")  # before its data step and first stage
    common = {"fresh": args.fresh, "n_boot": args.n_boot}
    if args.experiment == "crossval" and args.by == "site":
        experiments.leave_one_site_out(config, seeds=args.seeds, **common)
    elif args.experiment == "crossval":
        experiments.crossval(config, scope=args.scope, **common)
    elif args.experiment == "ablation":
        experiments.ablation(config, **common)
    elif args.by == "site":
        experiments.leave_one_site_out(config, arms=args.arms, seeds=args.seeds, **common)
    else:
        experiments.compare(config, arms=args.arms, naive=not args.no_naive, **common)
    print(f"report: {write_report(run_dir(config))}")
    return 0


def _cmd_loso_diff(args) -> int:
    import json

    from msbt.jobs import experiments

    if len(args.runs) < 2:
        raise ConfigError("loso-diff needs a baseline run folder and at least one other")
    for run in args.runs:
        for part in run.split("+"):
            folder, _, arm = part.rpartition(":")
            if not folder or arm not in experiments.COMPARE_ARMS:  # no ":ARM" suffix
                if folder and Path(folder).is_dir() and not Path(part).exists():  # RUN:ARM with an unknown arm
                    raise ConfigError(f"{part}: unknown arm {arm!r} (an arm of `compare --by site`: "
                                      f"{', '.join(experiments.COMPARE_ARMS)})")
                folder = part
            if not Path(folder).is_dir():
                raise ConfigError(f"{folder}: no such run folder")
    report = experiments.loso_diff(args.runs, n_boot=args.n_boot)
    print(experiments.format_loso_diff(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def _cmd_report(args) -> int:
    from msbt.eval.report import write_report

    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir}: no such run folder")
    _quiet_tensorflow()  # Grad-CAM loads the run's model
    print(write_report(args.run_dir))
    return 0


def _cmd_tune(args) -> int:
    from msbt.runfolder import run_dir, run_modalities
    from msbt.tune.review import format_ranking, read_experiment, write_best_overlay
    from msbt.tune.search import check_search, check_start, experiment_dir, run_search

    extra = ["tune.fast=true", "stage2.trainable_backbone=false"] if args.fast else []
    config = load_config(_configs(args), args.overrides + extra)
    sources = ", ".join([*args.config, *(["--set"] if args.overrides else [])]) or "the default config"
    run_dir(config)  # run.name and run.storage_path checked before Ray starts
    check_search(config, sources)  # and the search space (a reversed range failed after Ray's start-up)
    check_start(config, args.resume)  # an existing experiment without --resume
    _preflight(config, run_modalities(config))
    _start_ray(args, config)
    run_search(config, resume=args.resume, sources=sources)
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
    from msbt.tune.review import format_ranking, read_experiment, write_best_overlay

    print(format_ranking(*read_experiment(args.path)))
    print(f"best configuration: {write_best_overlay(args.path, args.out)}")
    _review(args.path, args.top_k)
    return 0


INTERRUPTED = ("finished steps and checkpoints are kept: rerun the same command with --resume to continue")


# Steps without --resume that keep what they finished and go on from there when run again (store chunks,
# finished folds and arms).
_CONTINUES = {"_cmd_preprocess", "_cmd_experiment"}


def _stop_line(args, how: str) -> str:
    """The line a stopped command ends with; what to do next only where there is something to continue
    (serve, stream, predict or scan have nothing to resume, and no --resume)."""
    if hasattr(args, "resume"):
        return f"msbt: {how}; {INTERRUPTED}"
    if getattr(args.func, "__name__", "") in _CONTINUES:
        if getattr(args, "fresh", False):  # the same command would delete what this one finished
            return f"msbt: {how}; finished steps are kept: rerun the command without --fresh to continue"
        return f"msbt: {how}; finished steps are kept: rerun the same command to continue"
    return f"msbt: {how}"


class Stopped(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, ``kill``, a scheduler's pre-emption), unwound like Ctrl-C."""


_sigterm = {"seen": False}  # set by the SIGTERM handler of the command running on the main thread (main)


def _stop_on_sigterm(line: str = f"msbt: stopped (SIGTERM); {INTERRUPTED}"):
    """Turn SIGTERM into :class:`Stopped`, saying so at once.

    ``ray job stop`` sends the job's driver SIGTERM and SIGKILL 3 s later (``RAY_JOB_STOP_WAIT_TIME_S``);
    Python's default for SIGTERM is to die without a word or a ``finally``. The line is printed in the
    handler, before the clean-up that the exception then runs, so it reaches the job's log even when the
    SIGKILL comes first.

    The handler also records that it ran (``_sigterm``): an exception raised in a signal handler can reach
    ``main`` as another type. Ray's blocking ``ray.get`` on the main thread runs pending handlers itself and
    raises a plain ``KeyboardInterrupt`` for a ``KeyboardInterrupt`` of any kind (measured: SIGTERM during a stage gave
    exit 130 and the Ctrl-C line after this one).

    Returns:
        The handler it replaced (``main`` puts it back when the command returns).
    """
    import signal

    import os

    from msbt import console

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        # the flag only (a worker line being written is finished first, waited for at most 1 s): no new worker
        # line below this one
        console.hide_worker_output(drop_bars=False)
        # os.write, not print: the main thread may be inside a write to stderr (a progress bar), and a
        # reentrant print would raise instead of saying this
        os.write(2, f"{line}\n".encode())
        _sigterm["seen"] = True  # a plain assignment: no lock taken inside a signal handler
        raise Stopped()

    return signal.signal(signal.SIGTERM, handler)


def _add_n_boot(p: argparse.ArgumentParser) -> None:
    """The bootstrap's ``--n-boot``, refused at parsing when below 1: a command that trains first failed only
    at its first interval, after the training."""
    p.add_argument("--n-boot", type=_resamples, default=2000, help="bootstrap resamples (default 2000)")


def _resamples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `msbt` console script."""
    import signal

    from msbt import console

    args = build_parser().parse_args(argv)
    # File names that are not UTF-8 reach messages as surrogates: print their bytes back as they are
    # (what `ls` does) instead of failing with "surrogates not allowed".
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    # Before anything imports TensorFlow or Ray: their notices go to the run's log file (see msbt.console).
    console.setup(verbose=args.verbose, debug=args.debug)
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    if main_thread:
        _sigterm["seen"] = False
    previous = _stop_on_sigterm(_stop_line(args, "stopped (SIGTERM)")) if main_thread else None

    def stopped() -> bool:  # SIGTERM reached this command, whatever became of its exception on the way
        return main_thread and _sigterm["seen"]

    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not in the interpreter's exit, so that a reader gone away is seen below
        return code
    except Stopped:
        console.hide_worker_output()  # outside the handler: the bars on the screen dropped too
        return 143  # 128 + SIGTERM, what a shell reports; the line was printed by the handler
    except BrokenPipeError as exc:
        if not _stdout_gone() or args.debug:  # another pipe or socket broke: an error like any other
            if args.debug:
                raise
            print(f"msbt: error: {exc}", file=sys.stderr)
            return 1
        # the reader of the output went away (`msbt lineage ... | head`): nothing to tell it; stdout points at
        # devnull so that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports
    except KeyboardInterrupt:
        if stopped():  # Stopped, turned into a plain KeyboardInterrupt on its way (see _stop_on_sigterm)
            console.hide_worker_output()
            return 143
        # Ctrl-C (or `ray job stop` with RAY_JOB_STOP_SIGNAL=SIGINT): one line, not a traceback; what
        # finished is on disk. It stays the last line: no worker's bar is drawn below it.
        console.hide_worker_output()
        sys.stderr.write(_stop_line(args, "interrupted") + "\n")  # not print(): Ray patches it to redraw the bars
        return 130
    except Exception as exc:  # one clear line for users; --debug shows where it came from
        if args.debug:
            raise
        if stopped():  # Stopped, wrapped by a library into an error of its own: the SIGTERM line was printed
            console.hide_worker_output()
            return 143
        message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        # The last line, as after Ctrl-C: a failed worker's traceback, forwarded by Ray after the driver has its
        # error, had been printed below it (workers.log keeps it)
        console.hide_worker_output()
        print(f"msbt: error: {message}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            _sigterm["seen"] = False


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll on this platform
        return False


if __name__ == "__main__":
    sys.exit(main())
