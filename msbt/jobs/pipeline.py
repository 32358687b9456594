"""The main job, one step after another: data -> patches/arrays -> stage 1 -> stage 2 -> test metrics.

It resolves the data (the user's folders, or the built-in synthetic set), scans and validates them,
groups near-duplicates and saves the leakage-safe split of each modality into the run folder with the
resolved config beside it; builds the Parquet stores with Ray Data; trains stage 1 and stage 2 with Ray
Train; and scores the stage-2 model on the test split at a threshold chosen on validation. A rerun
reuses the saved split and finished stores; with `resume=True` it also reuses finished stages and
continues an interrupted one (msbt.train.stages), and without it a run folder holding a trained stage is refused.

The steps are also jobs of their own (`stage1_job`, `stage2_job`, `evaluate_job`: one workflow script
each), linked through the run folder's `stages.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from msbt.config import Config, dump_config, to_dict
from msbt.data.discovery import Discovery, discover, write_rejects
from msbt.data.scan import scan_inspector
from msbt.data.splits import SplitResult, load_split, make_split, save_split

log = logging.getLogger(__name__)


def run_dir(config: Config) -> Path:
    """The folder every result of this run goes to: `<run.storage_path>/<run.name>`."""
    return (Path(config.run.storage_path).expanduser() / config.run.name).resolve()


def synth_dir(config: Config) -> Path:
    """Where the built-in data for these synth settings live (a cache keyed by the settings)."""
    if config.synth.out_dir:
        return Path(config.synth.out_dir).expanduser().resolve()
    settings = json.dumps({k: v for k, v in to_dict(config.synth).items() if k != "out_dir"}, sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "msbt" / "synth" / key


def ensure_synth(config: Config) -> Path:
    """Generate the built-in data set if it is not there yet; return its folder."""
    from msbt.data import synth  # numpy/OpenCV only; imported here so `msbt --help` stays fast

    out = synth_dir(config)
    s = config.synth
    synth.generate(
        out,
        seed=s.seed,
        fields_per_line=s.fields_per_line,
        field_size=s.field_size,
        lesions_per_class=s.lesions_per_class,
        frames_per_lesion=tuple(s.frames_per_lesion),
        ultrasound_size=s.ultrasound_size,
    )
    return out


@dataclass(frozen=True)
class PreparedData:
    modality: str
    source: str
    folder: Path  # run-folder subfolder with split.csv, split.json, rejects.csv
    discovery: Discovery
    split: SplitResult
    reused: bool


def data_sources(config: Config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Modality -> (data source, classes to keep), with the built-in data filling what the user left empty."""
    micro, ultra = config.data.microscope, config.data.ultrasound
    if not micro or not ultra:
        built_in = ensure_synth(config)
        micro = micro or str(built_in / "microscope")
        ultra = ultra or str(built_in / "ultrasound")
    return {
        "microscope": (micro, tuple(config.data.microscope_classes)),
        "ultrasound": (ultra, tuple(config.data.ultrasound_classes)),
    }


def prepare_data(config: Config, *, force_split: bool = False,
                 modalities: Sequence[str] = ("microscope", "ultrasound")) -> dict[str, PreparedData]:
    """Scan, validate, group and split the modalities; save everything into the run folder.

    Args:
        config: the resolved config.
        force_split: make a new split even if the run folder holds one (the old one is overwritten).
        modalities: which of "microscope" (stage 1) and "ultrasound" (stage 2) to prepare.

    Returns:
        Modality -> PreparedData.
    """
    out = run_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    prepared = {}
    for modality, (source, classes) in data_sources(config).items():
        if modality in modalities:
            prepared[modality] = _prepare_one(config, modality, source, classes, out / "data" / modality,
                                              force_split)
    return prepared


def _prepare_one(config: Config, modality: str, source: str, classes, folder: Path, force: bool) -> PreparedData:
    d = config.data
    log.info("scanning %s data in %s", modality, source)
    discovery = discover(
        source, classes, strict=d.strict, mask_suffixes=d.mask_suffixes, sixteen_bit=d.sixteen_bit,
        inspect_all=scan_inspector(d.scan, d.scan_ray_min_files),
    )
    write_rejects(discovery.rejects, folder / "rejects.csv")
    for reject in discovery.rejects:
        log.warning("rejected %s: %s", reject.path, reject.reason)
    # Microscope fields are cut into patches later; the split is by field, and auto-grouping still
    # catches a field saved twice.
    if (folder / "split.json").exists() and not force:
        split, reused = load_split(folder, discovery), True
    else:
        split = make_split(
            discovery,
            ratios=d.split,
            folds=d.folds,
            seed=d.seed,
            grouping=d.grouping,
            max_distance=d.hash_max_distance,
            min_similarity=d.min_similarity,
        )
        save_split(split, folder)
        reused = False
    return PreparedData(modality, str(source), folder, discovery, split, reused)


