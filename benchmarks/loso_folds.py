"""The fold models of a leave-one-site-out run, for the benchmarks that re-score them (loso_tta.py, loso_adabn.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def held_out_folds(parser: argparse.ArgumentParser, run: Path, out: Path | None, suffix: str) -> tuple[list[Path], Path]:
    """``(folders, out)``: the run's ``loso/site-*`` folders that hold predictions, metrics and a store, and the
    run folder to write (``out``, default ``RUN-<suffix>``), which must not exist; a parser error otherwise."""
    out = out or run.with_name(f"{run.name}-{suffix}")
    if out.exists():
        parser.error(f"{out} exists; choose another --out")
    folders = [f for f in sorted((run / "loso").glob("site-*")) if (f / "predictions.csv").is_file()
               and (f / "metrics.json").is_file() and (f / "store").is_dir()]
    if not folders:
        parser.error(f"{run}: no held-out site with predictions.csv, metrics.json and store in loso/")
    return folders, out


def fold_models(folders: list[Path]):
    """For each fold: ``(folder, model, stage, scores, drift)``: its stage-2 model and StageConfig (the checkpoint
    its ``metrics.json`` names), that model's scores of the held-out site (``predict_split`` of the fold's store,
    test rows), and the largest difference from the fold's recorded predictions (0 unless model or store changed)."""
    import json

    import numpy as np

    from msbt.eval.evaluate import load_stage2, predict_split, read_predictions

    for folder in folders:
        model, stage = load_stage2(json.loads((folder / "metrics.json").read_text())["checkpoint"])
        scores = predict_split(model, stage, folder / "store", "test")
        recorded = read_predictions(folder / "predictions.csv")["test"]
        yield folder, model, stage, scores, float(np.abs(np.sort(scores["p"]) - np.sort(recorded["p"])).max())
