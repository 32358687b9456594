"""The run's data, made once: scan and validate the sources, split them, build the Parquet stores.

Two ways in:

* :func:`prepare_data` + :func:`build_stores` (the data step: ``msbt preprocess`` and the main job) scan
  every file, check a saved split against the data (changed data is refused, not silently re-split) and
  build, resume or reuse the stores;
* :func:`ensure_stores` (every later step: stages, evaluation, Tune, the experiments) opens the recorded
  split and stores when they match the config, reading no image file at all, and falls back to the data
  step only when something is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from msbt.config import Config, ConfigError, dump_config, to_dict
from msbt.data import synth
from msbt.data.balance import MINORITY_RATIO, minority_classes
from msbt.data.discovery import Discovery, check_source, dim_sixteen_bit, discover, write_rejects
from msbt.data.scan import scan_inspector
from msbt.data.profile import profile_from_store, write_profile
from msbt.data.sites import discover_sites, parse_sources
from msbt.data.splits import SplitResult, load_split, make_split, previous_rows, save_fingerprints, save_split
from msbt.data.store import Store, StoreError, StoreSummary, matches
from msbt.provenance import write_environment
from msbt.runfolder import CONFIG_FILE, MODALITIES, data_dir, run_dir, store_dir

log = logging.getLogger(__name__)


def synth_dir(config: Config) -> Path:
    """Where the built-in data for these synth settings live (a cache keyed by the settings)."""
    if config.synth.out_dir:
        return Path(config.synth.out_dir).expanduser().resolve()
    settings = json.dumps({k: v for k, v in to_dict(config.synth).items() if k != "out_dir"}, sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "msbt" / "synth" / key


def ensure_synth(config: Config) -> Path:
    """Generate the built-in data set if it is not there yet; return its folder."""

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


def ensure_synth_sites(config: Config) -> list[str]:
    """The built-in multi-site ultrasound set (``synth.sites`` >= 2) as ``NAME=PATH`` sources."""
    from msbt.data import sitesynth

    s = config.synth
    out = synth_dir(config) / "sites"
    summary = sitesynth.generate_sites(out, sites=s.sites, seed=s.seed, lesions_per_class=s.lesions_per_class,
                                       frames_per_lesion=tuple(s.frames_per_lesion), size=s.ultrasound_size)
    return [f"{name}={path}" for name, path in summary["sites"].items()]


@dataclass(frozen=True)
class PreparedData:
    modality: str
    source: str
    folder: Path  # run-folder subfolder with split.csv, split.json, rejects.csv
    discovery: Discovery
    split: SplitResult
    reused: bool


def data_sources(config: Config, modalities: Sequence[str] = MODALITIES) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Modality -> (data source, classes to keep) for ``modalities``, the built-in data filling what the user left
    empty. The built-in data are generated only for a modality asked for: a lab that prepares its own microscope
    collection alone (``msbt preprocess --only microscope``) gets no synthetic ultrasound made beside it."""
    built_in: list[Path] = []

    def synth_root() -> Path:  # generated once, when first needed
        if not built_in:
            built_in.append(ensure_synth(config))
        return built_in[0]

    out = {}
    if "microscope" in modalities:
        out["microscope"] = (config.data.microscope or str(synth_root() / "microscope"),
                             tuple(config.data.microscope_classes))
    if "ultrasound" in modalities:
        ultra = config.data.ultrasound
        if not ultra:
            ultra = (tuple(ensure_synth_sites(config)) if config.synth.sites >= 2
                     else str(synth_root() / "ultrasound"))
        out["ultrasound"] = (ultra, tuple(config.data.ultrasound_classes))
    return out