def summarize(prepared: dict[str, PreparedData]) -> str:
    """A short human-readable account of the prepared data, for the job log."""
    lines = []
    for p in prepared.values():
        s = p.split.summary
        g = s["groups"]
        counts = ", ".join(
            f"{split} " + "/".join(str(s["counts"][split].get(c, 0)) for c in s["classes"])
            for split in ("train", "val", "test")
        )
        lines += [
            f"{p.modality}: {s['images']} images in {len(s['classes'])} classes ({', '.join(s['classes'])}) "
            f"from {p.source}; {s['rejects']} rejected (see {p.folder / 'rejects.csv'})",
            f"  split ({'reused' if p.reused else 'new'}, seed {s['seed']}): {counts}",
            f"  groups: {g['count']} ({g['multi_image']} with several images, largest {g['largest']}, "
            f"{len(g['mixed_label'])} mixing classes)",
            f"  a naive random split would leak {s['leakage']['naive_random']['val']} val and "
            f"{s['leakage']['naive_random']['test']} test images; this split leaks "
            f"{s['leakage']['group_aware']['val'] + s['leakage']['group_aware']['test']}",
        ]
    return "\n".join(lines)


def preprocess(config: Config, prepared: dict[str, PreparedData]) -> dict:
    """Build the Parquet stores of both modalities with Ray Data (Ray must be initialised)."""
    from msbt.data import preprocess as pp

    stores = run_dir(config) / "stores"
    out = {}
    for modality, data in prepared.items():
        d = data.discovery
        items = pp.split_items(data.folder, d.root, d.classes, config.data.seed)
        build = pp.build_microscope_store if modality == "microscope" else pp.build_ultrasound_store
        summary = build(items, stores / modality, config.preprocess, config.data.sixteen_bit)
        if modality == "microscope":
            pp.write_contact_sheets(summary.path, items, d.classes, pp.patch_params(config.preprocess))
        out[modality] = summary
    return out


def summarize_stores(stores: dict) -> str:
    lines = []
    for modality, s in stores.items():
        noun = "patches" if modality == "microscope" else "images"
        per_split = "; ".join(
            f"{split} " + ", ".join(f"{c} {n}" for c, n in sorted(s.rows.get(split, {}).items()))
            for split in ("train", "val", "test")
        )
        lines.append(f"{modality} store: {sum(sum(v.values()) for v in s.rows.values())} {noun} from {s.files} "
                     f"files in {s.seconds:.1f} s ({per_split}) -> {s.path}")
        if s.empty_sources:
            lines.append(f"  {len(s.empty_sources)} files gave no {noun} (no cells found, or unreadable): "
                         f"{', '.join(s.empty_sources[:5])}{' ...' if len(s.empty_sources) > 5 else ''}")
    return "\n".join(lines)


def train_and_evaluate(config: Config, stores: dict, *, resume: bool = False) -> dict:
    """Stage 1 (cell lines) and stage 2 (ultrasound, from stage 1's best checkpoint) with Ray Train, then
    the stage-2 model on the test split. Ray must be initialised.

    Args:
        config: The resolved config.
        stores: Modality -> store summary (from :func:`preprocess`).
        resume: Reuse finished stages and continue an interrupted one (msbt.train.stages.run_stage).

    Returns:
        ``stage1``/``stage2``: best checkpoint folders; ``stages``: their stages.json entries;
        ``evaluation``: the test metrics (also in metrics.json); ``metrics_file``.
    """
    from msbt.train.stages import run_stage

    stage1 = run_stage(config, 1, stores["microscope"].path, resume=resume)
    stage2 = run_stage(config, 2, stores["ultrasound"].path, parent=stage1["checkpoint"], resume=resume)
    evaluation = evaluate_checkpoint(config, stage2["checkpoint"], stores["ultrasound"].path)
    return {
        "stage1": stage1["checkpoint"],
        "stage2": stage2["checkpoint"],
        "stages": {"1": stage1, "2": stage2},
        "evaluation": evaluation,
        "metrics_file": str(run_dir(config) / "metrics.json"),
    }


