"""The layer contracts of pyproject.toml's [tool.importlinter], checked by import-linter.

import-linter (grimp) finds a package's modules by walking its directory, and our package maps
three folders of the repository into it (exporters/, runtime/, apps/web/: setuptools' package-dir),
so the check runs on a copy laid out as an installed package. It also fails on a deliberate
violation, so that a contract that silently checks nothing cannot pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (the test extra)")


def installed_layout(dest: Path) -> Path:
    """The package's Python files under dest/, where an installed copy puts them."""
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dirs.items()):  # parents before their children
        shutil.copytree(ROOT / folder, dest / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir())
                                                 or n in ("native", "__pycache__")])
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def test_the_layer_contracts_hold(tmp_path):
    result = lint(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout


def test_a_runtime_that_imports_training_code_breaks_them(tmp_path):
    tree = installed_layout(tmp_path)
    engine = tree / "ondevice_lora" / "runtime" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom ..train import TrainConfig  # noqa: E402\n")
    result = lint(tree)
    assert result.returncode == 1
    assert "the runtime carries no training code" in result.stdout and "BROKEN" in result.stdout
    assert "ondevice_lora.runtime.engine -> ondevice_lora.train" in result.stdout


def test_every_core_module_is_under_the_core_contract():
    """A module added to ondevice_lora/ is in the core's contract (or is one of the layers above it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["name"].startswith("the core imports"))["source_modules"]
    above = {"ondevice_lora.cli", "ondevice_lora.demo", "ondevice_lora.__main__", "ondevice_lora.__init__"}
    modules = {f"ondevice_lora.{p.stem}" for p in (ROOT / "ondevice_lora").glob("*.py")}
    modules |= {f"ondevice_lora.{p.parent.name}" for p in (ROOT / "ondevice_lora").glob("*/__init__.py")}
    assert modules - above - set(core) == set()