def check_data(config: Config, modalities: Sequence[str] = MODALITIES, *, always: bool = False) -> None:
    """Fail fast: the data folders or manifests the config names, checked without reading an image
    (msbt.data.discovery.check_source), before Ray starts; the full scan follows in :func:`prepare_data`.

    Args:
        config: The resolved config.
        modalities: The modalities a step needs.
        always: Check even a modality whose recorded split and store fit (the data step scans anyway);
            otherwise such a modality is skipped: a later step reads none of its data.
    """
    for modality in modalities:
        source = config.data.microscope if modality == "microscope" else config.data.ultrasound
        if not source and modality == "ultrasound" and config.data.grouping == "manifest":
            # the built-in ultrasound data is a folder: refused here, not after Ray's start and the microscope scan
            raise ConfigError("data.grouping: manifest needs data.ultrasound to be a CSV manifest with a group column "
                              "(the built-in ultrasound data is a folder); data.grouping: auto also joins the groups "
                              "of a manifest's group column")
        if not source or (not always and recorded_store(config, modality) is not None):
            continue
        if modality == "microscope":
            check_source(source, config.data.microscope_classes, min_classes=2)
            continue
        for site in parse_sources(source):  # one source or several named sites (msbt.data.sites)
            check_source(site.path, config.data.ultrasound_classes,
                         group_column=config.data.grouping == "manifest")


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
    prepared = {}
    for modality, (source, classes) in data_sources(config, modalities).items():
        prepared[modality] = _prepare_one(config, modality, source, classes, data_dir(config, modality), force_split)
    # after the data were accepted: a refused rerun (changed data) leaves the run's config.yaml as it was
    dump_config(config, out / CONFIG_FILE)
    write_environment(out)
    return prepared


def _prepare_one(config: Config, modality: str, source: str, classes, folder: Path, force: bool) -> PreparedData:
    d = config.data
    log.info("scanning %s data in %s", modality, source)
    options = dict(strict=d.strict, mask_suffixes=d.mask_suffixes, sixteen_bit=d.sixteen_bit,
                   max_pixels=d.max_pixels, on_partial=d.on_partial, on_conflict=d.on_conflict,
                   # driver threads, or Ray Data tasks for a large collection (msbt.data.scan)
                   inspect_all=scan_inspector(d.scan, d.scan_ray_min_files))
    if modality == "ultrasound":  # one source or several named sites (msbt.data.sites)
        discovery = discover_sites(source, classes, **options)
    else:
        discovery = discover(source, classes, **options)
    write_rejects(discovery.rejects, folder / "rejects.csv")
    for reject in discovery.rejects:
        log.warning("rejected %s: %s", reject.path, reject.reason)
    for warning in discovery.warnings:
        log.warning("used in part %s: %s (data.on_partial: warn)", warning.path, warning.reason)
    if dim := dim_sixteen_bit(discovery, d.sixteen_bit):
        log.warning("%s: %s", modality, dim)
    # Microscope fields are cut into patches later; the split is by field, and auto-grouping still
    # catches a field saved twice.
    grouping = d.grouping
    if grouping == "manifest" and modality == "microscope" and not Path(source).is_file():
        # data.grouping is meant for the user's (ultrasound) manifest; a microscope folder, such as the built-in
        # cell images, has no group column to follow, and it once stopped every run that set it
        log.info("microscope: %s is a folder, not a manifest: grouped by near-duplicates (data.grouping: manifest "
                 "applies to manifests)", source)
        grouping = "auto"
    if (folder / "split.json").exists() and not force:
        split, reused = load_split(folder, discovery), True
        if grouping == "auto" and "manifest_joined" not in split.summary.get("groups", {}) and any(
                r.group for r in discovery.records):
            log.warning("%s: this split was made before msbt joined a manifest's group column under data.grouping: "
                        "auto (2026-12-07), so its groups ignore the column; --force-split re-splits with it (groups "
                        "of the old split keep their place)", folder / "split.json")
    else:
        split = make_split(
            discovery,
            ratios=d.split,
            folds=d.folds,
            seed=d.seed,
            grouping=grouping,
            max_distance=d.hash_max_distance,
            min_similarity=d.min_similarity,
            tolerance=d.split_tolerance,
            # a re-split over a saved one (--force-split) keeps the old groups where they were
            previous=previous_rows(folder, seed=d.seed, ratios=d.split, folds=d.folds),
        )
        split.summary["source"] = source_key(config, modality)  # what ensure_stores compares
        save_split(split, folder)
        reused = False
    if modality == "ultrasound":  # for the contamination check of msbt.eval.external
        save_fingerprints(discovery, folder)
    return PreparedData(modality, str(source), folder, discovery, split, reused)


