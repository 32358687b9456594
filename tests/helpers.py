"""Helpers shared by the test tiers (imported as `helpers`; fixtures are in tests/conftest.py)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("overview", "metrics", "training", "data", "gradcam", "lineage", "config")


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` of a child that stands in for a command typed at a terminal: SIGINT at its default.

    A shell without job control starts a background command (``cmd &``, ``nohup cmd &``: how CI scripts
    and detached runs are often launched) with SIGINT ignored; the ignore survives ``exec`` into every
    child, and Python then installs no KeyboardInterrupt handler, so a Ctrl-C test's child shrugs the signal
    off. Measured 2026-12-03: both Ctrl-C tests failed (rc 0, the child ran to its end) in a suite started
    with ``(nohup bash .ci/run &)``, and passed started in the foreground.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# The session fixtures of tests/conftest.py that build on the session's tiny run, and all of its fixtures that
# start Ray (tests/unit/conftest.py fails a unit test that asks for one).
TINY_RUN_FIXTURES = {"tiny_stores", "tiny_run"}
RAY_FIXTURES = {"ray_local", *TINY_RUN_FIXTURES}

# The backbone of tests whose subject is not the backbone: msbt's tiny_cnn, whose first short epoch (mostly
# tracing) takes 1.6-1.9 s where Lite0's takes 8.1-8.8 s (docs/training.md, "The test backbone"). Lite0 is
# still trained by the model and training unit tests, the serving and export tests, and `ray job submit` of
# the real smoke pipeline (docs/architecture.md, "Tests").
TINY_BACKBONE = {"backbone": "tiny_cnn", "weights": "none"}
TINY_SETS = ["--set", "stage1.backbone=tiny_cnn", "--set", "stage1.weights=none", "--set", "stage2.backbone=tiny_cnn"]


def shared_data() -> Path:
    """Real data for optional tests: $MSBT_SHARED_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("MSBT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def textured(seed: int, size: int = 64) -> np.ndarray:
    """A random smooth grayscale image: distinct seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(size // 8, size // 8)).astype(np.float32)
    img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
    img = (img - img.min()) / (img.max() - img.min()) * 200 + 20
    return img.astype(np.uint8)


def frame_of(img: np.ndarray, seed: int) -> np.ndarray:
    """Another 'frame' of the same scene: a one-pixel shift and fresh noise."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(img, shift=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    return np.clip(shifted + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


# report.html checks (tests/unit/test_report.py, and every evaluated run)


class Page(HTMLParser):
    """Collects section ids, every URL-bearing attribute and the raw <svg>...</svg> blocks."""

    def __init__(self):
        super().__init__()
        self.ids, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            if name in ("src", "href", "action", "srcset", "data", "poster"):
                self.urls.append(value)


def svgs(text: str) -> list[str]:
    out, start = [], 0
    while (i := text.find("<svg", start)) >= 0:
        j = text.index("</svg>", i) + len("</svg>")
        out.append(text[i:j])
        start = j
    return out


def check_self_contained(text: str) -> Page:
    page = Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), page.urls
    # every link within the page leads somewhere (the nav linked sections a run without them leaves out)
    assert all(u[1:] in page.ids for u in page.urls if u.startswith("#")), (page.urls, page.ids)
    # The only http(s) text allowed is the SVG namespace name (an identifier, never fetched).
    assert text.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert "url(" not in text and "@import" not in text
    for block in svgs(text):
        ET.fromstring(block)  # raises on malformed SVG
    return page


