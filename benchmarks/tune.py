"""Trials per hour of a stage-2 search: full training (Ray Train per trial) vs fast mode (cached features).

Both searches use the same data, search space, epochs and trial count, with the scheduler off so every
trial runs every epoch. The data, the stores and stage 1 are prepared first and shared, so neither side
pays for them. Fast mode's one-off feature computation is reported on its own and also folded into a
second trials-per-hour figure.

    .venv/bin/python benchmarks/tune.py --config workflows/configs/cpu.yaml --trials 8   # the real measurement
    .venv/bin/python benchmarks/tune.py --smoke                                         # proves it runs
    .venv/bin/python benchmarks/tune.py --config workflows/configs/cpu.yaml --fast-reuse 2  # fast mode only:
        # trial processes reused (tune.reuse_processes) or not, alternated pairs; the trials' results compared

Needs a quiet machine: other work on the CPUs changes both figures. Writes <run>/tune/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = ["preprocess.image_size=32", "stage1.weights=none", "stage1.image_size=32", "stage1.epochs=1",
         "stage2.image_size=32", "stage2.epochs=2", "run.name=tune-bench-smoke"]


def _last_results(experiment: Path) -> list[dict]:
    """Each trial's last reported result (Tune's ``result.json``), in trial order."""
    out = []
    for result in sorted(experiment.glob("trial_*/result.json")):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        if lines:
            out.append(json.loads(lines[-1]))
    return out


def _trial_seconds(experiment: Path) -> list[float]:
    """Tune's ``time_total_s`` of each trial's last result: the trial's own running time."""
    return [float(r["time_total_s"]) for r in _last_results(experiment)]


def _search(config, name: str, overrides: list[str], paths, base_overrides) -> dict:
    from msbt.config import load_config
    from msbt.tune.search import experiment_dir, run_search

    cfg = load_config(paths, base_overrides + overrides + [f"tune.experiment={name}"])
    started = time.perf_counter()
    run_search(cfg)
    wall = time.perf_counter() - started
    seconds = _trial_seconds(experiment_dir(cfg))
    return {"experiment": str(experiment_dir(cfg)), "wall_s": round(wall, 1), "trials": len(seconds),
            "mean_trial_s": round(sum(seconds) / max(len(seconds), 1), 2),
            "trials_per_hour": round(3600 * len(seconds) / wall, 1)}


