"""Measure horizontal-flip test-time averaging on a leave-one-site-out run's fold models.

    python benchmarks/loso_tta.py runs/loso-ms                 # writes runs/loso-ms-tta
    msbt loso-diff runs/loso-ms runs/loso-ms-tta              # the change per held-out site, paired

Each fold model of ``workflows/crossval.py --by site`` (the checkpoint its ``metrics.json`` names) scores
its held-out site twice, as stored and mirrored left to right, and the two probabilities are averaged
per image. The result is written as a run folder that ``msbt loso-diff`` reads (``loso/site-*/
predictions.csv``, test rows only), so the change is tested as every other lever is: paired on the same
held-out images with a group bootstrap. Trains nothing; prints the largest difference between the
fold model's recorded predictions and this script's unmirrored ones (0 unless the model or store changed).

docs/evaluation.md gives the result. Flip averaging is not a config option: it was measured and did not
move the held-out AUC (the models already train with flips).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from loso_folds import fold_models, held_out_folds  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with loso/site-*/ (workflows/crossval.py --by site)")
    parser.add_argument("--out", type=Path, help="run folder to write (default: RUN-tta); must not exist")
    args = parser.parse_args(argv)
    folders, out = held_out_folds(parser, args.run, args.out, "tta")

    from msbt.data.store import read_store
    from msbt.eval.evaluate import write_predictions
    from msbt.train.loop import dataset_from_arrays, eval_batches

    for folder, model, stage, plain, drift in fold_models(folders):
        rows = read_store(folder / "store", columns=["image", "label_index"], split="test")
        # mirrored left to right, then the evaluation's own batching (it resizes to the stage's size)
        mirrored_rows = dataset_from_arrays(np.ascontiguousarray(rows["image"][:, :, ::-1]), rows["label_index"])
        batches = eval_batches(mirrored_rows, stage, num_classes=2)
        mirrored = np.asarray(model.predict(batches, verbose=0))
        (out / "loso" / folder.name).mkdir(parents=True)
        write_predictions({"test": {**plain, "p": (plain["p"] + mirrored.reshape(-1)) / 2}},
                          out / "loso" / folder.name / "predictions.csv")
        print(f"{folder.name}: {len(plain['p'])} images; max |unmirrored - recorded| {drift:.2g}", flush=True)
    print(f"wrote {out}; compare with: msbt loso-diff {args.run} {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