def check_run_report(run, backbone: str) -> None:
    """The report a finished run wrote (evaluation writes it): complete, self-contained, and showing the
    run's own numbers and ``backbone``. Called on a real run by tests/workflows/test_workflows.py, which
    trains one."""
    from msbt.eval.report import threshold_text

    text = (run / "report.html").read_text()
    page = check_self_contained(text)
    assert set(SECTIONS) <= set(page.ids)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["schema_version"] == 3 and metrics["predictions_file"] == "predictions.csv"
    # the run's own test split is said to be an internal estimate, in metrics.json and on the page
    assert metrics["scope"]["kind"] == "internal" and "internal estimate: the test images come from" in text
    assert "<p>The run&#x27;s own test split (internal): " in text  # not "held-out", leave one site out's word
    # charts: ROC, calibration, confusion matrix, and loss + AUC/accuracy curves for both stages
    titles = [ET.fromstring(s).get("aria-label") for s in svgs(text)]
    assert "ROC, test split" in titles and "confusion matrix" in titles
    assert any(t.startswith("Calibration") for t in titles)
    assert {f"Stage 1 ({backbone}): loss", f"Stage 2 ({backbone}): loss", f"Stage 2 ({backbone}): auc"} <= set(titles)
    # the numbers shown are metrics.json's
    acc = metrics["test_ci95"]["accuracy"]
    assert f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" in text
    assert threshold_text(metrics["threshold"]) in text  # as the page prints it (more digits near 0 or 1)
    # the first section: built-in data said to be synthetic, and where stage 1 started (the run's own setting)
    config = yaml.safe_load((run / "config.yaml").read_text())
    start = {"imagenet": "ImageNet weights", "none": "random weights"}[config["stage1"]["weights"]]
    assert "<b>Synthetic data.</b>" in text and f"starting from {start}" in text
    # Grad-CAM captions say the call at the run's threshold ("p=0.00" beside a threshold of 0.00045 did not)
    assert re.search(r"<figcaption>(benign|malignant), p=[^,<]+, called (benign|malignant)<br>", text), text[-3000:]
    assert "accuracy: Wilson 95% over lesion groups" in text  # test_ci95_wilson_groups, beside the bootstrap's
    # data summary, lineage and config
    split = json.loads((run / "data" / "ultrasound" / "split.json").read_text())
    assert f"{split['images']} images from" in text and "naive" in text
    assert f"stage 2  {backbone}  weights=parent" in text and "&lt;- stage 1" in text
    assert f"backbone: {backbone}" in text
    # Grad-CAM: real overlays
    assert text.count('src="data:image/png;base64,') >= 2 and "Grad-CAM failed" not in text
    # the per-image predictions are kept for later comparisons
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0] == "split,source,group,y,p,site"
    assert sum(r.startswith("test,") for r in rows) == metrics["test_images"]


# Grouping: the all-pairs oracle (tests/unit/test_grouping_scale.py, tests/integration/test_scan_ray.py)


def reference_links(hashes, thumbs, max_distance, min_similarity, digests):
    """find_links as it was before multi-index hashing (every pair compared), kept here as the oracle."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found = []
    for start in range(0, n, 256):
        rows = np.arange(start, min(start + 256, n))
        dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= max_distance)
        keep = j > rows[i]
        i, j = rows[i[keep]], j[keep]
        sim = np.einsum("kd,kd->k", thumbs[i], thumbs[j])
        ok = sim >= min_similarity
        found.append(np.stack([i[ok], j[ok], dist[i[ok] - start, j[ok]], np.round(sim[ok] * 1e6)], axis=1))
    table = np.concatenate(found)
    by_digest = {}
    for index, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(index)
    rows = [[m[0], j, int(np.bitwise_count(hashes[m[0]] ^ hashes[j])), round(float(thumbs[m[0]] @ thumbs[j]) * 1e6)]
            for m in by_digest.values() for j in m[1:]]
    table = np.unique(np.concatenate([table, np.array(rows, dtype=np.float64).reshape(-1, 4)]), axis=0)
    _, first = np.unique(table[:, :2].astype(np.int64), axis=0, return_index=True)
    table = table[np.sort(first)]
    return table[:, :2].astype(np.int64), table[:, 2].astype(np.int64), table[:, 3] / 1e6


def split_and_store(root: Path, out: Path, build, cfg) -> Path:
    """Discover ``root``, save its split under ``out/split`` and build a store at ``out/store`` with ``build``
    (msbt.data.preprocess.build_microscope_store or build_ultrasound_store)."""
    from msbt.data.discovery import discover
    from msbt.data.preprocess import split_items
    from msbt.data.splits import make_split, save_split

    found = discover(root)
    save_split(make_split(found, seed=0), out / "split")
    return build(split_items(out / "split", found.root, found.classes, seed=0), out / "store", cfg).path


def tiny_ultrasound_run(tmp_path: Path, *overrides: str):
    """A config over 12 textured 48 px images (6 a class) and its ultrasound store at 32 px, built locally
    (no Ray): ``(config, store path)``."""
    from msbt.config import load_config
    from msbt.data.prepare import ensure_stores

    for i in range(12):
        folder = tmp_path / "data" / ("benign", "malignant")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), textured(300 + i, 48))
    config = load_config([], [f"data.ultrasound={tmp_path / 'data'}", f"run.storage_path={tmp_path}",
                              "preprocess.image_size=32", "preprocess.build=local", *overrides])
    return config, ensure_stores(config, ["ultrasound"])["ultrasound"].path


def ray_actors() -> dict[str, str]:
    """Every actor of this process's Ray cluster, alive or ended: id -> class name."""
    import ray
    from ray.util.state import list_actors

    # This cluster's address: without one, Ray looks for "the" cluster among every raylet on the machine and
    # refuses when it finds several (the other test process's, a subprocess's private one).
    found = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: a.class_name for a in found}