def evaluate_checkpoint(config: Config, checkpoint: str | Path, store: str | Path) -> dict:
    """Print a stage-2 checkpoint's lineage and test metrics; write them to the run's metrics.json."""
    from msbt.model.checkpoint import format_lineage
    from msbt.eval.evaluate import evaluate, format_report, write_metrics

    print(format_lineage(checkpoint))
    result = evaluate(checkpoint, store, seed=config.data.seed)
    write_metrics(result, run_dir(config) / "metrics.json")
    print(format_report(result), flush=True)
    from msbt.eval.report import write_report  # every evaluated run gets its self-contained report.html

    print(f"report: {write_report(run_dir(config))}", flush=True)
    return result


def main_job(config: Config, *, force_split: bool = False, resume: bool = False) -> dict:
    """Everything the README's main command runs; returns a JSON-able summary. Ray must be initialised.

    Args:
        config: The resolved config.
        force_split: Make a new split even if the run folder holds one.
        resume: Continue a stopped run (see msbt.train.stages); without it a run folder holding a trained
            stage is refused before any work starts.
    """
    from msbt.train.stages import refuse_rerun

    if not resume:
        refuse_rerun(config)
    prepared = prepare_data(config, force_split=force_split)
    print(summarize(prepared), flush=True)
    stores = preprocess(config, prepared)
    print(summarize_stores(stores), flush=True)
    result = {
        "run_dir": str(run_dir(config)),
        "data": {m: p.split.summary for m, p in prepared.items()},
        "stores": {m: s.as_dict() for m, s in stores.items()},
        "training": train_and_evaluate(config, stores, resume=resume),
    }
    _write_summary(config, result)
    return result


def _write_summary(config: Config, result: dict) -> None:
    (run_dir(config) / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"results in {run_dir(config)}")


# ---------------------------------------------------------------------------------------------------
# One job per step (workflows/stage1.py, stage2.py, evaluate.py), linked through stages.json


def _data(config: Config, modality: str, force_split: bool):
    prepared = prepare_data(config, force_split=force_split, modalities=(modality,))
    print(summarize(prepared), flush=True)
    stores = preprocess(config, prepared)
    print(summarize_stores(stores), flush=True)
    return stores[modality]


def recorded_checkpoint(config: Config, number: int) -> str:
    """The best checkpoint of a finished stage of this run, from stages.json.

    Raises:
        RunStateError: The stage has not finished in this run folder; says which step to run first.
    """
    from msbt.train.stages import STAGES_FILE, RunStateError, read_stages

    recorded = read_stages(config).get(str(number))
    if recorded is None:
        option = "--parent" if number == 1 else "--checkpoint"
        raise RunStateError(f"{run_dir(config) / STAGES_FILE}: no finished stage {number} in run "
                            f"{config.run.name!r}; run workflows/stage{number}.py with the same config first, "
                            f"or give {option} CHECKPOINT")
    return recorded["checkpoint"]


def stage1_job(config: Config, *, force_split: bool = False, resume: bool = False) -> dict:
    """Microscope data and store, then stage 1; returns its stages.json entry. Ray must be initialised."""
    from msbt.train.stages import refuse_rerun, run_stage

    if not resume:
        refuse_rerun(config, [1])
    store = _data(config, "microscope", force_split)
    return run_stage(config, 1, store.path, resume=resume)


def stage2_job(config: Config, *, parent: str | Path | None = None, force_split: bool = False,
               resume: bool = False) -> dict:
    """Ultrasound data and store, then stage 2 from ``parent`` or from stage 1's recorded best checkpoint.

    Returns:
        Stage 2's stages.json entry.

    Raises:
        RunStateError: No parent given and no finished stage 1 recorded in this run folder.
    """
    from msbt.train.stages import refuse_rerun, run_stage

    if not resume:
        refuse_rerun(config, [2])
    parent = parent or recorded_checkpoint(config, 1)
    store = _data(config, "ultrasound", force_split)
    return run_stage(config, 2, store.path, parent=str(Path(parent).expanduser().resolve()), resume=resume)


def evaluate_job(config: Config, *, checkpoint: str | Path | None = None) -> dict:
    """Test metrics of ``checkpoint`` or of stage 2's recorded best; written to metrics.json.

    Raises:
        RunStateError: No checkpoint given and no finished stage 2 recorded in this run folder.
    """
    checkpoint = checkpoint or recorded_checkpoint(config, 2)
    store = _data(config, "ultrasound", force_split=False)
    return evaluate_checkpoint(config, checkpoint, store.path)
