"""Discovery on the layouts users have: class folders (Mendeley-like BMP, BUSI-like PNG + masks), manifests."""

import os

import cv2
import numpy as np
import pytest

from helpers import textured
from msbt.data.discovery import HIDDEN_FILE, HIDDEN_FOLDER, DataError, dim_sixteen_bit, discover, write_rejects


def tree(root, spec):
    """Write files: {relpath: ndarray | bytes}."""
    for rel, content in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            assert cv2.imwrite(str(path), content), path
    return root


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_mendeley_like_tree_of_gray_bmp(tmp_path):
    root = tree(tmp_path, {f"{c}/us{i}.bmp": textured(i + 10 * j, 48) for j, c in enumerate(["benign", "malignant"]) for i in range(3)})
    d = discover(root)
    assert d.classes == ("benign", "malignant")
    assert d.counts() == {"benign": 3, "malignant": 3}
    assert [r.relpath for r in d.records][:2] == ["benign/us0.bmp", "benign/us1.bmp"]
    assert d.hashes.shape == (6,) and d.thumbs.shape == (6, 1024)
    assert not d.rejects


def test_busi_like_tree_skips_masks_and_can_drop_normal(tmp_path):
    spec = {}
    for k, c in enumerate(["benign", "malignant", "normal"]):
        for i in range(2):  # distinct seeds: the same image under two classes would be rejected as a conflict
            spec[f"{c}/{c} ({i}).png"] = cv2.cvtColor(textured(100 + 10 * k + i, 40), cv2.COLOR_GRAY2BGR)
            spec[f"{c}/{c} ({i})_mask.png"] = (textured(i, 40) > 128).astype(np.uint8) * 255
        spec[f"{c}/{c} (0)_mask_1.png"] = (textured(5, 40) > 128).astype(np.uint8) * 255
    root = tree(tmp_path, spec)
    d = discover(root, ("benign", "malignant"))
    assert d.counts() == {"benign": 2, "malignant": 2}
    assert d.skipped == {"segmentation mask": 6, "class 'normal' not selected": 5}
    assert discover(root).classes == ("benign", "malignant", "normal")


def test_label_order_follows_requested_classes(tmp_path):
    root = tree(tmp_path, {"a/x.png": textured(1), "b/y.png": textured(2)})
    assert discover(root, ("b", "a")).classes == ("b", "a")
    assert [r.label for r in discover(root, ("b", "a")).records] == ["b", "a"]


def test_rejects_are_reported_and_the_scan_goes_on(tmp_path):
    ok, png = cv2.imencode(".png", textured(3))
    ok, jpg = cv2.imencode(".jpg", textured(4))
    root = tree(tmp_path, {
        "benign/good.png": textured(1),
        "benign/zero.png": b"",
        "benign/cut.png": png.tobytes()[:300],
        "benign/cut.jpg": jpg.tobytes()[:200],
        "benign/notes.txt": b"scan notes",
        "benign/renamed.png": b"GIF89a not really",
        "malignant/good.bmp": textured(2),
        "malignant/.DS_Store": b"\x00",
        "malignant/Thumbs.db": b"\x00",
    })
    d = discover(root)
    assert d.counts() == {"benign": 1, "malignant": 1}
    reasons = {os.path.basename(r.path): r.reason for r in d.rejects}
    assert set(reasons) == {"zero.png", "cut.png", "cut.jpg", "notes.txt", "renamed.png"}
    assert "empty" in reasons["zero.png"]
    assert "truncated PNG" in reasons["cut.png"] and "truncated JPEG" in reasons["cut.jpg"]
    assert "not an image" in reasons["notes.txt"]
    assert "cannot be decoded" in reasons["renamed.png"]
    out = write_rejects(d.rejects, tmp_path.parent / "out" / "rejects.csv")
    assert out.read_text().splitlines()[0] == "path,reason" and len(out.read_text().splitlines()) == 6


