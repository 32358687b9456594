"""What a result was made with: package versions, the code's git revision, and the hardware.

:func:`write_environment` puts ``environment.json`` into every result folder (run folder, experiment
folder, Tune experiment, export), so a number can be traced to the software and machine that produced
it. Gathering it imports nothing heavy (versions come from installed package metadata, GPUs from
``nvidia-smi``) and never fails a run: what cannot be found is recorded as null with the reason.
Ground layer: standard library only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from msbt import __version__
from msbt.atomicio import write_text

ENVIRONMENT_FILE = "environment.json"

# Distribution names; OpenCV ships under several (msbt installs the headless build).
PACKAGES = {
    "ray": ("ray",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "keras": ("keras",),
    "numpy": ("numpy",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
    "pyarrow": ("pyarrow",),
    "scikit-image": ("scikit-image",),
    "scipy": ("scipy",),
}


def package_versions() -> dict[str, str | None]:
    """Installed version of each package msbt's numbers depend on (None: not installed), and msbt's own."""
    versions: dict[str, str | None] = {"msbt": __version__}
    for name, distributions in PACKAGES.items():
        versions[name] = None
        for dist in distributions:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def git_revision(folder: str | Path | None = None) -> dict:
    """The git commit of the code (``folder``: default the project holding this package).

    Returns:
        ``{"commit": sha or None, "dirty": bool or None, "reason": why there is none}``; a copy of the code
        without ``.git`` (e.g. the package ``ray job submit`` uploads) or a machine without git gives
        None with the reason, never an error.
    """
    folder = Path(folder) if folder else Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    try:
        commit = subprocess.run([git, "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None, "reason": f"{folder} is not a git checkout"}
        status = subprocess.run([git, "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "reason": f"git failed: {err}"}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()), "reason": None}


def hardware() -> dict:
    """CPU model, logical cores (all, and those this process may use), memory and GPUs of this machine."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "machine": platform.machine(),
        "os": platform.platform(),
    }


def environment() -> dict:
    """Everything :func:`write_environment` records, as data."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_revision(),
        "hardware": hardware(),
        "host": platform.node(),
    }


def write_environment(folder: str | Path) -> Path:
    """Write ``<folder>/environment.json`` (atomically) and return its path.

    The one function every result folder calls; a rerun into the same folder replaces it, so it
    describes the last process that wrote there.
    """
    path = Path(folder) / ENVIRONMENT_FILE
    return write_text(path, json.dumps(environment(), indent=2) + "\n")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict]:
    """NVIDIA GPUs from ``nvidia-smi`` (no TensorFlow import: it costs seconds and claims GPU memory)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus
