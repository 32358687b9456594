"""Where a run may write: inside ``<run.storage_path>/<run.name>``, and never inside Ray's copy of the code.

Two mistakes put results where nobody finds them (issue #13, items 0 and 8):

* ``run.name`` with a path in it (``../../x``, ``/abs``, ``a/b``) would put the run folder outside
  ``run.storage_path``; a name is one plain folder name.
* A relative ``run.storage_path`` (the default ``runs``) in a job started with ``ray job submit
  --working-dir .`` resolves against the job's working directory, which is Ray's unpacked copy of the
  upload (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/``). Results there vanish when
  Ray cleans its package cache or session, nothing appears in the user's ``runs/``, and ``--resume``
  after a code change (a new package, a new folder) finds nothing. Such a storage path is refused, and
  the message says how to give an absolute one at submit time.

Ground layer: no Ray import (the package folder is recognised by its path).
"""

from __future__ import annotations

import os
from pathlib import Path

from msbt.config import Config, ConfigError

# Ray unpacks a job's working_dir into <ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>
# (and py_modules into .../py_modules_files/_ray_pkg_<hash>); the prefix is Ray's package naming.
RAY_PACKAGE_PREFIX = "_ray_pkg_"


def check_run_name(name: str) -> str:
    """Return ``name`` if it is one plain folder name, else raise ``ConfigError`` naming ``run.name``."""
    bad = (not isinstance(name, str) or not name.strip() or name in (".", "..") or "\x00" in name
           or "/" in name or "\\" in name or (os.altsep and os.altsep in name) or Path(name).is_absolute())
    if bad:
        raise ConfigError(
            f"run.name {name!r}: must be one plain folder name (no '/', '\\', '..' or absolute path), "
            "because the run folder is <run.storage_path>/<run.name>; put the location in run.storage_path"
        )
    return name


def ray_package_root(path: str | Path) -> Path | None:
    """The Ray package folder (``.../_ray_pkg_<hash>``) that ``path`` lies in, or None."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.name.startswith(RAY_PACKAGE_PREFIX):
            return folder
    return None


def check_storage_path(storage_path: str | Path) -> Path:
    """``run.storage_path`` made absolute, refused when it resolves inside a Ray package folder.

    Raises:
        ConfigError: naming ``run.storage_path``, where it resolved, and how to give it at submit time.
    """
    resolved = Path(storage_path).expanduser().resolve()
    package = ray_package_root(resolved)
    if package is not None:
        raise ConfigError(
            f"run.storage_path {str(storage_path)!r} resolves to {resolved}, inside Ray's unpacked copy of the "
            f"submitted code ({package}): results there are deleted with Ray's package cache, and --resume "
            "could not find them after a code change. Give an absolute path on storage every node can write, "
            "expanded when you submit, e.g. `ray job submit ... -- python workflows/pipeline.py ... "
            "--set run.storage_path=$PWD/runs`"
        )
    return resolved


def run_location(config: Config) -> Path:
    """The run folder ``<run.storage_path>/<run.name>``, absolute, after both checks above."""
    check_run_name(config.run.name)
    return check_storage_path(config.run.storage_path) / config.run.name