def test_strict_mode_stops_at_the_first_reject(tmp_path):
    root = tree(tmp_path, {"a/good.png": textured(1), "a/zero.png": b"", "b/good.png": textured(2)})
    with pytest.raises(DataError, match=r"zero\.png: empty file .*strict"):
        discover(root, strict=True)


def test_unreadable_file_such_as_a_dangling_link(tmp_path):
    root = tree(tmp_path, {"a/good.png": textured(1)})
    (root / "a/link.png").symlink_to(tmp_path / "moved-away.png")
    d = discover(root)
    assert [os.path.basename(r.path) for r in d.rejects] == ["link.png"]
    assert "unreadable" in d.rejects[0].reason


def test_nothing_in_the_data_folder_is_written(tmp_path):
    root = tree(tmp_path / "data", {"a/x.png": textured(1), "a/bad.png": b"", "b/y.png": textured(2)})
    before = snapshot(root)
    discover(root)
    assert snapshot(root) == before


def test_manifest_with_groups_relative_and_absolute_paths(tmp_path):
    root = tree(tmp_path / "imgs", {"p1.png": textured(1), "p2.png": textured(2), "p3.png": textured(3)})
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,group\n"
        "imgs/p1.png,benign,patient-1\n"
        f"{root / 'p2.png'},malignant,patient-2\n"
        "imgs/p3.png,benign,patient-1\n"
        "imgs/missing.png,benign,patient-3\n"
        "imgs/p1.png,benign,patient-1\n"
        ",benign,\n"
    )
    d = discover(manifest, ("benign", "malignant"))
    assert [(r.relpath, r.label, r.group) for r in d.records] == [
        ("imgs/p1.png", "benign", "patient-1"),
        ("imgs/p3.png", "benign", "patient-1"),
        (str(root / "p2.png"), "malignant", "patient-2"),
    ]
    reasons = sorted(r.reason for r in d.rejects)
    assert len(reasons) == 3
    assert any("does not exist" in r for r in reasons) and any("listed twice" in r for r in reasons)
    assert any("without a path" in r for r in reasons)
    # the repeated row is what was rejected: the file is used, once (it read as if the file were left out)
    assert any(r.endswith("used once, as listed at line 2") for r in reasons), reasons


def test_a_file_listed_with_two_labels_is_used_under_neither(tmp_path):
    """The first label was kept (a helper's probe: trained as benign, the malignant row a plain 'listed twice')."""
    root = tree(tmp_path / "imgs", {"p1.png": textured(1), "p2.png": textured(2), "p3.png": textured(3),
                                    "p4.png": textured(4)})
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/p1.png,benign\nimgs/p2.png,malignant\nimgs/p3.png,benign\n"
                        "imgs/p1.png,malignant\nimgs/p1.png,benign\nimgs/p4.png,malignant\n")
    d = discover(manifest, ("benign", "malignant"))
    assert [(r.relpath, r.label) for r in d.records] == [("imgs/p3.png", "benign"), ("imgs/p2.png", "malignant"),
                                                         ("imgs/p4.png", "malignant")]
    assert [r.reason for r in d.rejects] == [
        "listed with two labels: 'benign' at line 2 and 'malignant' at line 5; used under neither",
        "listed again at line 6, already with two labels; used under neither"]


