"""DICOM input: pixels read right, cine loops kept in one group, and patient data never written anywhere.

Every file is generated here with pydicom (uncompressed) and carries fake identifying elements
(dicomfiles.FAKE_PHI); the tests grep every output for them.
"""

import csv
import dataclasses

import cv2
import numpy as np
import pytest

from helpers import textured
from dicomfiles import FAKE_PHI, phi_found, write_bare_dataset, write_dicom
from msbt.cli import main
from msbt.data.discovery import discover
from msbt.data.preprocess import split_items, ultrasound_arrays
from msbt.data.splits import make_split, save_split
from msbt.images import dicom
from msbt.images.imagefile import ImageError, image_refs, read_image


def cine(seed: int, frames: int = 3, size: int = 64) -> np.ndarray:
    """A lesion seen in `frames` frames: the same scene, shifted a little each time."""
    base = textured(seed, size)
    return np.stack([np.roll(base, i, axis=1) for i in range(frames)])


def test_photometric_interpretations_and_bit_depths(tmp_path):
    gray = cine(1, 1)
    rgb = np.stack([np.stack([textured(2), textured(3), textured(4)], -1)])
    write_dicom(tmp_path / "m2", gray)
    write_dicom(tmp_path / "m1", gray, "MONOCHROME1")
    write_dicom(tmp_path / "rgb", rgb, "RGB")
    write_dicom(tmp_path / "ybr", rgb, "YBR_FULL")
    write_dicom(tmp_path / "b12", gray.astype(np.uint16) * 16, bits_stored=12)  # 12 bits in 16
    assert (read_image(tmp_path / "m2")[:, :, 0] == gray[0]).all()
    assert (read_image(tmp_path / "m1")[:, :, 0] == 255 - gray[0]).all()  # lowest value is white
    assert (read_image(tmp_path / "rgb") == rgb[0]).all()
    assert np.abs(read_image(tmp_path / "ybr").astype(int) - rgb[0]).max() <= 1  # pydicom's YBR -> RGB
    # "scale" maps the declared 12-bit range, not 16 bits (which would leave the image nearly black).
    assert np.abs(read_image(tmp_path / "b12")[:, :, 0].astype(int) - gray[0]).max() <= 1
    stretched = read_image(tmp_path / "b12", "minmax")[:, :, 0]
    assert stretched.min() == 0 and stretched.max() == 255


def test_dicom_is_found_by_its_magic_whatever_its_name(tmp_path):
    write_dicom(tmp_path / "IM000001", cine(1, 1))  # PACS exports: no extension
    write_dicom(tmp_path / "scan.png", cine(2, 1))  # a DICOM misnamed .png is still read as DICOM
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    assert dicom.is_dicom(tmp_path / "IM000001") and dicom.is_dicom(tmp_path / "scan.png")
    assert not dicom.is_dicom(tmp_path / "fake.dcm")
    assert read_image(tmp_path / "IM000001").shape == (64, 64, 3)
    assert read_image(tmp_path / "scan.png").shape == (64, 64, 3)
    with pytest.raises(ImageError, match="fake.dcm.*not an image file"):
        read_image(tmp_path / "fake.dcm")


