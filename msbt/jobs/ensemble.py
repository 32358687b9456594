"""`msbt ensemble`: several stage-2 checkpoints of one split averaged into one model, and scored.

The members (e.g. one design trained with three seeds, ``crossval --by site --seeds``, or several designs
on one split) are checked and saved as one checkpoint (msbt.model.ensemble); the ensemble is then
evaluated on the members' store like any stage-2 model: threshold chosen on the shared validation rows,
test metrics with group-bootstrap intervals. Each member is scored on the same rows, so the output says
what the average adds over a single member, with the members' spread counted
(msbt.eval.metrics.repeated_auc). The folder written:

    <out>/checkpoint/   model.keras + manifest.json (members listed): for predict, external, export, serve
    <out>/metrics.json, predictions.csv   the ensemble's evaluation (predict's threshold comes from here)
    <out>/members.json  each member's test AUC, and the ensemble minus the members' mean
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.atomicio import write_text
from msbt.eval import metrics
from msbt.eval.metrics import p_text
from msbt.serve.predict import find_store

CHECKPOINT_FOLDER = "checkpoint"


def make_ensemble(checkpoints: Sequence[str | Path], out: str | Path, *, store: str | Path | None = None,
                  n_boot: int = 2000, seed: int = 0) -> dict:
    """Average ``checkpoints`` into ``<out>/checkpoint`` and score it and each member on ``store``.

    Args:
        checkpoints: Two or more stage-2 checkpoints of the same data and split.
        out: The ensemble's folder; inside a run folder, ``msbt predict`` finds the run's preparation.
        store: Their ultrasound store; default: found from the first member (:func:`find_store`).
        n_boot, seed: Bootstrap resamples and seed.

    Returns:
        The content of ``members.json``: the ensemble's and every member's test AUC with intervals, and the
        ensemble minus the members' mean AUC, paired on the same test rows and given these members (no
        seed term: the ensemble is a fixed function of them).

    Raises:
        msbt.model.checkpoint.CheckpointError: Members that cannot be averaged (named), before anything is written.
        ValueError: No store found for them, or one of other data than theirs.
    """
    from msbt.data.store import Store
    from msbt.model.checkpoint import read_manifest
    from msbt.model.ensemble import write_ensemble

    out = Path(out).expanduser().resolve()
    taken = [name for name in (CHECKPOINT_FOLDER, "metrics.json", "predictions.csv", "members.json", "config.yaml")
             if (out / name).exists()]
    if taken:  # e.g. --out runs/<name>: the run's own metrics.json would be overwritten
        raise ValueError(f"{out}: holds {', '.join(taken)} already; give the ensemble a folder of its own "
                         "(e.g. runs/<name>/ensembles/<label>)")
    store = Path(store).expanduser().resolve() if store else find_store(checkpoints[0])
    first = read_manifest(checkpoints[0])
    if Store.open(store).fingerprint() != (first.get("data_fingerprint"), first.get("split_id")):
        raise ValueError(f"{store}: another data set or split than {checkpoints[0]} was trained on")
    from msbt.eval.evaluate import evaluate, write_metrics

    folder = write_ensemble(checkpoints, out / CHECKPOINT_FOLDER)
    try:  # the ensemble, then its members on the same test rows
        result = evaluate(folder, store, n_boot=n_boot, seed=seed)
        write_metrics(result, out / "metrics.json")
        return write_members(folder, store, result, n_boot=n_boot, seed=seed)  # <out>/members.json
    except BaseException:  # an ensemble that was not scored is not left behind half made
        shutil.rmtree(folder, ignore_errors=True)
        for name in ("metrics.json", "predictions.csv", "members.json"):
            (out / name).unlink(missing_ok=True)
        raise


def members_report(folder: str | Path, store: str | Path, result, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Each member of an ensemble scored on the test rows the ensemble was evaluated on (``result``: its
    msbt.eval.evaluate.Evaluation), and the ensemble minus the members' mean: the content of members.json."""
    import keras

    from msbt.eval.evaluate import load_stage2, predict_split
    from msbt.model.checkpoint import read_manifest
    from msbt.model.ensemble import members

    folder, store = Path(folder), Path(store)
    test = result.predictions["test"]
    model, stage = load_stage2(folder)
    parts = members(model)
    # every member in one pass: one model with one output per member (a predict per member traced a new
    # predict function each time, and TensorFlow warned of retracing on the terminal from the fifth on)
    image = keras.Input(model.input_shape[1:])
    together = keras.Model(image, [part(image) for part in parts])
    pred = predict_split(together, stage, store, "test")
    member_p, rows = list(pred["p"]), []
    for record, p in zip(read_manifest(folder)["members"], member_p):
        auc = metrics.repeated_auc(pred["y"], p, groups=pred["group"], n_boot=n_boot, seed=seed)
        rows.append({"path": record["path"], "seed": record.get("seed"),
                     "test_auc": [auc["auc"], *(float(x) for x in auc["ci_cases"])]})
    # the ensemble is a fixed function of these members: compared with them on the same test resamples, no
    # seed term (that would ask what another draw of members would do)
    versus = metrics.repeated_auc(test["y"], test["p"], np.stack(member_p), groups=test["group"], n_boot=n_boot,
                                  seed=seed, seed_term=False)
    return {
        "checkpoint": str(folder), "store": str(store), "test_images": int(len(test["y"])),
        "threshold": result["threshold"], "test_auc": [float(x) for x in result["test_ci95"]["auc"]],
        "members": rows,
        "vs_members": {"diff": versus["diff"], "ci95": [float(x) for x in versus["diff_ci"]],
                       "p_value": versus["p_value"], "members_mean_auc": versus["base_auc"],
                       "members_sd": versus["base_seed_sd"]},
    }