STAGE_OF = {"microscope": 1, "ultrasound": 2}  # the stage that trains on a modality


def minority_warning(counts: dict[str, int], noun: str, stage: int | None = None, balance: str | None = None) -> str | None:
    """A warning line for classes with a quarter or less of the largest class's ``noun`` (`MINORITY_RATIO`), naming
    ``stage<stage>.balance: class``; None when no class is that small.

    Args:
        counts: Class -> files or patches.
        noun: What is counted ("source files", "training patches").
        stage: The stage that trains on them (None: either, as for ``msbt scan``).
        balance: That stage's ``balance`` setting, when known: a set one is said instead of suggested.
    """
    small = minority_classes(counts)
    if not small:
        return None
    largest = max(counts, key=lambda c: counts[c])
    few = ", ".join(f"{c} ({counts[c]})" for c in small)
    key = f"stage{stage}.balance" if stage else "stage1.balance (microscope) or stage2.balance (ultrasound)"
    setting = (f"--set {key}=class" if stage else
               "--set stage1.balance=class (microscope) or --set stage2.balance=class (ultrasound)")
    if balance and balance != "none":
        advice = f"{key} is {balance}: each class weighs alike in the training loss"
    else:
        advice = (f"set {setting} so that each class weighs alike in the training loss (docs/models.md); "
                  "more images of the class help more")
    return (f"warning: few {noun} of {few} against {counts[largest]} of {largest} (1:{MINORITY_RATIO} or fewer): an "
            f"unweighted loss lets {largest} decide; {advice}")


def small_fields_warning(discovery: Discovery, patch_size: int) -> str | None:
    """A warning line for microscope fields narrower or lower than ``preprocess.patch_size``; None when none is.

    A patch is cut at ``patch_size`` around a cell and the part outside the field is mirror padding
    (msbt.images.patches), so a field smaller than a patch gives patches made mostly of its own reflections:
    patterns no microscope shows, for stage 1 to learn. (Fields below 8 px are rejected by the scan.)
    """
    small = sorted((r for r in discovery.records if min(r.width, r.height) < patch_size),
                   key=lambda r: (min(r.width, r.height), r.relpath))
    if not small:
        return None
    first = small[0]
    side = min(first.width, first.height)
    advice = (f"set --set preprocess.patch_size={side} (or less) for such fields, or bring the whole fields"
              if side >= 16 else  # preprocess.patch_size takes >= 16
              "fields under 16 px are too small for any patch size msbt takes (>= 16): bring the whole fields, or "
              "leave those out")
    return (f"warning: {len(small)} of {len(discovery.records)} microscope fields are smaller than the "
            f"{patch_size} px patches (preprocess.patch_size) in width or height (smallest {first.width}x"
            f"{first.height} px, {first.relpath}): their patches are mostly mirror padding of the field; {advice}")


def _balance(config: Config | None, modality: str) -> str | None:
    if config is None:
        return None
    return (config.stage1 if STAGE_OF[modality] == 1 else config.stage2).balance


