"""The scan on Ray Data gives the same records, rejects, fingerprints and groups as the threaded scan."""

import cv2
import numpy as np
import pytest

from helpers import frame_of, reference_links, textured
from msbt.data.discovery import DataError, discover
from msbt.data.scan import choose_scan, scan, scan_inspector
from msbt.data.splits import make_split
from msbt.images.grouping import connected_groups


def test_choose_scan_follows_the_mode_the_size_and_the_cluster():
    assert choose_scan("auto", 10, 2000, ray_up=True) == "local"
    assert choose_scan("auto", 5000, 2000, ray_up=True) == "ray"
    assert choose_scan("auto", 5000, 2000, ray_up=False) == "local"
    assert choose_scan("local", 5000, 2000, ray_up=True) == "local"
    assert choose_scan("ray", 1, 2000, ray_up=True) == "ray"
    with pytest.raises(ValueError, match="ray needs an initialised Ray"):
        choose_scan("ray", 1, 2000, ray_up=False)
    with pytest.raises(ValueError, match="unknown mode 'cluster'"):
        scan_inspector("cluster")
    # the store's choice (preprocess.build) is made the same way and names its own key
    with pytest.raises(ValueError, match="^preprocess.build: ray needs .* or use preprocess.build: auto"):
        choose_scan("ray", 1, 512, ray_up=False, key="preprocess.build")


def mixed_tree(root):
    """Two classes with near-duplicate frames, an exact copy, masks, and every kind of bad file."""
    files = {}
    for c, base in (("benign", 0), ("malignant", 50)):
        for lesion in range(6):
            img = textured(base + lesion, 64)
            for frame in range(1 + lesion % 3):
                files[f"{c}/l{lesion}_f{frame}.png"] = frame_of(img, 100 * lesion + frame) if frame else img
        files[f"{c}/l0_f0_mask.png"] = (textured(7, 64) > 128).astype(np.uint8) * 255
    files["benign/copy.bmp"] = files["benign/l1_f0.png"]
    ok, png = cv2.imencode(".png", textured(9))
    bad = {"benign/zero.png": b"", "benign/cut.png": png.tobytes()[:300], "malignant/notes.txt": b"x",
           "malignant/renamed.png": b"GIF89a not really"}
    for rel, content in {**files, **bad}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            assert cv2.imwrite(str(path), content)
    return root


def assert_same(a, b):
    assert a.records == b.records and a.rejects == b.rejects and a.skipped == b.skipped
    assert a.classes == b.classes and a.root == b.root and a.fingerprint() == b.fingerprint()
    assert a.hashes.dtype == b.hashes.dtype == np.uint64
    np.testing.assert_array_equal(a.hashes, b.hashes)
    np.testing.assert_array_equal(a.thumbs, b.thumbs)


@pytest.mark.ray
def test_ray_scan_equals_threaded_scan_on_generated_data(tmp_path, ray_local):
    root = mixed_tree(tmp_path / "data")
    local = discover(root)
    on_ray = scan(root, mode="ray")
    assert len(local.rejects) == 4 and local.skipped == {"segmentation mask": 2}
    assert_same(on_ray, local)
    split_local, split_ray = make_split(local), make_split(on_ray)
    assert split_ray.table == split_local.table and split_ray.summary == split_local.summary
    assert split_ray.summary["groups"]["multi_image"] >= 4  # the frames were linked, not left alone
    # auto with a threshold above the file count stays local; at or below it uses Ray: same answer.
    assert_same(scan(root, mode="auto", min_files=1), local)
    with pytest.raises(DataError, match=r"(zero|cut)\.png: .*strict"):
        scan(root, mode="ray", strict=True)


@pytest.mark.ray
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mendeley-rodrigues", "busi-256"])
def test_ray_scan_gives_the_same_groups_on_real_data(real_data, ray_local, name):
    root = real_data(name)
    classes = ("benign", "malignant")
    local = discover(root, classes)
    on_ray = scan(root, classes, mode="ray")
    assert_same(on_ray, local)
    # Groups as they were before multi-index hashing: every pair compared (the oracle in
    # test_grouping_scale), on the threaded scan's fingerprints.
    pairs, _, _ = reference_links(local.hashes, local.thumbs, 10, 0.8, [r.digest for r in local.records])
    before = [f"g{c:05d}" for c in connected_groups(len(local.records), pairs)]
    assert [row["group"] for row in make_split(on_ray).table] == before
    if name == "mendeley-rodrigues":
        assert len(set(before)) == 48  # the 48 lesions of docs/data.md


def test_scan_mode_is_a_checked_config_key():
    from msbt.config import ConfigError, load_config

    assert load_config().data.scan == "auto" and load_config().data.scan_ray_min_files == 2000
    assert load_config(overrides=["data.scan=ray"]).data.scan == "ray"
    with pytest.raises(ConfigError, match="data.scan"):
        load_config(overrides=["data.scan=cluster"])
