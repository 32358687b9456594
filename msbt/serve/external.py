"""`msbt external CHECKPOINT SOURCE...`: score a trained run on other sites, as a step of its own.

This module applies the model; msbt.eval.external scores and writes. Every image reaches the model as
`msbt predict` prepares it (the run's recorded preparation, msbt.serve.predict), the threshold is the run's
validation threshold, and the run's train/val images are compared with each site's for near-duplicates
with the fingerprints the split saved (`data/ultrasound/fingerprints.npz`; for runs made before it
existed, the run's own data are scanned again). It lives in serve, not eval, because it loads and runs a
model (serve sits above eval; eval never imports serve).

Every source is scanned before the model loads and before any site is scored, and the sites' results are
written only once all are scored: a bad source (a wrong manifest header, an empty folder, a class folder
given for a data root, a missing path) fails the command naming itself, with no other site's results left
behind. The scans hold fingerprints (a hash and a 32x32 thumbnail per image), not images, so keeping every
site's at once costs little.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.config import StageConfig, from_dict, load_config
from msbt.data.discovery import DataError, Discovery, Reject
from msbt.data.profile import check_inputs, image_features, out_of_range
from msbt.data.sites import Site, discover_sites, parse_sources
from msbt.data.splits import load_fingerprints
from msbt.data.store import StoreError, read_store
from msbt.eval import external as ext
from msbt.images.dicom import split_ref
from msbt.images.imagefile import ImageError
from msbt.model.checkpoint import CheckpointError
from msbt.serve.predict import (find_preparation, find_profile, find_run_dir, find_store, find_threshold,
                                model_inputs, predict_logits, prepare_sized, threshold_warnings)

log = logging.getLogger(__name__)
_CHUNK = 256


def trained_on(checkpoint: str | Path, run: Path) -> tuple[set[str], Path]:
    """The relpaths of the images ``checkpoint`` trained and chose its epoch on (train and val rows), and
    the store or split file they were read from.

    A fold of cross-validation or of leave-one-site-out trains on a re-split copy of the run's store
    (``loso/site-<s>/store``, ``crossval/fold-<k>/store``), not on the run's split: a held-out site's images
    sit in the run's train/val rows but were never seen by its fold's model, and comparing with the run's
    split would exclude them as contamination. The store whose identity the checkpoint records says which
    rows it trained on; without one (an export, a hand-made folder) the run's split does.
    """
    try:
        store = find_store(checkpoint)
        table = read_store(store, columns=["source", "split"])
    except (ValueError, CheckpointError, StoreError, OSError):  # none found, or a damaged one: the run's split
        store = None
    if store is not None:
        return {s for s, split in zip(table["source"], table["split"]) if split in ("train", "val")}, store
    split = run / "data" / "ultrasound" / "split.csv"
    with split.open(newline="") as handle:
        return {r["relpath"] for r in csv.DictReader(handle) if r["split"] in ("train", "val")}, split


def run_reference(run: Path | None, checkpoint: str | Path) -> tuple[dict | None, dict, list[str]]:
    """The fingerprints (relpath, hashes, thumbs, digests) of the images ``checkpoint`` trained on
    (:func:`trained_on`), the run's grouping thresholds, and notes.

    Returns (None, thresholds, notes) when the run folder or its split cannot be found: then no
    contamination check is possible and a note says so.
    """
    thresholds = {"max_distance": 10, "min_similarity": 0.8}
    if run is None or not (run / "data" / "ultrasound" / "split.csv").is_file():
        return None, thresholds, ["no run split found above the checkpoint: the contamination check was not run"]
    folder = run / "data" / "ultrasound"
    summary = json.loads((folder / "split.json").read_text())
    thresholds = summary.get("thresholds", thresholds)
    keep, source = trained_on(checkpoint, run)
    notes = []
    if source.name != "split.csv" and source.resolve() != (run / "stores" / "ultrasound").resolve():
        notes.append(f"contamination checked against the {len(keep)} train/val images of the store this "
                     f"checkpoint trained on ({source}), not the run's split")
    saved = load_fingerprints(folder)
    if saved is None:  # a run made before fingerprints were saved: scan its data again
        config = load_config([run / "config.yaml"])
        if not config.data.ultrasound:
            return None, thresholds, ["the run used built-in data and saved no fingerprints: contamination not checked"]
        d = discover_sites(config.data.ultrasound, config.data.ultrasound_classes,
                           mask_suffixes=config.data.mask_suffixes, sixteen_bit=config.data.sixteen_bit)
        saved = {"relpath": np.array([r.relpath for r in d.records]), "hashes": d.hashes, "thumbs": d.thumbs,
                 "digests": np.array([r.digest for r in d.records])}
        notes.append(f"fingerprints of the run's images recomputed from {config.data.ultrasound}")
    mask = np.array([str(r) in keep for r in saved["relpath"]])
    return {k: v[mask] for k, v in saved.items()}, thresholds, notes


def external(checkpoint: str | Path, sources: str | Sequence[str], *, out: str | Path | None = None,
             threshold: float | None = None, keep_duplicates: bool = False, n_boot: int = 2000,
             seed: int | None = None, batch_size: int = 32,
             run_folder: str | Path | None = None) -> dict[str, dict]:
    """Score a stage-2 checkpoint on each external source; write ``<out>/external/<site>/``.

    Args:
        checkpoint: a stage-2 checkpoint folder of a run.
        sources: folders or CSV manifests, each a site (``NAME=PATH`` or a bare path).
        out: folder that receives ``external/<site>/``; default the checkpoint's run folder.
        threshold: overrides the run's validation threshold.
        keep_duplicates: score near-duplicates of the run's train/val images too (default: excluded).
        n_boot, seed: bootstrap resamples and seed (default the run's ``data.seed``, as its own test metrics).
        run_folder: the run folder named for the model, if one was: its threshold is read first
            (msbt.serve.predict.find_threshold) and results go there unless ``out`` says otherwise.

    Returns:
        {site: its metrics.json content}.

    Raises:
        ValueError: no output folder (and no run folder), not a binary checkpoint, a bad threshold.
        DataError: a source that cannot be used (each one named, with the reason), found before the model
            loads; nothing is written then.
    """
    from msbt.eval.evaluate import load_stage2
    from msbt.model.checkpoint import read_manifest

    sites = parse_sources(sources)  # bad names fail before anything is read
    chosen, notes = find_threshold(checkpoint, threshold, run_folder)
    run = find_run_dir(checkpoint)
    out = Path(out) if out else Path(run_folder) if run_folder else run
    if out is None:
        raise ValueError(f"{checkpoint}: not inside a run folder; give --out")
    if seed is None:
        seed = load_config([run / "config.yaml"]).data.seed if run and (run / "config.yaml").is_file() else 0
    manifest = read_manifest(checkpoint)
    class_names = list(manifest["class_names"])
    # Checked here as load_stage2 checks it, before the scans: a stage-1 checkpoint's classes would otherwise
    # fail every site's scan with a misleading "class ... not found".
    if len(class_names) != 2:
        raise ValueError(f"{checkpoint}: not a binary (stage-2) checkpoint: classes {class_names}")
    # The manifest's image size is only the fallback of find_preparation: the model need not load for it.
    size = from_dict(StageConfig, manifest["config"], source=f"{checkpoint}/manifest.json").image_size
    preparation, more = find_preparation(checkpoint, size)
    discoveries = discover_all(sites, class_names, preparation)
    model, stage = load_stage2(checkpoint)
    profile, more2 = find_profile(checkpoint)
    reference, thresholds, more3 = run_reference(run, checkpoint)
    notes += more + more2 + more3 + threshold_warnings(checkpoint, chosen)
    scored = []
    for site, d in zip(sites, discoveries):
        result, rows, rejects = _score_site(model, stage, site, d, chosen.value, preparation, profile, reference,
                                            thresholds, keep_duplicates=keep_duplicates, n_boot=n_boot, seed=seed,
                                            batch_size=batch_size)
        result.update({"checkpoint": str(checkpoint), "threshold_source": chosen.source,
                       "preparation": preparation.as_dict(), "run_notes": notes})
        scored.append((site, result, rows, rejects))
    # Written only once every site is scored, so that a failure on a later site leaves no earlier site's
    # results behind (the rows are a few hundred bytes per image: holding all sites' is cheap).
    results = {}
    for site, result, rows, rejects in scored:
        folder = out / ext.EXTERNAL_DIR / site.name
        result["rejects_file"] = str(folder / ext.REJECTS_FILE)
        ext.write_site(folder, result, rows, rejects)
        results[site.name] = result
    return results


def discover_all(sites: Sequence[Site], class_names: Sequence[str], preparation) -> list[Discovery]:
    """Scan every site (:func:`msbt.data.sites.discover_sites`, one site at a time) before any is scored.

    Args:
        sites: the parsed sources.
        class_names: the checkpoint's classes, in label order.
        preparation: the run's preparation (its mask suffixes and 16-bit policy decide what a scan reads).

    Returns:
        One Discovery per site, in the sites' order.

    Raises:
        DataError: naming every source that cannot be used and why; all are scanned first, so that one
            attempt names every bad source rather than one per attempt.
    """
    found, problems = [], []
    for site in sites:
        try:
            # a site of one class (a series of biopsy-proven cancers) is scored too: sensitivity alone
            found.append(discover_sites([site], class_names, mask_suffixes=preparation.mask_suffixes,
                                        sixteen_bit=preparation.sixteen_bit, every_class=False))
        except DataError as err:  # its message names the site and the source
            problems.append(str(err))
    if len(problems) == 1:
        raise DataError(f"{problems[0]} (no site was scored and nothing was written)")
    if problems:
        raise DataError(f"{len(problems)} of {len(sites)} sources cannot be used (no site was scored and nothing "
                        "was written): " + "; ".join(problems))
    return found


def _score_site(model, stage, site: Site, d: Discovery, threshold: float, preparation, profile, reference,
                thresholds: dict, *, keep_duplicates: bool, n_boot: int, seed: int, batch_size: int):
    digests = [r.digest for r in d.records]
    dupes = {} if reference is None else ext.contamination(
        reference["hashes"], reference["thumbs"], reference["digests"], d.hashes, d.thumbs, digests, **thresholds)
    groups = ext.lesion_groups([r.group for r in d.records], d.hashes, d.thumbs, digests, **thresholds)
    rows, features, y, p, g = [], [], [], [], []
    rejects: list[Reject] = list(d.rejects)
    records = list(enumerate(d.records))
    for start in range(0, len(records), _CHUNK):
        images, kept, sizes = [], [], []
        for index, record in records[start : start + _CHUNK]:
            try:
                image, size = prepare_sized(record.path, preparation)
            except ImageError as err:  # read by the scan, but not by the run's preparation
                rejects.append(Reject(err.path, err.reason))
                continue
            images.append(image)
            sizes.append(size)
            kept.append(index)
        if not kept:
            continue
        probs, logits = predict_logits(model, model_inputs(np.stack(images), stage.image_size), batch_size)
        for index, image, size, prob, logit in zip(kept, images, sizes, probs, logits):
            record = d.records[index]
            f = image_features(*size, image)
            duplicate = index in dupes
            excluded = "near-duplicate of a run train/val image" if duplicate and not keep_duplicates else ""
            label = d.classes.index(record.label)
            rows.append({"path": record.path, "relpath": record.relpath, "site": site.name, "group": groups[index],
                         "y": label, "p": repr(float(prob)), "logit": repr(float(logit)),
                         "predicted": int(prob >= threshold),
                         "out_of_range": ",".join(out_of_range(profile, f)) if profile else "", "excluded": excluded})
            if not excluded:
                features.append(f)
                y.append(label)
                p.append(float(prob))
                g.append(groups[index])
    result = {"schema": ext.SCHEMA, "site": site.name, "source": site.path,
              **ext.score_site(y, p, g, threshold, n_boot=n_boot, seed=seed)}
    result["contamination"] = {
        "checked": reference is not None, "found": len(dupes), "excluded": bool(dupes) and not keep_duplicates,
        "thresholds": thresholds, "run_images_compared": 0 if reference is None else int(len(reference["hashes"])),
        "examples": [[d.records[j].relpath, str(reference["relpath"][i])] for j, i in list(dupes.items())[:20]],
    }
    result["out_of_depth"] = check_inputs(profile, features) if profile else []
    result["rejects"] = len(rejects)  # images: a cine loop's frames are rejected (and scored) one by one
    result["rejected_files"] = len({split_ref(r.path)[0] for r in rejects})
    return result, rows, rejects