def write_ybr_full_422(path, rgb):
    """An uncompressed YBR_FULL_422 file of ``rgb`` (H, W, 3), W even: each pixel pair stored as Y Y Cb Cr
    (PS3.3 C.7.6.3.1.2), so the pixel data is 2 bytes a pixel though SamplesPerPixel is 3."""
    import pydicom
    from pydicom.pixels import convert_color_space

    ds = pydicom.dcmread(write_dicom(path, rgb[None], "RGB"))
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # One Cb and one Cr per pair: the first pixel's (the callers make colour constant over pairs).
    pairs = np.stack([ybr[:, 0::2, 0], ybr[:, 1::2, 0], ybr[:, 0::2, 1], ybr[:, 0::2, 2]], -1)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = np.ascontiguousarray(pairs, np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def discover_one(root, name):
    """Discovery of ``root/benign/name`` (the file moved there) beside one good still."""
    (root / "benign").mkdir(exist_ok=True)
    (root / name).rename(root / "benign" / name)
    write_dicom(root / "benign" / "IM0001", cine(9, 1))
    return discover(root, ("benign",))


def test_ybr_full_422_is_read_as_rgb(tmp_path):
    """4:2:2 data holds 2 bytes a pixel; a length check counting 3 (SamplesPerPixel) called it truncated."""
    import pydicom

    # Colour constant over each horizontal pixel pair, so subsampling loses nothing but rounding.
    rgb = np.repeat(np.stack([textured(5), textured(6), textured(7)], -1)[:, ::2], 2, axis=1)
    path = write_ybr_full_422(tmp_path / "ybr422.dcm", rgb)
    image = read_image(path)
    assert (image == pydicom.dcmread(path).pixel_array).all()  # pydicom's own YBR -> RGB, unchanged
    assert np.abs(image.astype(int) - rgb).max() <= 1


def test_dicom_without_pixel_data_says_so(tmp_path):
    """A header without Pixel Data (a report, a cut-off export) is not a 'truncated' image."""
    import pydicom

    ds = pydicom.dcmread(write_dicom(tmp_path / "src.dcm", cine(1, 1)))
    del ds.PixelData
    ds.save_as(str(tmp_path / "report.dcm"), enforce_file_format=True)
    with pytest.raises(ImageError, match="report.dcm: DICOM without pixel data"):
        read_image(tmp_path / "report.dcm")
    d = discover_one(tmp_path, "report.dcm")
    assert d.rejects[0].reason.startswith("DICOM without pixel data")


def test_pixel_data_cut_by_fewer_bytes_than_the_header_is_refused_whole(tmp_path):
    """The bytes the pixel data holds are counted, not the file's size (which includes the header)."""
    data = write_dicom(tmp_path / "loop.dcm", cine(2, 3)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-100])
    assert image_refs(tmp_path / "cut.dcm") == [str(tmp_path / "cut.dcm")]  # not 2 good frames and a bad one
    with pytest.raises(ImageError, match=r"cut.dcm: truncated DICOM \(its pixel data holds 12188 bytes; "
                                         r"its 3 frame\(s\) need 12288\)"):
        read_image(tmp_path / "cut.dcm")


def test_unknown_transfer_syntax_is_a_reject_not_a_crash(tmp_path):
    """A file meta naming a UID that is no transfer syntax: pydicom's ValueError from the length check
    escaped as a bare ValueError, which discovery does not catch."""
    import pydicom

    path = write_dicom(tmp_path / "odd.dcm", cine(3, 1))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    ds.save_as(str(path))
    with pytest.raises(ImageError, match="odd.dcm: DICOM pixel data cannot be decoded"):
        read_image(path)


def test_bare_dataset_named_dcm_is_read_and_other_dcm_files_are_not(tmp_path):
    """No preamble and no DICM magic: read when named as DICOM and pydicom finds an image in it."""
    import pydicom

    frames = cine(4, 2)
    path = write_bare_dataset(tmp_path / "bare.dcm", frames)
    assert path.read_bytes()[:2] == b"\x08\x00" and b"DICM" not in path.read_bytes()[:200]
    assert dicom.is_dicom(path)
    refs = image_refs(path)
    assert [(read_image(ref)[:, :, 0] == frames[i]).all() for i, ref in enumerate(refs)] == [True, True]
    # The name is what admits a file without magic: the same bytes under another name are no DICOM.
    (tmp_path / "bare.bin").write_bytes(path.read_bytes())
    assert not dicom.is_dicom(tmp_path / "bare.bin")
    # Text, zeros and a bare data set without an image, named .dcm, stay rejected (pydicom, forced, reads
    # almost anything as a "data set").
    (tmp_path / "text.dcm").write_text("hello, this is not DICOM\n" * 10)
    (tmp_path / "zeros.dcm").write_bytes(b"\0" * 600)
    ds = pydicom.dcmread(path, force=True)
    del ds.PixelData, ds.Rows
    ds.save_as(str(tmp_path / "noimage.dcm"), implicit_vr=True, little_endian=True, enforce_file_format=False)
    for name in ("text.dcm", "zeros.dcm", "noimage.dcm"):
        assert not dicom.is_dicom(tmp_path / name)
        with pytest.raises(ImageError, match=f"{name}: not an image file"):
            read_image(tmp_path / name)
    # Discovery takes the same decision (its frames are images, as for a Part 10 loop).
    assert discover_one(tmp_path, "bare.dcm").counts() == {"benign": 3}