def placement_groups_held(ignore=frozenset()) -> dict[str, str]:
    """Placement groups of this process's Ray cluster that are not removed (id -> state), except ``ignore``."""
    import ray

    return {pg: entry["state"] for pg, entry in ray.util.placement_group_table().items()
            if entry["state"] != "REMOVED" and pg not in ignore}


def file_scheduler(config, log, together: frozenset[str] | set[str] = frozenset()):
    """pytest-xdist's scope scheduler with a whole file as one unit of work (the files named in ``together``
    as one unit between them), and a crash handled as xdist's plain load scheduler handles it.

    xdist 3.8's ``LoadScopeScheduling`` puts a crashed test process's file back in the queue with the test
    that crashed it still to run: the next process runs that test again and crashes too, and after that
    nothing is handed out and the run waits forever (seen in a clean clone on 2026-12-06; reproduced by
    tests/unit/test_suite_scheduler.py). What stalls is this: a test process holds its last test until it is
    sent another or told to stop, and after a crash xdist hands the new process one file at a time, then waits
    for a test to finish before handing out more; a file with one test left to run (or none: xdist also requeues
    the dead process's finished files) never finishes one. Here the crashed test counts as done (xdist reports
    it failed, naming the crash), only files with tests still to run go back in the queue, and a process is
    handed files until it has two tests to run or the queue is empty (then xdist tells it to stop).
    """
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the collection's order (xdist would sort by number of tests)

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "together" if path.rsplit("/", 1)[-1] in together else path

        def _reschedule(self, node):
            super()._reschedule(node)
            # at least two tests, or the process waits for a next one that is never sent (see above)
            while self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) < 2:
                self._assign_work_unit(node)

        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            pending = [(unit, nodeid) for unit, tests in workload.items()
                       for nodeid, completed in tests.items() if not completed]
            if not pending:
                return None
            unit, crashed = pending[0]  # a process runs its tests in order: the first not done crashed it
            workload[unit][crashed] = True
            # only files with tests left: a finished one would be handed out as an empty batch
            self.workqueue.update((u, tests) for u, tests in workload.items() if not all(tests.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

    return ByFile(config, log)


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "256k"):
    """A real tmpfs of ``size`` mounted at ``where`` for the block (a disk to fill); skipped without root."""
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def leave_free(mount: Path, free_bytes: int) -> Path:
    """Fill the tmpfs with one file so that about ``free_bytes`` stay free."""
    filler = mount / "filler"
    stats = os.statvfs(mount)
    take = max(0, stats.f_bavail * stats.f_frsize - free_bytes)
    with open(filler, "wb") as handle:
        handle.write(b"\0" * take)
    return filler