def split_lines(summary: dict, name: str, source: str, folder: Path, reused: bool) -> list[str]:
    """The data step's account of one saved split (``split.json``'s summary): images, split counts, groups and
    leakage. The data step and ``msbt split`` print it (``msbt split`` printed the summary's raw JSON)."""
    s, g = summary, summary["groups"]
    counts = ", ".join(
        f"{split} " + "/".join(str(s["counts"][split].get(c, 0)) for c in s["classes"])
        for split in ("train", "val", "test")
    )
    return [
        f"{name}: {s['images']} images in {len(s['classes'])} classes ({', '.join(s['classes'])}) "
        f"from {source}; {s['rejects']} rejected (see {folder / 'rejects.csv'})",
        f"  split ({'reused' if reused else 'new'}, seed {s['seed']}): {counts}",
        f"  groups: {g['count']} ({g['multi_image']} with several images, largest {g['largest']}, "
        f"{len(g['mixed_label'])} mixing classes"
        + (f"; {g['identical_joined']} of the given groups merged into others because they share a "
           "byte-identical file" if g.get("identical_joined") else "")
        + (f"; {g['manifest_joined']} merged by the manifest's group column" if g.get("manifest_joined") else "")
        + ")",
        f"  a naive random split would leak {s['leakage']['naive_random']['val']} val and "
        f"{s['leakage']['naive_random']['test']} test images; this split leaks "
        f"{s['leakage']['group_aware']['val'] + s['leakage']['group_aware']['test']}",
    ]


def split_detail_lines(summary: dict) -> list[str]:
    """What a split's account adds after any warnings: files left out on purpose, and per-site counts."""
    s, lines = summary, []
    if s.get("skipped"):  # on purpose (a class not selected, masks), but the user should see how many
        lines.append("  left out: " + ", ".join(f"{n} ({reason})" for reason, n in sorted(s["skipped"].items())))
    if len(s.get("sites", {})) > 1:
        for site, per in s["sites"].items():
            lines.append(f"  site {site}: " + ", ".join(
                f"{split} " + "/".join(str(per[split].get(c, 0)) for c in s["classes"]) for split in per))
        cross = s.get("cross_site_duplicates", {})
        lines.append(f"  near-duplicates across sites: {cross.get('pairs', 0)} pairs ({cross.get('images', 0)} "
                     "images), reported in split.json, not merged into groups")
    return lines


def summarize(prepared: dict[str, PreparedData], config: Config | None = None) -> str:
    """A short human-readable account of the prepared data, for the job log.

    Args:
        prepared: What :func:`prepare_data` returned.
        config: The run's config, to say a stage's ``balance`` where a class is a small minority.
    """
    lines = []
    for p in prepared.values():
        s = p.split.summary
        lines += split_lines(s, p.modality, p.source, p.folder, p.reused)
        files = {c: sum(s["counts"][split].get(c, 0) for split in ("train", "val", "test")) for c in s["classes"]}
        if minority := minority_warning(files, "source files" if p.modality == "microscope" else "images",
                                        STAGE_OF[p.modality], _balance(config, p.modality)):
            lines.append("  " + minority)
        if p.modality == "microscope" and config is not None and (
                small := small_fields_warning(p.discovery, config.preprocess.patch_size)):
            lines.append("  " + small)
        lines += split_detail_lines(s)
    return "\n".join(lines)


def build_stores(config: Config, prepared: dict[str, PreparedData]) -> dict[str, StoreSummary]:
    """Build (or resume, or reuse) the Parquet stores of the prepared modalities (Ray Data, or the driver's
    threads for a small collection: `preprocess.build`).

    Ray Data needs Ray initialised. Microscope stores also get their contact sheets.
    """
    from msbt.data import preprocess as pp

    out = {}
    for modality, data in prepared.items():
        d = data.discovery
        items = pp.split_items(data.folder, d.root, d.classes, config.data.seed)
        if modality == "ultrasound":
            _with_sites(items, d)
        build = pp.build_microscope_store if modality == "microscope" else pp.build_ultrasound_store
        settings = config.preprocess
        if not data.reused and settings.on_existing == "resume":
            # a split made in this step (--force-split): a store of the run's old split is stale, not to be mixed in
            settings = dataclasses.replace(settings, on_existing="replace")
        summary = build(items, store_dir(config, modality), settings, config.data.sixteen_bit, classes=d.classes)
        if modality == "microscope":
            pp.write_contact_sheets(summary.path, items, d.classes, pp.patch_params(config.preprocess),
                                    sixteen_bit=config.data.sixteen_bit)
        else:
            # What the training images look like, for the out-of-depth warnings of predict/external.
            sizes = {r.relpath: (r.width, r.height) for r in d.records}
            write_profile(profile_from_store(summary.path, sizes), summary.path)
        out[modality] = summary
    return out


