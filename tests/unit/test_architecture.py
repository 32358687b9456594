"""The floor plan holds: layers import only downward, no module cycles, no private names across modules.

The layers are declared once, in pyproject.toml's `[tool.importlinter]` (import-linter checks them); the
private-name rule is ours, over the AST. Each check is also run on a copy of the package with one
violation put in, so a check that could never fail would be caught here.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "msbt"


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on ``project`` (a folder with msbt/ and pyproject.toml), with that msbt first on the path."""
    script = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(script), "--no-cache"], cwd=project, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"})


def test_layers_acyclic_and_backend_neutral_contracts_are_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    # an upward import: the model layer reaching into training
    ("model/models.py", "from msbt.train import loop as _upward  # noqa", "msbt.model is not allowed to import msbt.train"),
    # a cycle inside a package: the search space importing the search that imports it
    ("tune/space.py", "from msbt.tune import search as _cycle  # noqa", "No cycles are allowed in msbt.tune"),
    # TensorFlow reached from the model's build/compile modules, here through the augmentation module
    ("model/compiled.py", "from msbt.model import augment as _tf  # noqa", "msbt.model.compiled is not allowed to import tensorflow"),
])
def test_a_violation_breaks_the_contract(tmp_path, module, line, broken):
    shutil.copytree(PACKAGE, tmp_path / "msbt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "msbt" / module
    text = target.read_text()
    anchor = "from __future__ import annotations\n"
    target.write_text(text.replace(anchor, anchor + line + "\n", 1))
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and broken in done.stdout, done.stdout


def private_uses(package: Path) -> list[str]:
    """`from msbt.x import _name` and `module._name` (module an imported msbt module) across modules."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = set()  # local names bound to msbt modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msbt"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno} imports {node.module}.{alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("msbt"):
                        modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_names_are_used_across_modules():
    assert private_uses(PACKAGE) == []


def test_a_private_name_used_across_modules_is_found(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "msbt", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "msbt" / "serve" / "predict.py"
    target.write_text(target.read_text() + "\nfrom msbt.data.discovery import _SYSTEM_FILES  # noqa\n")
    assert any("imports msbt.data.discovery._SYSTEM_FILES" in f for f in private_uses(tmp_path / "msbt"))


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers.py (and tests/dicomfiles.py), never in a test module."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: imports {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert offenders == []
