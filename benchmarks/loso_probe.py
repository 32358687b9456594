"""Leave one site out with a frozen ImageNet backbone and a linear head, at several depths of the backbone.

    python benchmarks/loso_probe.py runs/loso-ms-frozen224/stores/ultrasound

A quick way to ask whether a lever of the input or of the features can reach a held-out-site AUC that the
trained designs of docs/evaluation.md do not: no training of the backbone, so one pass over the images
(plain and mirrored) gives every design below in seconds. The store must hold several sites (``site``
column; the store of any ``workflows/crossval.py --by site`` run). EfficientNet-Lite0 with its ImageNet
weights (msbt.model.lite0; ``--backbone lite1|lite2``: the larger sizes) at the store's image size; each
named block's output is averaged over space.

For every held-out site: the features are standardised with the training rows' mean and spread; an L2
logistic regression is fitted on the other sites' ``train`` rows for each C of ``--c``, the C with the
best exact AUC on their ``val`` rows is kept and refitted on train + val (``--no-refit``: not), and the held-out site's every
image is scored; TTA rows average the plain and mirrored images' logits. ``--msbt-head CONFIG`` adds, per
layer, the config's own stage-2 head (Dense layers, dropout, optimizer, epochs: ``msbt.tune.fast.fit_head``, as
Tune's fast mode trains it) on the same features, unstandardised and without augmentation, trained on the
train rows (val rows as Keras' validation data) and scored after its last epoch. AUCs with 95% group-bootstrap
intervals over the held-out site's lesion groups (msbt.eval.metrics.bootstrap_ci). The held-out site
chooses nothing. The logistic regression is written here (scipy's L-BFGS on the penalised log loss):
scikit-learn is not a dependency of msbt, and this is the only place that needs one.

``--standardise site`` standardises every site's features with its own images' mean and spread instead (the
held-out site's from all its images, no labels: a label-free adaptation a hospital could run on its own
unlabelled images). ``--balance class`` weights the linear heads' loss so that both classes weigh the same;
``--balance site_class`` so that every training site's benign and malignant images weigh the same (no site's
prevalence can stand in for malignancy). A ``--layers`` entry ``a+b`` is one design on the two layers' features side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def default_layers(variant: str = "lite0") -> list[str]:
    """The last block of stages 4-6, stage 7's projection and the head: Lite0's block4c_add, block5c_add,
    block6d_add, block7a_project_bn, top_relu6 (Lite1 and Lite2 have more blocks per stage: block4d ... block6e)."""
    import string

    from msbt.model.lite0 import stages

    plan = stages(variant)
    last = [f"block{i + 1}{string.ascii_lowercase[plan[i].repeats - 1]}_add" for i in (3, 4, 5)]
    return [*last, "block7a_project_bn", "top_relu6"]


def features(images: np.ndarray, layers: list[str], batch: int = 32, variant: str = "lite0") -> dict[str, np.ndarray]:
    """``{"plain:<layer>" | "flip:<layer>": (N, channels)}``: spatial means of each layer's output."""
    import keras

    from msbt.model.lite0 import load_lite0_imagenet

    size = images.shape[1]
    backbone = load_lite0_imagenet((size, size, 3), include_top=False, variant=variant)
    unknown = sorted(set(layers) - {layer.name for layer in backbone.layers})
    if unknown:
        raise SystemExit(f"--layers: {', '.join(unknown)} not a layer of EfficientNet-{variant.capitalize()} "
                         f"(e.g. {', '.join(default_layers(variant))})")
    model = keras.Model(backbone.input,
                        [keras.layers.GlobalAveragePooling2D()(backbone.get_layer(n).output) for n in layers])
    out = {}
    for variant, x in (("plain", images), ("flip", images[:, :, ::-1])):
        outputs = model.predict(x.astype("float32"), batch_size=batch, verbose=0)
        for name, f in zip(layers, outputs if len(layers) > 1 else [outputs]):  # one output comes unlisted
            out[f"{variant}:{name}"] = f
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, weight: np.ndarray | None = None):
    """L2 logistic regression (penalty ||w||^2 / (2 C n), bias not penalised); returns a logit function.

    ``weight``: per-row weights of the log loss (mean 1; None: all 1)."""
    from scipy.optimize import minimize

    n, d = x.shape
    weight = np.ones(n) if weight is None else weight / weight.mean()

    def loss(w):
        z = x @ w[:-1] + w[-1]
        p = 0.5 * (1 + np.tanh(z / 2))  # the logistic function without overflow
        value = np.mean(weight * (np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y)))
        residual = weight * (p - y)
        value += w[:-1] @ w[:-1] / (2 * c * n)
        return value, np.r_[x.T @ residual / n + w[:-1] / (c * n), np.mean(residual)]

    w = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 1000}).x
    return lambda z: z @ w[:-1] + w[-1]