def _with_sites(items: list[dict], discovery: Discovery) -> None:
    """Give every store item its file's absolute path and its site: with several sites the files live under
    different roots, so the path comes from the discovery record, not from one root + relpath."""
    records = {r.relpath: r for r in discovery.records}
    for item in items:
        record = records.get(item["source"])
        if record is not None:
            item["path"], item["site"] = record.path, record.site or "site"


WHERE = {"ray": " on Ray Data", "local": " in driver threads"}  # StoreSummary.where, as the store line says it


def summarize_stores(stores: dict, config: Config | None = None) -> str:
    """One line per store (rows per split and class, where it was made), with what is missing or lopsided in it.

    Args:
        stores: Modality -> StoreSummary.
        config: The run's config, to say stage 1's ``balance`` where a cell line has few training patches.
    """
    lines = []
    for modality, s in stores.items():
        noun = "patches" if modality == "microscope" else "images"
        per_split = "; ".join(
            f"{split} " + ", ".join(f"{c} {n}" for c, n in sorted(s.rows.get(split, {}).items()))
            for split in ("train", "val", "test")
        )
        files = f"{s.files} files" if s.source_files is None else \
            f"{s.source_files} files (a cine loop gives one image a frame)"
        how = ", reused (every chunk complete)" if s.reused else f" in {s.seconds:.1f} s{WHERE.get(s.where, '')}"
        lines.append(f"{modality} store: {sum(sum(v.values()) for v in s.rows.values())} {noun} from {files}"
                     f"{how} ({per_split}) -> {s.path}")
        if s.empty_sources:
            lines += _empty_lines(s, noun)
        # a class the split gave files to that ended with no rows there: its metrics or training would lack it
        gaps = [f"{split} {', '.join(empty)}" for split in ("train", "val", "test")
                if (empty := [c for c in _store_classes(s) if not s.rows.get(split, {}).get(c)])]
        if gaps:
            lines.append(f"  warning: no {noun} of {'; '.join(gaps)} (their files there gave none); a class "
                         "without training rows stops its stage")
        # patches per class follow the cells found, not the fields: a cell line can be a minority here alone
        if modality == "microscope" and (minority := minority_warning(
                s.rows.get("train", {}), "training patches", 1, _balance(config, modality))):
            lines.append("  " + minority)
    return "\n".join(lines)


def _empty_lines(summary: StoreSummary, noun: str) -> list[str]:
    """The store line's account of the files that gave no rows: those that could not be read, with why, apart from
    those that read and gave none (a field without cells); one list for a store that did not record which."""
    empty, n = summary.empty_sources, len(summary.empty_sources)
    head = f"  {n} file{'s' if n != 1 else ''} gave no {noun}"
    if not summary.empty_files:  # written before the store recorded why (2026-12-07)
        return [f"{head} (no cells found, or unreadable): {_some(empty, summary.path)}"]
    unreadable = summary.unreadable()
    readable = [source for source in empty if source not in unreadable]
    lines = [f"{head}:"]
    if readable:
        what = ("no cells found (see contact_fields.png; preprocess.offset sets the threshold by hand)"
                if summary.kind == "microscope" else "read without error when checked after the build (see logs/)")
        lines.append(f"    {what}, {len(readable)}: {_some(readable, summary.path)}")
    if unreadable:
        lines.append(f"    unreadable when the store was written (changed since the scan), {len(unreadable)}: "
                     + _some([f"{source} ({reason})" for source, reason in unreadable.items()], summary.path))
    return lines


