"""Measure re-estimating BatchNorm statistics on the held-out site (AdaBN) with a leave-one-site-out run's models.

    python benchmarks/loso_adabn.py runs/loso-ms-base             # writes runs/loso-ms-base-adabn
    msbt loso-diff runs/loso-ms-base runs/loso-ms-base-adabn      # the change per held-out site, paired

A label-free adaptation a hospital could run on its own unlabelled images: every BatchNorm layer's moving mean
and variance are replaced by the average of its batch statistics over the new site's images (Li et al. 2016,
"Revisiting Batch Normalization For Practical Domain Adaptation", arXiv:1603.04779), the weights kept. Here
each fold model of ``workflows/crossval.py --by site`` (the checkpoint its ``metrics.json`` names) is adapted on
its held-out site's images (all of them, no labels), then scores them. The result is written as a run folder
that ``msbt loso-diff`` reads (``loso/site-*/predictions.csv``, test rows only), so the change is tested as
every other lever is: paired on the same held-out images with a group bootstrap. Trains nothing.

The statistics come from one pass in training mode with batches of ``--batch`` images: each layer sees the
layers before it already normalised by the current batch (as AdaBN adapts layer after layer), and its moving
averages are set to the image-weighted running mean of the batches' means and variances.
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


def batchnorm_layers(model) -> list:
    import keras

    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def adapt_batchnorm(model, batches) -> int:
    """Set every BN layer's moving statistics to the mean of its batch statistics over ``batches``, each batch
    weighted by its images (a short last batch counts for what it holds); returns how many batches were seen."""
    layers = batchnorm_layers(model)
    kept = [(layer, layer.trainable, layer.momentum) for layer in layers]
    seen, images = 0, 0
    try:
        for layer in layers:
            layer.trainable = True  # Keras 3 BN with trainable False runs in inference mode
        for x, *_ in batches:
            seen, n = seen + 1, int(x.shape[0])
            for layer in layers:
                layer.momentum = images / (images + n)  # the running, image-weighted mean of the batch statistics
            images += n
            model(x, training=True)
    finally:
        for layer, trainable, momentum in kept:
            layer.trainable, layer.momentum = trainable, momentum
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with loso/site-*/ (workflows/crossval.py --by site)")
    parser.add_argument("--out", type=Path, help="run folder to write (default: RUN-adabn); must not exist")
    parser.add_argument("--batch", type=int, default=64, help="images per batch of the statistics pass")
    args = parser.parse_args(argv)
    folders, out = held_out_folds(parser, args.run, args.out, "adabn")

    import dataclasses

    from msbt.data.store import read_store
    from msbt.eval.evaluate import predict_split, write_predictions
    from msbt.train.loop import dataset_from_arrays, eval_batches

    for folder, model, stage, before, drift in fold_models(folders):
        rows = read_store(folder / "store", columns=["image", "label_index"], split="test")
        shuffled = np.random.default_rng(0).permutation(len(rows["label_index"]))
        batches = eval_batches(dataset_from_arrays(rows["image"][shuffled], rows["label_index"][shuffled]),
                               dataclasses.replace(stage, batch_size=args.batch), num_classes=2)
        seen = adapt_batchnorm(model, batches)
        after = predict_split(model, stage, folder / "store", "test")
        (out / "loso" / folder.name).mkdir(parents=True)
        write_predictions({"test": after}, out / "loso" / folder.name / "predictions.csv")
        print(f"{folder.name}: {len(after['p'])} images, {len(batchnorm_layers(model))} BN layers adapted over "
              f"{seen} batches; max |p change| {np.abs(after['p'] - before['p']).max():.3f}; "
              f"max |unadapted - recorded| {drift:.2g}", flush=True)
    print(f"wrote {out}; compare with: msbt loso-diff {args.run} {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