def fast_reuse(config, paths, base, stamp: str, pairs: int) -> int:
    """Fast-mode searches with ``tune.reuse_processes`` off and on, alternated; 1 if their trials differ."""
    fast = ["tune.fast=true", "stage2.trainable_backbone=false"]
    _search(config, f"bench-fast-cache-{stamp}", fast, paths, base)  # the feature cache, outside the timings
    runs: dict[str, list[dict]] = {"false": [], "true": []}
    for pair in range(pairs):
        for reuse in runs:
            row = _search(config, f"bench-reuse-{reuse}-{pair}-{stamp}", fast + [f"tune.reuse_processes={reuse}"],
                          paths, base)
            row["final"] = [r[config.tune.metric] for r in _last_results(Path(row["experiment"]))]
            runs[reuse].append(row)
            print(f"pair {pair}, reuse_processes {reuse:5s}: {row['wall_s']:6.1f} s wall, {row['trials_per_hour']:7.1f} "
                  f"trials/hour, mean trial {row['mean_trial_s']} s", flush=True)
    same = all(r["final"] == runs["false"][0]["final"] for rows in runs.values() for r in rows)
    off, on = ([r["wall_s"] for r in runs[k]] for k in ("false", "true"))
    print(f"\nfast mode, {config.tune.num_samples} trials x {config.stage2.epochs} epochs: wall {off} s with a process per "
          f"trial, {on} s reused (median ratio {statistics.median(off) / statistics.median(on):.2f}x); every trial's "
          f"final {config.tune.metric} {'identical' if same else 'DIFFERS'} across all searches")
    return 0 if same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int, default=8, help="trials per search (default 8)")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once in both searches (default 1)")
    parser.add_argument("--frozen-full", action="store_true",
                        help="also a full-mode search with the backbone frozen: separates what the feature cache "
                             "buys from what freezing the backbone buys")
    parser.add_argument("--smoke", action="store_true", help="smoke.yaml data, 32 px, 2 trials: proves it runs")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a local one)")
    parser.add_argument("--fast-reuse", type=int, default=0, metavar="PAIRS",
                        help="instead: PAIRS fast-mode searches with trial processes started per trial and reused, "
                             "alternated, features cached first; prints their wall times and compares the trials' results")
    args = parser.parse_args(argv)

    from msbt.config import load_config
    from msbt.data.prepare import build_stores, prepare_data
    from msbt.runfolder import run_dir
    from msbt.raycluster import init_ray
    from msbt.tune.search import stage1_checkpoint

    paths = args.config + ([str(ROOT / "workflows" / "configs" / "smoke.yaml")] if args.smoke else [])
    trials = 2 if args.smoke and args.trials == 8 else args.trials
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = (SMOKE if args.smoke else []) + args.overrides + [
        f"tune.num_samples={trials}", f"tune.max_concurrent_trials={args.concurrent}", "tune.scheduler=none"]
    config = load_config(paths, base)
    init_ray(args.address)
    stores = build_stores(config, prepare_data(config))  # shared by both searches, outside the timings
    stage1_checkpoint(config, stores["microscope"].path)

    if args.fast_reuse:
        return fast_reuse(config, paths, base, stamp, args.fast_reuse)
    full = _search(config, f"bench-full-{stamp}", [], paths, base)
    frozen = (_search(config, f"bench-frozen-{stamp}", ["stage2.trainable_backbone=false"], paths, base)
              if args.frozen_full else None)
    fast_started = time.time()
    fast = _search(config, f"bench-fast-{stamp}", ["tune.fast=true", "stage2.trainable_backbone=false"], paths, base)
    feature_files = sorted((run_dir(config) / "tune" / "features").glob("*/features.json"),
                           key=lambda p: p.stat().st_mtime)
    feature_s = json.loads(feature_files[-1].read_text())["seconds"] if feature_files else 0.0
    # The search's wall time holds the feature computation only if it ran now, not if an earlier run of
    # this benchmark (same run name) had cached the same features.
    computed_now = bool(feature_files) and feature_files[-1].stat().st_mtime >= fast_started
    fast["feature_cache_s"] = feature_s
    fast["features_computed_in_this_run"] = computed_now
    spent = feature_s if computed_now else 0.0
    fast["trials_per_hour_without_features"] = round(3600 * fast["trials"] / max(fast["wall_s"] - spent, 1e-9), 1)
    speedup = full["mean_trial_s"] / max(fast["mean_trial_s"], 1e-9)
    report = {"configs": paths, "overrides": args.overrides, "trials": trials, "epochs": config.stage2.epochs,
              "backbone": config.stage2.backbone, "image_size": config.stage2.image_size,
              "trainable_backbone": config.stage2.trainable_backbone,
              "full": full, "fast": fast, "per_trial_speedup": round(speedup, 1)}
    if frozen:
        report["full_frozen"] = frozen
        report["per_trial_speedup_vs_frozen"] = round(frozen["mean_trial_s"] / max(fast["mean_trial_s"], 1e-9), 1)
    out = run_dir(config) / "tune" / f"benchmark-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nstage-2 search, {trials} trials x {config.stage2.epochs} epochs, {config.stage2.backbone} @ "
          f"{config.stage2.image_size} px, {args.concurrent} at a time")
    print(f"{'mode':<40} {'trials/hour':>12} {'mean s/trial':>13} {'wall s':>8}")
    tuned = "backbone fine-tuned" if config.stage2.trainable_backbone else "backbone frozen"
    print(f"{f'full training ({tuned})':<40} {full['trials_per_hour']:>12} {full['mean_trial_s']:>13} "
          f"{full['wall_s']:>8}")
    if frozen:
        print(f"{'full training (backbone frozen)':<40} {frozen['trials_per_hour']:>12} "
              f"{frozen['mean_trial_s']:>13} {frozen['wall_s']:>8}")
    label = "fast mode, feature cache included" if computed_now else "fast mode (features cached earlier)"
    print(f"{label:<40} {fast['trials_per_hour']:>12} {fast['mean_trial_s']:>13} {fast['wall_s']:>8}")
    print(f"{'fast mode, features already cached':<40} {fast['trials_per_hour_without_features']:>12}")
    print(f"feature cache: {feature_s:.1f} s once{'' if computed_now else ' (by an earlier run)'}; "
          f"per-trial speed-up (mean s/trial): {speedup:.1f}x"
          + (f", {report['per_trial_speedup_vs_frozen']}x against full training with the backbone frozen"
             if frozen else ""))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