def test_a_manifest_row_with_more_fields_than_the_header_is_named_not_read_shifted(tmp_path):
    """An unquoted comma in a file name shifts the row: its path was 'imgs/a', its label 'b.png' and the real
    label dropped, so the row failed as a missing file of a class 'b.png' (or, with no classes configured, made
    'b.png' a class)."""
    from msbt.data.discovery import check_source

    tree(tmp_path / "imgs", {"p1.png": textured(1), "a,b.png": textured(2), "p3.png": textured(3)})
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/p1.png,benign\nimgs/a,b.png,malignant\nimgs/p3.png,benign,\n")
    with pytest.raises(DataError, match="class 'b.png' not found"):  # the shifted row's 'label' is no class
        check_source(manifest, ("benign", "b.png"))
    d = discover(manifest)  # (the trailing comma of the last row is an empty field, not a shift: read)
    assert tuple(d.classes) == ("benign",) and [r.relpath for r in d.records] == ["imgs/p1.png", "imgs/p3.png"]
    (reject,) = d.rejects
    assert reject.path == f"{manifest}:3"
    assert reject.reason.startswith("manifest row with 3 fields where the header has 2") and "double quotes" in reject.reason
    manifest.write_text('path,label\nimgs/p1.png,benign\n"imgs/a,b.png",malignant\nimgs/p3.png,benign\n')
    d = discover(manifest)  # quoted, as a spreadsheet writes it: read
    assert not d.rejects and ("imgs/a,b.png", "malignant") in [(r.relpath, r.label) for r in d.records]


def test_manifest_without_required_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\na.png,benign\n")
    with pytest.raises(DataError, match="path,label"):
        discover(manifest)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "no class folders"),
])
def test_unusable_sources(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        discover(setup(tmp_path / "data"))


def test_missing_requested_class_and_all_rejected(tmp_path):
    root = tree(tmp_path, {"benign/a.png": textured(1)})
    with pytest.raises(DataError, match="class 'malignant' not found"):
        discover(root, ("benign", "malignant"))
    root2 = tree(tmp_path / "two", {"benign/a.png": b""})
    with pytest.raises(DataError, match="no usable images"):
        discover(root2)


def test_fingerprint_changes_with_content_not_with_scan_order(tmp_path):
    root = tree(tmp_path, {"a/x.png": textured(1), "b/y.png": textured(2)})
    first = discover(root).fingerprint()
    assert discover(root, ("b", "a")).fingerprint() == first
    cv2.imwrite(str(root / "a/x.png"), textured(9))
    assert discover(root).fingerprint() != first


def test_a_source_of_one_class_is_refused_for_training_and_taken_for_scoring(tmp_path):
    """Training needs every class; `msbt external` scores a site of malignant cases alone (every_class=False),
    still refusing a source with none of the classes and a class differing only in case."""
    root = tree(tmp_path / "data", {"malignant/a.png": textured(1), "malignant/b.png": textured(2)})
    with pytest.raises(DataError, match="class 'benign' not found"):
        discover(root, ("benign", "malignant"))
    d = discover(root, ("benign", "malignant"), every_class=False)
    assert d.classes == ("benign", "malignant") and {r.label for r in d.records} == {"malignant"}
    other = tree(tmp_path / "other", {"normal/a.png": textured(3)})
    with pytest.raises(DataError, match="class 'benign' not found"):
        discover(other, ("benign", "malignant"), every_class=False)
    (root / "Benign").mkdir()
    with pytest.raises(DataError, match="'Benign' differs from class 'benign' only in case"):
        discover(root, ("benign", "malignant"), every_class=False)


def sixteen_bit_field(seed, peak, size=48):
    """A textured 16-bit field whose brightest sample is ``peak`` (4095: a 12-bit camera; 65535: the full range)."""
    img = textured(seed, size).astype(np.float64) / 255.0
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * peak).astype(np.uint16)


