"""benchmarks/gpu.sh on a machine without a GPU: its CPU-only checks run, it says "no GPU", exits 0."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_stage():
    spec = importlib.util.spec_from_file_location("gpu_stage", ROOT / "benchmarks" / "gpu_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib only at import time
    return module


def test_projection_separates_tracing_from_steady_epochs():
    p = gpu_stage().projection(30.0, [4.0, 5.0, 4.5], images_per_epoch=525, epochs=30)
    assert p["s_per_epoch"] == 4.5 and p["projected_s"] == 30.0 + 29 * 4.5
    assert p["images_per_s"] == pytest.approx(525 / 4.5)
    with pytest.raises(ValueError, match="at least two epochs"):
        gpu_stage().projection(30.0, [], 525)


@pytest.mark.slow
def test_gpu_script_on_cpu_says_no_gpu_and_exits_zero():
    # Hide any GPU so the test means the same on every machine (on a GPU machine the script would
    # otherwise start the timed runs).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-2000:]
    assert "== CPU-only checks" in out and "dry run ok: resnet50 stage-2 model" in out
    assert "no GPU: TensorFlow sees no GPU" in out
    assert "stage 2 timings" not in out