def balance_weights(site: np.ndarray, y: np.ndarray, rows: np.ndarray, balance: str) -> np.ndarray | None:
    """``stage.balance``'s row weights (msbt.data.balance) over ``rows`` (a mask); None for "none"."""
    from msbt.data.balance import cell_weights, row_weights

    if balance == "none":
        return None
    labels, sites = y[rows].astype(int), site[rows]
    return row_weights(labels, sites, cell_weights(labels, sites, balance))


def probe(feats: dict, meta: dict, layers: list[str], cs: list[float], tta: bool, n_boot: int,
          stage=None, refit: bool = True, standardise: str = "train", balance: str = "none") -> list[dict]:
    """One design (layers, TTA; or msbt's head of ``stage``) held out at every site; a row per held-out site."""
    from msbt.eval.metrics import bootstrap_ci, roc_auc

    site, y, split = meta["site"], meta["label_index"].astype(float), meta["split"]
    plain = np.concatenate([feats[f"plain:{n}"] for n in layers], axis=1)
    flip = np.concatenate([feats[f"flip:{n}"] for n in layers], axis=1)
    rows = []
    for held in sorted(set(site)):
        train, val, test = (site != held) & (split == "train"), (site != held) & (split == "val"), site == held
        if standardise == "site":
            a, b = np.empty_like(plain), np.empty_like(flip)
            for s in set(site):
                rows_s = site == s
                mean, sd = plain[rows_s].mean(0), plain[rows_s].std(0) + 1e-6
                a[rows_s], b[rows_s] = (plain[rows_s] - mean) / sd, (flip[rows_s] - mean) / sd
        else:
            mean, sd = plain[train].mean(0), plain[train].std(0) + 1e-6
            a, b = (plain - mean) / sd, (flip - mean) / sd
        if stage is not None:
            from msbt.tune.fast import fit_head

            cached = {"train_x": plain[train][:, None], "train_y": y[train], "val_x": plain[val], "val_y": y[val]}
            head, _ = fit_head(stage, cached, seed=0)
            chosen, p = None, np.asarray(head(plain[test], training=False))[:, 0]
        else:
            weights = balance_weights(site, y, train, balance)
            chosen = max(cs, key=lambda c: roc_auc(y[val], fit_logistic(a[train], y[train], c, weights)(a[val])))
            fit = (train | val) if refit else train
            head = fit_logistic(a[fit], y[fit], chosen, balance_weights(site, y, fit, balance))
            logit = (head(a[test]) + head(b[test])) / 2 if tta else head(a[test])
            p = 0.5 * (1 + np.tanh(logit / 2))
        with warnings.catch_warnings():  # only the AUC is read; rates at 0.5 (e.g. an undefined ppv) are not
            warnings.simplefilter("ignore", RuntimeWarning)
            auc = bootstrap_ci(y[test], p, 0.5, groups=meta["group"][test], n_boot=n_boot)["auc"]
        rows.append({"site": held, "images": int(test.sum()), "c": chosen, "auc": auc, "p": p, "y": y[test],
                     "groups": meta["group"][test]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="a multi-site ultrasound store (runs/<name>/stores/ultrasound)")
    parser.add_argument("--layers", nargs="+",
                        help="the backbone's layers to probe (default: the last block of stages 4-6, "
                             "block7a_project_bn, top_relu6), one design each; a+b: two layers' features side by side")
    parser.add_argument("--backbone", choices=("lite0", "lite1", "lite2"), default="lite0",
                        help="which EfficientNet-Lite's ImageNet features (msbt.model.lite0.VARIANTS)")
    parser.add_argument("--c", nargs="+", type=float, default=[0.001, 0.003, 0.01, 0.03, 0.1],
                        help="inverse penalty strengths; one is chosen per held-out site on the other sites' val rows")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--standardise", choices=("train", "site"), default="train",
                        help="linear heads' features: by the training rows' statistics, or each site by its own")
    parser.add_argument("--no-refit", action="store_true",
                        help="keep the linear head fitted on the train rows (default: refitted on train + val)")
    parser.add_argument("--balance", nargs="+", choices=("none", "class", "site_class"), default=["none"],
                        help="linear heads' loss: rows as they come, each class the same weight, or each site's "
                             "each class the same weight; several: each one a design, and every one after the "
                             "first compared with the first, paired on the held-out images")
    parser.add_argument("--msbt-head", type=Path, metavar="CONFIG",
                        help="also train this config's stage-2 head on each layer's features (e.g. multisite.yaml)")
    args = parser.parse_args(argv)
    args.layers = args.layers or default_layers(args.backbone)
    if min(args.c) <= 0:
        parser.error(f"--c: every inverse penalty strength must be positive, got {min(args.c):g}")

    from msbt.data.store import Store

    stage = None
    if args.msbt_head:
        import dataclasses

        from msbt.config import AugmentConfig, load_config

        # one cached copy per image: the features are of the stored images, not of augmented ones
        stage = dataclasses.replace(load_config([args.msbt_head]).stage2, augment=AugmentConfig(enabled=False))

    store = Store.open(args.store)
    if "site" not in store.columns():
        parser.error(f"{args.store} has no site column: use the store of a multi-site run")
    data = store.read(["image", "label_index", "site", "split", "group"])
    if len(set(data["site"])) < 2:
        parser.error(f"{args.store} holds one site ({data['site'][0]}): leaving it out leaves nothing to train on")
    start = time.perf_counter()
    designs_layers = [entry.split("+") for entry in args.layers]
    feats = features(data["image"], sorted({name for names in designs_layers for name in names}),
                     variant=args.backbone)
    print(f"EfficientNet-{args.backbone.capitalize()}: {len(data['image'])} images at {data['image'].shape[1]} px, "
          f"{len(feats) // 2} layers, plain and "
          f"mirrored: {time.perf_counter() - start:.0f} s\n")
    sites = sorted(set(data["site"]))
    designs = [("linear", False), ("linear", True)] + ([("msbt head", False)] if stage else [])
    print("| layer | head | TTA | " + " | ".join(f"{s} ({int((data['site'] == s).sum())})" for s in sites) + " | worst |")
    print("|---|---|---|" + "---|" * (len(sites) + 1))
    from msbt.eval.metrics import paired_bootstrap_auc_diff, p_text

    balances = [None] if len(args.balance) == 1 else args.balance  # one: the table as before, no balance column
    for layer, names in zip(args.layers, designs_layers):
        for kind, tta in designs:
            first = None
            for balance in balances if kind == "linear" else [None]:
                rows = probe(feats, data, names, args.c, tta, args.n_boot, stage if kind == "msbt head" else None,
                             refit=not args.no_refit, standardise=args.standardise, balance=balance or args.balance[0])
                cells = [f"{r['auc'][0]:.3f} [{r['auc'][1]:.3f}, {r['auc'][2]:.3f}]" + (f" (C {r['c']:g})" if r["c"] else "")
                         for r in rows]
                worst = min(r["auc"][0] for r in rows)
                label = kind if balance is None else f"{kind}, balance {balance}"
                print(f"| {layer} | {label} | {'flip' if tta else 'no'} | " + " | ".join(cells) + f" | {worst:.3f} |",
                      flush=True)
                if first is None:
                    first = rows
                    continue
                diffs = []
                for a, b in zip(rows, first):  # the same held-out images in the same order
                    d = paired_bootstrap_auc_diff(a["y"], a["p"], b["p"], groups=a["groups"], n_boot=args.n_boot)
                    diffs.append(f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] {p_text(d['p_value'])}")
                print(f"| {layer} | {label} minus {balances[0]} | {'flip' if tta else 'no'} | " + " | ".join(diffs)
                      + " | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