def test_twelve_and_fourteen_bit_data_in_sixteen_bit_files_are_counted_and_minmax_named(tmp_path):
    import tifffile

    root = tmp_path / "data"
    for c, k in (("HeLa", 0), ("MCF-7", 10)):
        (root / c).mkdir(parents=True)
        tifffile.imwrite(root / c / "twelve.tif", sixteen_bit_field(1 + k, 4095))  # a 12-bit camera's TIFF
        assert cv2.imwrite(str(root / c / "fourteen.png"), sixteen_bit_field(2 + k, 16383))  # 14-bit, as PNG
        tifffile.imwrite(root / c / "full.tif", sixteen_bit_field(3 + k, 65535))
        assert cv2.imwrite(str(root / c / "eight.png"), textured(4 + k))
    d = discover(root)
    assert len(d.sixteen_bit_peaks) == 6  # the 8-bit files have none
    assert d.sixteen_bit_peaks[str(root / "HeLa" / "twelve.tif")] == 4095
    warning = dim_sixteen_bit(d, "scale")
    assert warning.startswith("4 of 6 16-bit files use only a small part of the 16-bit range")
    assert "brightest sample 16383 of 65535, at most 14 bits" in warning and "at most 64 of 255" in warning
    assert "--set data.sixteen_bit=minmax" in warning
    assert dim_sixteen_bit(d, "minmax") is None  # already stretched per image
    for c in ("HeLa", "MCF-7"):
        (root / c / "twelve.tif").unlink()
        (root / c / "fourteen.png").unlink()
    assert dim_sixteen_bit(discover(root), "scale") is None  # full-range 16-bit and 8-bit data: nothing to say


def test_the_ray_data_scan_batch_carries_the_sixteen_bit_peak(tmp_path):
    # inspect_batch is the per-task function of msbt.data.scan; called here without Ray, as a task calls it
    from msbt.data.scan import inspect_batch

    assert cv2.imwrite(str(tmp_path / "twelve.png"), sixteen_bit_field(1, 4095))
    assert cv2.imwrite(str(tmp_path / "eight.png"), textured(2))
    batch = inspect_batch({"index": np.array([0, 1]), "path": np.array([str(tmp_path / "twelve.png"),
                                                                           str(tmp_path / "eight.png")])},
                          options={"sixteen_bit": "scale", "max_pixels": None, "on_partial": "reject"})
    assert batch["peak"].tolist() == [4095, -1]


def test_hidden_files_are_left_out_and_counted_like_hidden_folders(tmp_path):
    """A `.hidden_field.png` in a class folder was used while a hidden folder was left out without a word."""
    root = tree(tmp_path / "data", {
        "HeLa/a.png": textured(1), "HeLa/.hidden_field.png": textured(2), "HeLa/.ipynb_checkpoints/b.png": textured(3),
        "HeLa/sub/.c.png": textured(4), "MCF-7/d.png": textured(5), "MCF-7/._d.png": b"\x00",
        "MCF-7/.DS_Store": b"\x00", ".notes.png": textured(6),
    })
    d = discover(root)
    assert [r.relpath for r in d.records] == ["HeLa/a.png", "MCF-7/d.png"]
    # AppleDouble (._*) and .DS_Store stay operating-system litter: left out, not counted
    assert d.skipped == {HIDDEN_FILE: 3, HIDDEN_FOLDER: 1}
    assert not d.rejects


def test_a_split_saved_with_hidden_files_is_refused_naming_them(tmp_path):
    """A run made before hidden files were left out holds them in its split: its data no longer match, which was
    said as if files had been edited ("files, labels or contents changed"), and the user looked for an edit."""
    import csv
    import json

    from msbt.data.splits import load_split

    root = tree(tmp_path / "data", {"benign/a.png": textured(1), "benign/.scan7.png": textured(2),
                                    "malignant/b.png": textured(3)})
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "split.json").write_text(json.dumps({"data_fingerprint": "made when .scan7.png was used"}))
    with (folder / "split.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["relpath", "label", "group", "split", "fold"], ["benign/a.png", "benign", "g0", "train", 0],
                          ["benign/.scan7.png", "benign", "g1", "test", 0], ["malignant/b.png", "malignant", "g2",
                                                                            "train", 0]])
    with pytest.raises(DataError, match=r"holds 1 hidden files \(names starting with '\.', e\.g\. benign/\.scan7\.png\) "
                                        r"that msbt used until 2026-12-07 and now leaves out"):
        load_split(folder, discover(root))
