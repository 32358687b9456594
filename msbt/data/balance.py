"""Weights of the training loss that balance classes, or each site's classes (``stage.balance``).

Sites differ in size and in their share of malignant images (BUSI's training rows 33% malignant, BrEaST's
38%, Mendeley's 61%). Trained on such a mix, a model can let the largest site decide what it learns, and
can learn a site's look as a sign of its prevalence. ``"site_class"`` gives every (site, class) cell of the
training rows the same total weight, so every site weighs the same and within it both classes do;
``"class"`` balances the classes alone. The weights are a function of the training split only (the cells'
counts), computed once for all workers, and average 1 over the training rows, so a balanced loss is on the
scale of an unbalanced one. Pure NumPy: no Ray, no TensorFlow.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

MODES = ("none", "class", "site_class")
# A class with a quarter or less of the largest class's source files (or training patches) is a minority the
# data step warns about (`minority_classes`): at 1:4 an unweighted loss already lets the large class decide most
# gradient steps, and the validation loss that picks the checkpoint is dominated by it too. BUSI's benign and
# malignant (437 and 210, about 1:2) stay below it; two fields of a cell line against twelve (1:6) do not.
MINORITY_RATIO = 4


def cell_weights(labels: Sequence[int], sites: Sequence[str] | None, mode: str) -> dict[tuple[str, int], float]:
    """The loss weight of each (site, label) cell of the training rows; empty for ``"none"``.

    Args:
        labels: Every training row's class index.
        sites: Every training row's site (``None``: a store without sites, one site).
        mode: ``"none"``, ``"class"`` (the site is ignored: keys ``("", label)``) or ``"site_class"``.

    Returns:
        ``{(site, label): weight}`` with ``weight = rows / (cells * rows in the cell)``: each cell's rows
        together weigh ``rows / cells``, and the weights average 1 over the rows.

    Raises:
        ValueError: An unknown mode, no rows, or sites of another length than labels.
    """
    if mode not in MODES:
        raise ValueError(f"balance must be one of {', '.join(MODES)}, got {mode!r}")
    labels = np.asarray(labels, np.int64)
    if not len(labels):
        raise ValueError("no training rows to balance")
    if sites is not None and len(sites) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(sites)} sites")
    if mode == "none":
        return {}
    keys = [("" if mode == "class" or sites is None else str(site), int(label))
            for site, label in zip(sites if sites is not None else [""] * len(labels), labels)]
    counts: dict[tuple[str, int], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return {key: len(labels) / (len(counts) * n) for key, n in sorted(counts.items())}


def minority_classes(counts: Mapping[str, int], ratio: float = MINORITY_RATIO) -> list[str]:
    """The classes with at most ``1/ratio`` of the largest class's count, in the order given.

    Args:
        counts: Class -> files or rows. Classes with none are left out (they are a missing class, said apart).
        ratio: How many times larger the largest class must be (`MINORITY_RATIO`).
    """
    present = {c: n for c, n in counts.items() if n > 0}
    if len(present) < 2:
        return []
    largest = max(present.values())
    return [c for c, n in present.items() if n * ratio <= largest]


def row_weights(labels: Sequence[int], sites: Sequence[str] | None, cells: dict[tuple[str, int], float]) -> np.ndarray:
    """Each row's weight from :func:`cell_weights` (float32; every row's cell must be in ``cells``).

    ``cells`` empty (``"none"``) gives all ones. A cell keyed by site ``""`` matches any site ("class").

    Raises:
        KeyError: A row whose (site, label) the table does not hold, named.
    """
    labels = np.asarray(labels, np.int64)
    if not cells:
        return np.ones(len(labels), np.float32)
    by_class = all(site == "" for site, _ in cells)
    out = np.empty(len(labels), np.float32)
    for i, label in enumerate(labels):
        key = ("" if by_class or sites is None else str(sites[i]), int(label))
        if key not in cells:
            raise KeyError(f"no loss weight for site {key[0]!r}, class {key[1]}: the table holds {sorted(cells)}")
        out[i] = cells[key]
    return out


def describe(cells: dict[tuple[str, int], float], class_names: Sequence[str]) -> str:
    """One line for logs and manifests: ``site/class weight`` per cell."""
    if not cells:
        return "none"
    return ", ".join(f"{(site + '/') if site else ''}{class_names[label] if label < len(class_names) else label} "
                     f"{weight:.3f}" for (site, label), weight in cells.items())
