"""Leave one site out, trained end to end on a GPU through Keras' JAX backend: larger images, longer training.

    python benchmarks/gpu_loso.py pack runs/loso-ms-frozen224/stores/ultrasound gpu-loso   # here (TensorFlow)
    python benchmarks/gpu_loso.py train gpu-loso --out results.json                          # GPU machine (JAX)
    python benchmarks/gpu_loso.py report gpu-loso results.json                               # here: AUCs, CIs

The question (issue #12, docs/evaluation.md): the CPU budget of the development machine allowed
EfficientNet-Lite0 at 96 px for 8 epochs; 128 px was worse there, and "a stronger backbone trained on a
GPU" was the lever left untested. The GPU machine lent to a session has JAX but no TensorFlow (docs/training.md,
"On a GPU"), so msbt's tf.data pipeline cannot run there; this script trains msbt's own stage-2 model
(``msbt.model.models.build_model`` with ``multisite.yaml``'s stage 2: Lite0 from its ImageNet weights, Dense
256-128-64, dropout 0.5, Adam, batch 16, monitor val AUC) with Keras ``fit`` on the JAX backend.

* ``pack`` reads a multi-site 224 px store (``msbt.data.store``; e.g. the one of ``loso-ms-frozen224``) and
  writes ``data.npz`` (each image PNG-encoded, grey when its channels are equal, so the set fits in what
  travels to the GPU machine: 38 MB) and the ImageNet weights of the backbones of ``--arms`` (the machine
  cannot make them: the weights packages are not there): ``lite0.weights.h5`` (14 MB) by default,
  ``lite2.weights.h5`` (20 MB) for the Lite2 arm. Both with the data are more than the 64 MiB a device call
  carries, so the Lite2 arm is packed on its own (``--arms lite2-224-lr1e-4``, in another folder) and
  ``report`` reads both runs' results. It records, for every site held out, each image's role as
  msbt's own leave-one-site-out assigns it (``msbt.jobs.experiments.site_roles``: the other sites' train and
  val rows, the held-out site's images minus their near-duplicates of another site's train or val image,
  ``cross_site_duplicates`` on the run's split folder); ``train`` reads those roles and nothing else.
* ``train`` runs each arm with every site held out in turn: stage 2 on the other sites' ``train`` rows (each
  image three times per epoch, as ``augment.expansion: 3``), the epoch with the best exact AUC on their ``val``
  rows kept, then every image of the held-out site scored. One training seed (0), where ``multisite.yaml``
  averages three. Augmentation is Keras' random layers for the config's flip, shift, rotation, zoom, contrast and
  brightness, on the GPU, filling with the nearest pixel as msbt does; it is not msbt's: Keras' brightness adds
  up to +-20% of 255 where msbt multiplies by a gain, and msbt's speckle and blur (TensorFlow ops) are left out,
  so the arms compare with each other here, not with docs/evaluation.md's trained designs. Arms, in this order:
  ``96`` (the CPU design: 96 px resized from the 224 px images, 8 epochs; the control for this pipeline), ``224``
  (224 px, 30 epochs, the config's Adam 1e-3), ``224-lr1e-4`` (224 px, 30 epochs, Adam 1e-4, the usual rate for
  fine-tuning a pretrained backbone), ``lite2-224-lr1e-4`` (the same with EfficientNet-Lite2, msbt's largest
  offline ImageNet backbone; trained only where its weights were packed). Every epoch is printed with its time; a
  fold that would start with too little of ``--budget`` left is skipped, and one running when the budget ends
  stops at the end of the epoch it is in (its best epoch so far is scored, and the report says how many epochs it
  ran): the budget can be overrun by one epoch and one scoring.
* ``report`` computes the held-out AUCs with 95% group-bootstrap intervals over the held-out site's lesion groups
  and each arm's paired difference to the ``96`` arm (``msbt.eval.metrics``).

First try on an H200 (2026-12-04, the ``224`` arm then first in the order): its first fold did not finish in
385 s, with no per-epoch output to say why. Time a Lite0 training stage first (``benchmarks/gpu_keras.py``'s
Lite0 run) before planning folds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "workflows" / "configs" / "multisite.yaml"
ARMS = {  # name: (image size, epochs, learning rate or None for the config's, backbone); the cheap control first
    "96": (96, 8, None, "lite0"),
    "224": (224, 30, None, "lite0"),
    "224-lr1e-4": (224, 30, 1e-4, "lite0"),
    "lite2-224-lr1e-4": (224, 30, 1e-4, "lite2"),
}


# ---------------------------------------------------------------------------------------------------
# pack (here) and the data both sides read


def pack(store_path: Path, folder: Path, split_folder: Path, arms: list[str]) -> None:
    import cv2

    from msbt.data.store import Store
    from msbt.jobs.experiments import cross_site_duplicates, read_split_rows, site_roles
    from msbt.model.models import build_backbone

    data = Store.open(store_path).read(["image", "label_index", "site", "split", "group", "source"])
    rows = read_split_rows(split_folder)
    source = [str(x) for x in data["source"]]
    unknown = sorted(set(source) - {r["relpath"] for r in rows})
    if unknown:
        raise SystemExit(f"{split_folder / 'split.csv'} does not list {len(unknown)} of the store's images "
                         f"(e.g. {unknown[0]}): give the split folder of the run that made {store_path}")
    images = data["image"]
    blobs = []
    for image in images:
        grey = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
        ok, buf = cv2.imencode(".png", image[..., 0] if grey else image[..., ::-1])  # PNG stores BGR
        assert ok
        blobs.append(buf.ravel())
    roles_by_site, excluded = {}, 0
    for site in sorted(set(data["site"])):
        duplicates = cross_site_duplicates(split_folder, rows, site)
        roles_by_site[site], excluded = site_roles(rows, site, duplicates), excluded + len(duplicates)
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(folder / "data.npz", png=np.concatenate(blobs), offsets=offsets, size=images.shape[1],
             label=data["label_index"].astype(np.int8), site=data["site"].astype(str),
             split=data["split"].astype(str), group=data["group"].astype(str),
             **{f"role_{site}": np.array([roles.get(x, "") for x in source])
                for site, roles in roles_by_site.items()})
    for variant in sorted({ARMS[arm][3] for arm in arms}):
        build_backbone(f"efficientnet_{variant}", images.shape[1], "imagenet").save_weights(
            folder / f"{variant}.weights.h5")
    weights = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in sorted(folder.glob("*.weights.h5")))
    print(f"{len(images)} images ({excluded} cross-site near-duplicates excluded when their site is "
          f"held out) -> {folder / 'data.npz'} ({offsets[-1] / 1e6:.1f} MB), {weights}")


def load(folder: Path, with_images: bool = True) -> dict:
    raw = np.load(folder / "data.npz")
    data = {k: raw[k] for k in raw.files if k in ("label", "site", "split", "group") or k.startswith("role_")}
    data["row"] = np.arange(len(data["label"]))  # rows of the packed set, kept through a smoke subset
    if with_images:
        import cv2

        png, off = raw["png"], raw["offsets"]
        out = []
        for a, b in zip(off[:-1], off[1:]):
            image = cv2.imdecode(png[a:b], cv2.IMREAD_UNCHANGED)
            out.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., ::-1])
        data["image"] = np.stack(out)
    return data


# ---------------------------------------------------------------------------------------------------
# train (on the GPU machine)


def train_one(data: dict, held: str, size: int, epochs: int, lr: float | None, weights: Path,
              deadline: float = float("inf"), backbone: str = "lite0") -> dict:
    """One arm with one site held out; stops after the epoch that passes ``deadline`` (perf_counter)."""
    import cv2
    import keras
    from keras import layers

    from msbt.config import load_config
    from msbt.eval.metrics import roc_auc
    from msbt.model.compiled import OPTIMIZERS
    from msbt.model.models import build_model

    overrides = [f"stage2.weights={weights}", f"stage2.image_size={size}", f"stage2.epochs={epochs}",
                 f"stage2.backbone=efficientnet_{backbone}"]
    stage = load_config([CONFIG], overrides=overrides).stage2
    images = data["image"]
    if images.shape[1] != size:
        images = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in images])
    y, role = data["label"].astype(np.float32)[:, None], data[f"role_{held}"]
    train, val, test = role == "train", role == "val", role == "test"
    copies = stage.augment.expansion if stage.augment.enabled else 1
    x_train, y_train = np.repeat(images[train], copies, axis=0), np.repeat(y[train], copies, axis=0)

    keras.utils.set_random_seed(0)
    model = build_model(stage, 2)
    aug = stage.augment
    steps = [layers.RandomFlip("horizontal")] if aug.flip else []
    steps += [layers.RandomTranslation(aug.shift, aug.shift, fill_mode="nearest"),
              layers.RandomRotation(aug.rotation / 360.0, fill_mode="nearest"),
              layers.RandomZoom(aug.zoom, fill_mode="nearest"),
              layers.RandomContrast(aug.contrast, value_range=(0, 255)),
              layers.RandomBrightness(aug.brightness, value_range=(0, 255))]
    inputs = keras.Input((size, size, 3))
    augmented = keras.Sequential(steps, name="augment")(inputs) if aug.enabled else inputs
    wrapped = keras.Model(inputs, model(augmented))
    wrapped.compile(optimizer=OPTIMIZERS[stage.optimizer](learning_rate=lr or stage.learning_rate),
                    loss="binary_crossentropy")
    history, best = [], {"auc": float("nan")}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scores = model.predict(images[val], batch_size=64, verbose=0)[:, 0]
            try:
                auc = roc_auc(y[val, 0], scores)
            except ValueError:  # non-finite scores: a diverged epoch
                auc = float("nan")
            history.append(auc)
            # the first of equal epochs, as msbt's saver; a NaN epoch never improves, and is beaten by any other
            if "weights" not in best or auc > best["auc"] or (np.isnan(best["auc"]) and not np.isnan(auc)):
                best.update(auc=auc, epoch=epoch + 1, weights=[w.copy() for w in model.get_weights()])
            print(f"  epoch {epoch + 1}/{epochs}: val AUC {auc:.3f}, {time.perf_counter() - began:.1f} s",
                  flush=True)
            if time.perf_counter() > deadline:
                self.model.stop_training = True

    began = time.perf_counter()
    wrapped.fit(x_train, y_train, batch_size=stage.batch_size, epochs=epochs, shuffle=True, verbose=0,
                callbacks=[KeepBest()])
    model.set_weights(best["weights"])
    p_test = model.predict(images[test], batch_size=64, verbose=0)[:, 0]
    return {"held": held, "size": size, "epochs": epochs, "lr": lr or stage.learning_rate, "backbone": backbone,
            "train_images": int(train.sum()), "val_images": int(val.sum()), "best_epoch": best["epoch"],
            "epochs_run": len(history),
            "val_auc": history, "rows": [int(i) for i in data["row"][test]], "p_test": [float(p) for p in p_test],
            "seconds": time.perf_counter() - began}


def train(folder: Path, out: Path, budget: float, arms: list[str], smoke: bool) -> int:
    import jax

    jax.config.update("jax_compilation_cache_dir", "/tmp/msbt-jax-cache")  # folds of one arm share graphs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    started = time.perf_counter()
    data = load(folder)
    if smoke:  # a few images per site and split, 32 px, 2 epochs: the code path on any machine
        keep = np.zeros(len(data["label"]), bool)
        for s in set(data["site"]):
            for part in ("train", "val", "test"):
                for label in (0, 1):
                    rows = (data["site"] == s) & (data["split"] == part) & (data["label"] == label)
                    keep[np.flatnonzero(rows)[:4]] = True
        data = {k: v[keep] for k, v in data.items()}
    print(f"{len(data['label'])} images, devices {jax.devices()}, {time.perf_counter() - started:.0f} s",
          flush=True)
    results, estimate = [], {}
    for arm in arms:
        size, epochs, lr, backbone = ARMS[arm]
        size, epochs = (32, 2) if smoke else (size, epochs)
        for held in sorted(set(data["site"])):
            left = budget - (time.perf_counter() - started)
            if left < estimate.get(arm, 30.0):
                print(f"{arm} held-out {held}: skipped, {left:.0f} s left", flush=True)
                continue
            weights = folder / f"{backbone}.weights.h5"
            if not weights.is_file():
                print(f"{arm}: skipped, {weights} not packed (pack --arms {arm})", flush=True)
                break
            r = train_one(data, held, size, epochs, lr, weights, deadline=started + budget, backbone=backbone)
            estimate[arm] = r["seconds"] * 0.8  # later folds reuse the compiled graphs
            results.append({"arm": arm, **r})
            print(f"{arm} held-out {held}: {r['epochs_run']} epochs, best {r['best_epoch']}, "
                  f"val AUC {np.nanmax(r['val_auc']):.3f}, "
                  f"{r['seconds']:.0f} s", flush=True)
            out.write_text(json.dumps(results))  # after each fold: a stopped run keeps what it finished
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------------------
# report (here)


def report(folder: Path, results_paths: list[Path], n_boot: int) -> int:
    import warnings

    from msbt.eval.metrics import bootstrap_ci, paired_bootstrap_auc_diff

    data = load(folder, with_images=False)
    # several files: arms trained from separate packs of the same store (the rows must agree to be paired)
    results = [r for path in results_paths for r in json.loads(path.read_text())]
    sites = sorted(set(data["site"]))
    by = {(r["arm"], r["held"]): r for r in results}
    print("| arm | px | epochs | lr | " + " | ".join(f"{s} ({int((data['site'] == s).sum())})" for s in sites) + " |")
    print("|---|---|---|---|" + "---|" * len(sites))
    for arm in dict.fromkeys(r["arm"] for r in results):
        cells, first = [], next(r for r in results if r["arm"] == arm)
        for s in sites:
            r = by.get((arm, s))
            if r is None:
                cells.append("not run")
                continue
            test = np.asarray(r["rows"])
            y, groups, p = data["label"][test].astype(float), data["group"][test], np.asarray(r["p_test"])
            base = by.get(("96", s))
            with warnings.catch_warnings():  # only AUCs are read; rates at 0.5 may be undefined
                warnings.simplefilter("ignore", RuntimeWarning)
                auc = bootstrap_ci(y, p, 0.5, groups=groups, n_boot=n_boot)["auc"]
                cell = f"{auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}]"
                if arm != "96" and base is not None and base["rows"] == r["rows"]:
                    d = paired_bootstrap_auc_diff(y, p, np.asarray(base["p_test"]), groups=groups, n_boot=n_boot)
                    cell += f"<br>{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] vs 96"
                cell += f"<br>epoch {r['best_epoch']} of {r.get('epochs_run', r['epochs'])}, val {np.nanmax(r['val_auc']):.3f}, "
                cell += f"{r['seconds']:.0f} s"
            cells.append(cell)
        print(f"| {arm} | {first['size']} | {first['epochs']} | {first['lr']:g} | " + " | ".join(cells) + " |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="a multi-site store -> data.npz + the arms' backbone weights in FOLDER")
    p.add_argument("store", type=Path)
    p.add_argument("folder", type=Path)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["96", "224", "224-lr1e-4"],
                   help="the arms whose backbone weights to pack (default: the Lite0 ones; Lite0's and Lite2's "
                        "weights together with the data are more than a device call carries)")
    p.add_argument("--split", type=Path, help="the run's ultrasound split folder (default: <run>/data/ultrasound "
                   "for a store at <run>/stores/ultrasound)")
    t = sub.add_parser("train", help="every arm, every site held out (Keras on JAX)")
    t.add_argument("folder", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--budget", type=float, default=330)
    t.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    t.add_argument("--smoke", action="store_true")
    r = sub.add_parser("report", help="held-out AUCs with group-bootstrap CIs")
    r.add_argument("folder", type=Path)
    r.add_argument("results", type=Path, nargs="+", help="train's --out files (several: arms of separate packs)")
    r.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.store, args.folder, args.split or args.store.resolve().parents[1] / "data" / "ultrasound", args.arms)
        return 0
    if args.command == "train":
        if os.environ.get("KERAS_BACKEND", "jax") != "jax":
            parser.error("train runs on Keras' JAX backend (KERAS_BACKEND=jax)")
        os.environ["KERAS_BACKEND"] = "jax"
        return train(args.folder, args.out, args.budget, args.arms, args.smoke)
    return report(args.folder, args.results, args.n_boot)


if __name__ == "__main__":
    raise SystemExit(main())
