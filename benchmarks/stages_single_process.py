"""Stage 1 then stage 2 in one process on a run's Parquet stores: is the data learnable, and how fast?

    python workflows/pipeline.py --config workflows/configs/cpu.yaml      # makes runs/cpu/stores
    python benchmarks/stages_single_process.py runs/cpu --config workflows/configs/cpu.yaml

Trains stage 1 (ImageNet -> cell-line patches) and stage 2 (stage 1 -> ultrasound) with
msbt.train.loop.fit_stage, no Ray, and prints validation metrics per epoch and the time per stage. The
test split is not touched. Ray Train runs the same function across workers (see the Ray Train issue).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder with stores/ (made by the main job)")
    parser.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    from msbt.config import load_config
    from msbt.data.store import read_store
    from msbt.train.loop import dataset_from_arrays, fit_stage

    config = load_config(args.config, args.overrides)
    run = Path(args.run_dir)
    parent = None
    for number, (stage, store) in enumerate([(config.stage1, "microscope"), (config.stage2, "ultrasound")], 1):
        data = {s: read_store(run / "stores" / store, columns=["image", "label_index", "label"], split=s)
                for s in ("train", "val")}
        classes = sorted(set(data["train"]["label"]), key=lambda c: int(
            data["train"]["label_index"][list(data["train"]["label"]).index(c)]))
        train = dataset_from_arrays(data["train"]["image"], data["train"]["label_index"])
        val = dataset_from_arrays(data["val"]["image"], data["val"]["label_index"])
        started = time.perf_counter()
        result = fit_stage(stage, train, val, class_names=classes, out_dir=run / f"bench-stage{number}",
                           seed=config.data.seed, parent=parent)
        seconds = time.perf_counter() - started
        print(f"stage {number} ({store}: {len(data['train']['image'])} train / {len(data['val']['image'])} val, "
              f"{stage.backbone} @ {stage.image_size} px, {stage.epochs} epochs): {seconds:.0f} s")
        for epoch in range(len(result.history["val_loss"])):
            row = "  ".join(f"{k} {result.history[k][epoch]:.3f}" for k in
                            ("loss", "val_loss", "val_accuracy", "val_auc") if k in result.history)
            print(f"  epoch {epoch + 1}: {row}")
        print(f"  best epoch {result.best_epoch} by {result.monitor}")
        parent = result.checkpoint
    return 0


if __name__ == "__main__":
    sys.exit(main())