def _some(names: list[str], path: Path, limit: int = 5) -> str:
    """At most ``limit`` names, and where the whole list is."""
    return ", ".join(names[:limit]) + (f" ... (all in {path}/summary.json)" if len(names) > limit else "")


def _store_classes(summary: StoreSummary) -> list[str]:
    try:
        return Store.open(summary.path).classes
    except (StoreError, OSError):  # a line of the summary is not worth failing the step
        return sorted({c for per_class in summary.rows.values() for c in per_class})


def recorded_store(config: Config, modality: str) -> StoreSummary | None:
    """The run's store of ``modality`` as it is, if the recorded split and a complete store match the config.

    Reads ``split.json``/``split.csv`` and ``store.json`` only: no image file is opened, and the data
    source need not be there any more. None when the split or store is missing, incomplete, made from
    another source or with other classes or preparation settings (the data step then decides).
    """
    from msbt.data import preprocess as pp

    folder = data_dir(config, modality)
    try:
        summary = json.loads((folder / "split.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("source") != source_key(config, modality):
        return None  # another data source (or a split saved before sources were recorded)
    classes = config.data.microscope_classes if modality == "microscope" else config.data.ultrasound_classes
    if classes and tuple(summary["classes"]) != tuple(classes):
        return None
    items = pp.split_items(folder, summary["root"], tuple(summary["classes"]), config.data.seed)
    settings, shape = pp.store_settings(modality, config.preprocess, config.data.sixteen_bit)
    path = store_dir(config, modality)
    if not matches(path, modality, items, settings, config.preprocess.files_per_chunk, shape, summary["classes"]):
        return None
    return Store.open(path).summary()


def ensure_stores(config: Config, modalities: Sequence[str] = MODALITIES, *,
                  force_split: bool = False) -> dict[str, StoreSummary]:
    """The stores of ``modalities``: the recorded ones when they fit (no image read), else made now.

    Args:
        config: The resolved config.
        modalities: Which of "microscope" (stage 1) and "ultrasound" (stage 2) are needed.
        force_split: Make a new split (and so scan) even if the run folder holds one.

    Returns:
        Modality -> StoreSummary (``reused`` True for a store opened as it was). Prints what it did.
        Ray must be initialised when a store has to be built on Ray Data (`preprocess.build`).
    """
    found = {} if force_split else {m: s for m in modalities if (s := recorded_store(config, m)) is not None}
    for modality, summary in found.items():
        print(f"{modality}: split and store reused from {summary.path.parent.parent} (no image read)", flush=True)
    if found:
        print(summarize_stores(found, config), flush=True)
    todo = [m for m in modalities if m not in found]
    if todo:
        prepared = prepare_data(config, force_split=force_split, modalities=todo)
        print(summarize(prepared, config), flush=True)
        built = build_stores(config, prepared)
        print(summarize_stores(built, config), flush=True)
        found.update(built)
    return {m: found[m] for m in modalities}


def source_key(config: Config, modality: str) -> str:
    """The data source of a modality as config gives it, resolved, without generating the built-in data:
    recorded in ``split.json`` so a later step can tell that its split and store came from this source."""
    d, s = config.data, config.synth
    if modality == "microscope":
        return str(Path(d.microscope or synth_dir(config) / "microscope").expanduser().resolve())
    if not d.ultrasound:
        built_in = synth_dir(config) / ("sites" if s.sites >= 2 else "ultrasound")
        return f"built-in:{built_in}" if s.sites >= 2 else str(built_in.resolve())
    return ";".join(f"{site.name}={Path(site.path).expanduser().resolve()}" for site in parse_sources(d.ultrasound))
