"""How often a growing collection moves existing groups, and how far splits stray from their shares.

Simulates a 250-image collection (50 lesions of 1-9 frames, two classes), adds ONE image (a new lesion,
or a new frame of an existing lesion), re-splits, and counts kept images whose split or fold changed.
Pure numpy; no Ray. Usage: python benchmarks/split_stability.py [trials]
"""

import sys

import numpy as np

from msbt.data.splits import assign_groups, keep_previous


def collection(rng, n_images=250):
    labels, groups, keys = [], [], []
    g = 0
    while len(labels) < n_images:
        label = "malignant" if rng.random() < 0.4 else "benign"
        for k in range(min(int(rng.integers(1, 10)), n_images - len(labels))):
            labels.append(label), groups.append(f"lesion{g}"), keys.append(f"{label}/l{g}_f{k}.png")
        g += 1
    return labels, groups, keys


def assign(labels, groups, keys, seed, tol, previous=None):
    split = assign_groups(labels, groups, (0.7, 0.2, 0.1), seed, keys=keys, tolerance=tol)
    fold = assign_groups(labels, groups, [1] * 5, seed, keys=keys, tolerance=tol, salt="fold")
    if previous is not None:  # a re-split over the saved one (msbt.data.splits.keep_previous)
        split = keep_previous(labels, groups, keys, split, dict(zip(previous[2], previous[0])), (0.7, 0.2, 0.1), tol)
        fold = keep_previous(labels, groups, keys, fold, dict(zip(previous[2], previous[1])), [1] * 5, tol)
    return split, fold


def worst_share_error(labels, bins, targets):
    labels, errs = np.asarray(labels), []
    for c in set(labels):
        n = (labels == c).sum()
        errs += [abs((bins[labels == c] == b).sum() / n - t) for b, t in enumerate(targets)]
    return max(errs)


def main(trials=300, tolerances=(0.0, 0.05, 0.1)):
    for anchored in (False, True):
        print("re-split over the saved split (previous kept):" if anchored else "fresh split of the grown folder:")
        for tol in tolerances:
            moved_any, moved_imgs, err = 0, [], []
            for t in range(trials):
                rng = np.random.default_rng(t)
                labels, groups, keys = collection(rng)
                before = assign(labels, groups, keys, t, tol)
                if t % 2:  # a new lesion of one frame
                    labels2, groups2, keys2 = labels + ["benign"], groups + ["new"], keys + ["benign/new.png"]
                else:  # one more frame of an existing lesion
                    i = int(rng.integers(len(labels)))
                    labels2 = labels + [labels[i]]
                    groups2, keys2 = groups + [groups[i]], keys + [f"{keys[i]}.extra.png"]
                after = assign(labels2, groups2, keys2, t, tol, (*before, keys) if anchored else None)
                moved = sum(int((a[:len(labels)] != b).sum()) for a, b in zip(after, before))
                moved_any += moved > 0
                moved_imgs.append(moved)
                err.append(worst_share_error(labels2, after[0], (0.7, 0.2, 0.1)))
            print(f"  tolerance {tol:.2f}: {moved_any}/{trials} additions moved any kept image "
                  f"(mean {np.mean(moved_imgs):.2f} of 500 split+fold places, max {max(moved_imgs)}); "
                  f"worst share error of a class in a split: median {np.median(err):.3f}, max {max(err):.3f}")

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300,
         tuple(float(x) for x in sys.argv[2].split(",")) if len(sys.argv) > 2 else (0.0, 0.05, 0.1))
