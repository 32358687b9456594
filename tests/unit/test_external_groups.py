"""`msbt external`'s lesion groups on a real scan of a site (DICOM cine loops, PNG stills, a manifest)."""

import csv

import cv2
import numpy as np

from dicomfiles import write_dicom
from msbt.data.sites import discover_sites
from msbt.data.synth import lesion_images
from msbt.eval.external import lesion_groups


def lesion(label, index, frames=1):
    return np.stack(lesion_images(31, label, index, (frames, frames), 64)[1])


def test_a_cine_loop_left_without_a_group_in_a_manifest_is_one_lesion_not_one_per_frame(tmp_path):
    """A manifest whose group column is filled for some rows: its other rows were each a group of their own,
    so the 4 frames of a cine loop listed without a group counted as 4 independent lesions (7 groups here
    instead of 4), and the site's intervals came out too narrow."""
    write_dicom(tmp_path / "loop.dcm", lesion("malignant", 0, frames=4))
    for name, label, index in (("a.png", "benign", 1), ("b.png", "benign", 2), ("c.png", "malignant", 3)):
        cv2.imwrite(str(tmp_path / name), lesion(label, index)[0])
    rows = [("loop.dcm", "malignant", ""), ("a.png", "benign", "patient-7"), ("b.png", "benign", "patient-8"),
            ("c.png", "malignant", "")]
    with (tmp_path / "site.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    d = discover_sites([f"site={tmp_path / 'site.csv'}"], ["benign", "malignant"], every_class=False)
    assert len(d.records) == 7
    groups = lesion_groups([r.group for r in d.records], d.hashes, d.thumbs, [r.digest for r in d.records])
    by_path = {r.relpath: g for r, g in zip(d.records, groups)}
    frames = {g for p, g in by_path.items() if p.startswith("loop.dcm#frame=")}
    assert len(frames) == 1 and len(set(groups)) == 4
    # a manifest's own group is kept as given (it is written to predictions.csv)
    assert by_path["a.png"] == "patient-7" and by_path["b.png"] == "patient-8"
    assert by_path["c.png"] not in frames | {"patient-7", "patient-8"}


def test_a_patients_rows_and_their_near_duplicates_are_one_group_named_by_the_manifest(tmp_path):
    """As the run's split joins a manifest's group column with near-duplicate links: the same image under a
    second patient's row, or left without a group, belongs to the first patient's group (each was counted as
    an independent lesion)."""
    still = lesion("benign", 1)[0]
    for name in ("a.png", "a-again.png", "a-copy.png"):
        cv2.imwrite(str(tmp_path / name), still)  # one image saved three times
    cv2.imwrite(str(tmp_path / "other.png"), lesion("malignant", 4)[0])
    rows = [("a.png", "benign", "patient-1"), ("a-again.png", "benign", "patient-2"), ("a-copy.png", "benign", ""),
            ("other.png", "malignant", "patient-3")]
    with (tmp_path / "site.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    d = discover_sites([f"site={tmp_path / 'site.csv'}"], ["benign", "malignant"], every_class=False)
    groups = lesion_groups([r.group for r in d.records], d.hashes, d.thumbs, [r.digest for r in d.records])
    by_path = {r.relpath: g for r, g in zip(d.records, groups)}
    assert by_path["a.png"] == by_path["a-again.png"] == by_path["a-copy.png"] in {"patient-1", "patient-2"}
    assert by_path["other.png"] == "patient-3" and len(set(groups)) == 2