def test_multiframe_frames_are_images_and_need_an_index(tmp_path):
    frames = cine(3, 4)
    write_dicom(tmp_path / "loop.dcm", frames)
    refs = image_refs(tmp_path / "loop.dcm")
    assert refs == [f"{tmp_path / 'loop.dcm'}#frame={i:04d}" for i in range(4)]
    for i, ref in enumerate(refs):
        assert (read_image(ref)[:, :, 0] == frames[i]).all()
    with pytest.raises(ImageError, match="multi-frame DICOM \\(4 frames\\)"):
        read_image(tmp_path / "loop.dcm")
    with pytest.raises(ImageError, match="no frame 7"):
        read_image(dicom.frame_ref(tmp_path / "loop.dcm", 7))


def dicom_tree(root):
    """benign/malignant with cine loops, stills and one broken DICOM, all carrying fake patient data."""
    for c, label in enumerate(("benign", "malignant")):
        (root / label).mkdir(parents=True)
        for k in range(4):
            write_dicom(root / label / f"loop{k}.dcm", cine(100 * c + k, 3))
            write_dicom(root / label / f"IM{k:04d}", cine(100 * c + 50 + k, 1))
    broken = (root / "benign" / "loop0.dcm").read_bytes()
    (root / "benign" / "broken.dcm").write_bytes(broken[: len(broken) - 5000])
    return root


def test_discovery_split_keep_a_cine_loop_in_one_group(tmp_path):
    root = dicom_tree(tmp_path / "data")
    d = discover(root, ("benign", "malignant"))
    assert d.counts() == {"benign": 16, "malignant": 16}  # 4 loops x 3 frames + 4 stills per class
    assert [(r.path.rsplit("/", 1)[1], r.reason.split(" (")[0]) for r in d.rejects] == [("broken.dcm", "truncated DICOM")]
    assert d.rejects[0].reason.endswith("its 3 frame(s) need 12288)")
    # Even the naive mode ("none": every image its own group) keeps a file's frames together.
    result = make_split(d, ratios=(0.5, 0.25, 0.25), folds=2, grouping="none")
    by_file = {}
    for row in result.table:
        by_file.setdefault(row["relpath"].split("#frame=")[0], set()).add((row["group"], row["split"], row["fold"]))
    loops = {f: v for f, v in by_file.items() if "loop" in f}
    assert len(loops) == 8 and all(len(v) == 1 for v in loops.values())
    assert result.summary["leakage"]["group_aware"] == {"val": 0, "test": 0}