def format_ensemble(report: dict) -> str:
    """Lines for the terminal: members' and the ensemble's test AUC, and what the average adds."""
    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = [f"ensemble of {len(report['members'])} -> {report['checkpoint']}",
             f"test rows of {report['store']} ({report['test_images']} images):"]
    for i, m in enumerate(report["members"]):
        seed = "" if m["seed"] is None else f" (seed {m['seed']})"
        lines.append(f"  member {i}{seed}: AUC {ci(m['test_auc'])}  {m['path']}")
    v = report["vs_members"]
    lines.append(f"  ensemble: AUC {ci(report['test_auc'])}, threshold {metrics.threshold_text(report['threshold'])} "
                 "(chosen on the members' shared validation rows)")
    lines.append(f"  ensemble - members' mean AUC: {v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}], "
                 f"{p_text(v['p_value'])} (paired on the test images, given these members)")
    return "\n".join(lines)


def holds_members(folder: str | Path, checkpoints: Sequence[str | Path]) -> bool:
    """Whether the ensemble checkpoint ``folder`` is intact and averages exactly ``checkpoints``, in order
    (their folders and model sha256)."""
    from msbt.model.checkpoint import MODEL_FILE, CheckpointError, read_manifest, sha256_file, verify

    try:
        have = [(m["path"], m["model_sha256"]) for m in read_manifest(folder).get("members") or []]
        wanted = [(str(Path(c).expanduser().resolve()), sha256_file(Path(c) / MODEL_FILE)) for c in checkpoints]
        return have == wanted and verify(folder)
    except (CheckpointError, KeyError, TypeError, OSError):
        return False


def run_ensemble(config, checkpoints: Sequence[str | Path]) -> Path:
    """The run's average of its stage-2 seeds (msbt.runfolder.ensemble_checkpoint): kept when it holds exactly
    these members, else made (again: a seed trained anew, or another number of seeds, makes a new average).

    An average made again lives at the same path, so the run's evaluation of the old one (``metrics.json``,
    ``predictions.csv`` naming it, and its ``members.json``) is removed with it: predict would otherwise apply
    the old average's threshold to the new one. The main job evaluates the new one at once; after
    ``msbt stage2`` alone, ``msbt evaluate`` does.
    """
    from msbt.model.ensemble import write_ensemble
    from msbt.runfolder import METRICS_FILE, PREDICTIONS_FILE, ensemble_checkpoint, run_dir

    folder = ensemble_checkpoint(config)
    if folder.exists():
        if holds_members(folder, checkpoints):
            print(f"stage 2: the average of the {len(checkpoints)} seeds' models, made before -> {folder}",
                  flush=True)
            return folder
        metrics = run_dir(config) / METRICS_FILE
        try:
            stale = Path(json.loads(metrics.read_text()).get("checkpoint", "")).resolve() == folder.resolve()
        except (OSError, ValueError, AttributeError):
            stale = False
        for gone in ([metrics, run_dir(config) / PREDICTIONS_FILE] if stale else []) + [folder.parent / "members.json"]:
            gone.unlink(missing_ok=True)
        shutil.rmtree(folder)  # made from other members (or damaged)
        print(f"stage 2: the average in {folder} was made from other seeds' models: made again"
              + (" (its evaluation removed; msbt evaluate scores the new one)" if stale else ""), flush=True)
    write_ensemble(checkpoints, folder)
    print(f"stage 2: the average of the {len(checkpoints)} seeds' models is the run's model -> {folder}", flush=True)
    return folder


def write_members(checkpoint: str | Path, store: str | Path, result, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """:func:`members_report` of an evaluated ensemble, written to ``members.json`` beside its checkpoint folder."""
    report = members_report(checkpoint, store, result, n_boot=n_boot, seed=seed)
    write_text(Path(checkpoint).parent / "members.json", json.dumps(report, indent=2, default=float) + "\n")
    return report