def test_preprocessing_reads_frames_from_the_split(tmp_path):
    root = dicom_tree(tmp_path / "data")
    d = discover(root, ("benign", "malignant"))
    save_split(make_split(d, folds=2), tmp_path / "split")
    items = split_items(tmp_path / "split", root, d.classes, 0)
    batch = {k: np.array([item[k] for item in items]) for k in items[0]}
    out = ultrasound_arrays(batch, image_size=32, aspect="pad", intensity="none")
    assert out.num_rows == len(items) == 32
    frame = next(i for i, item in enumerate(items) if item["source"] == "benign/loop1.dcm#frame=0002")
    image = np.frombuffer(out["image"][frame].as_py(), np.uint8).reshape(32, 32, 3)
    expected = cv2.resize(cine(1, 3)[2], (32, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(image[:, :, 0].astype(int) - expected).max() <= 1


def test_scan_and_split_write_no_patient_data(tmp_path, capsys, caplog):
    root = dicom_tree(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["scan", str(root), "--rejects", str(out / "scan-rejects.csv")]) == 0
    assert main(["split", str(root), "--out", str(out / "split"), "--set", "data.folds=2"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "broken.dcm" in text  # the reject is reported...
    assert not [v for v in FAKE_PHI.values() if v in text or v.split("^")[0] in text]  # ...without patient data
    assert phi_found(out) == []
    rows = list(csv.DictReader((out / "split" / "split.csv").open()))
    assert len(rows) == 32 and any(r["relpath"] == "malignant/loop3.dcm#frame=0001" for r in rows)


def test_pipeline_data_step_and_store_rows_hold_no_patient_data(tmp_path, caplog):
    """The pipeline's data step (scan, rejects, split into the run folder) and the rows the Ray Data
    per-file function makes for the store, written as Parquet: grepped for the fake values."""
    import pyarrow.parquet as pq

    from msbt.config import load_config
    from msbt.jobs.pipeline import prepare_data

    root = dicom_tree(tmp_path / "data")
    micro = tmp_path / "micro"
    for k, line in enumerate(("a", "b")):
        (micro / line).mkdir(parents=True)
        cv2.imwrite(str(micro / line / "f.png"), textured(k))
    config = load_config([], [f"data.ultrasound={root}", f"data.microscope={micro}", "data.folds=2",
                              f"run.storage_path={tmp_path / 'runs'}", "run.name=dcm"])
    prepared = prepare_data(config, modalities=("ultrasound",))["ultrasound"]
    items = split_items(prepared.folder, root, prepared.discovery.classes, 0)
    batch = {k: np.array([item[k] for item in items]) for k in items[0]}
    pq.write_table(ultrasound_arrays(batch, image_size=32, aspect="pad", intensity="none"),
                   tmp_path / "runs" / "dcm" / "rows.parquet", compression="none")  # greppable
    assert len(items) == 32 and (prepared.folder / "rejects.csv").read_text().count("broken.dcm") == 1
    # the store's line counts files as files: 8 cine loops of 3 frames and 8 stills (it said "from 32 files")
    from msbt.data.prepare import build_stores, summarize_stores

    local = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, build="local",
                                                                        image_size=32))
    line = summarize_stores(build_stores(local, {"ultrasound": prepared}))
    assert "ultrasound store: 32 images from 16 files (a cine loop gives one image a frame)" in line
    assert phi_found(tmp_path / "runs") == []
    assert not [v for v in FAKE_PHI.values() if v in caplog.text or v.split("^")[0] in caplog.text]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_predict_reads_cine_frames_and_writes_no_patient_data(tmp_path, capsys):
    """A real (tiny) checkpoint predicts every frame of a cine loop; no output holds patient data."""
    import keras

    from msbt.config import HeadConfig, StageConfig
    from msbt.model.checkpoint import MODEL_FILE, write_manifest
    from msbt.model.models import build_model

    stage = StageConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=32,
                        head=HeadConfig((4,), 0.0), monitor="val_auc")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    keras.utils.set_random_seed(0)
    build_model(stage, 2).save(checkpoint / MODEL_FILE)
    write_manifest(checkpoint, stage_config=stage, class_names=["benign", "malignant"], metrics={}, best_epoch=1)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_dicom(incoming / "loop", cine(7, 3))
    write_dicom(incoming / "still.dcm", cine(8, 1))
    (incoming / "broken.dcm").write_bytes((incoming / "loop").read_bytes()[:-3000])
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(incoming), "--out", str(out / "p.csv"),
                 "--heatmaps", str(out / "heat")]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader((out / "p.csv").open()))
    predicted = sorted(r["path"].rsplit("/", 1)[1] for r in rows if r["label"])
    assert predicted == ["loop#frame=0000", "loop#frame=0001", "loop#frame=0002", "still.dcm"]
    assert [r["reason"].split(" (")[0] for r in rows if not r["label"]] == ["truncated DICOM"]
    assert len(list((out / "heat").glob("*.png"))) == 4
    assert phi_found(out) == [] and phi_found(checkpoint) == []
    assert not [v for v in FAKE_PHI.values() if v in captured.out + captured.err]


def test_a_damaged_element_of_the_pixel_module_is_a_reject_not_a_crash(tmp_path):
    """An unknown value representation in group 0x0028 (here Rows' 'US' made 'JS'): pydicom raises NotImplementedError
    when the element is first read, which escaped read_header and ended `msbt scan`, `predict` and `stream` (and
    was a 500 of `msbt serve`)."""
    data = bytearray(write_dicom(tmp_path / "good.dcm", cine(4, 1)).read_bytes())
    at = data.find(bytes.fromhex("28001000") + b"US")  # (0028,0010) Rows, explicit VR little endian
    data[at + 4:at + 6] = b"JS"
    (tmp_path / "odd.dcm").write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"odd.dcm: damaged DICOM image pixel module \(NotImplementedError\)"):
        read_image(tmp_path / "odd.dcm")
    assert image_refs(tmp_path / "odd.dcm") == [str(tmp_path / "odd.dcm")]
    d = discover_one(tmp_path, "odd.dcm")
    assert [r.reason for r in d.rejects] == ["damaged DICOM image pixel module (NotImplementedError)"]
