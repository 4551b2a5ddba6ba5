"""A non-editable `pip install` into a fresh venv gives a working `odlora`.

The venv borrows the dependencies (torch, transformers, ...) from this interpreter through a
`.pth` file, so nothing is downloaded; `ondevice_lora` itself must come from the venv, with
`exporters/` and `runtime/` installed inside its namespace and the sample data shipped.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Build from a copy, so that pip's build/ and *.egg-info never land in the working tree.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "out", "runs", ".odlora-home", "odlora-demo", "odlora-web",
                                    "test-output", "*.safetensors", "*.gguf")


def run(cmd, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    source = Path(shutil.copytree(REPO, root / "src", ignore=NOT_SOURCE))
    env = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=root)
    site_packages = Path(run([env / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             cwd=root).stdout.strip())
    # Our site-packages go after the venv's own, so the venv's ondevice_lora wins. Only paths are
    # added: the .pth files in there (such as our editable install's finder) are not run.
    (site_packages / "borrowed_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([env / "bin/python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", source], cwd=root)
    shutil.rmtree(source)  # nothing may depend on the source tree after install
    return env


def test_console_script_help(venv):
    result = run([venv / "bin/odlora", "--help"], cwd=venv)
    assert "base" in result.stdout and "generate" in result.stdout


def test_console_script_base_info(venv, tiny_llama_dir):
    result = run([venv / "bin/odlora", "base", "info", tiny_llama_dir, "--json"], cwd=venv)
    assert json.loads(result.stdout)["architecture"] == "llama"


@pytest.mark.parametrize("module", ["ondevice_lora", "ondevice_lora.exporters", "ondevice_lora.runtime",
                                    "ondevice_lora.web"])
def test_packages_import_from_the_venv(venv, module):
    code = f"import {module} as m; print(m.__file__)"
    location = Path(run([venv / "bin/python", "-c", code], cwd=venv).stdout.strip()).resolve()
    assert location.is_relative_to(venv.resolve()), location
    assert not location.is_relative_to(REPO), location


def test_sample_data_is_installed(venv):
    code = "from ondevice_lora.samples import sample_path; print(sample_path('dates'))"
    path = Path(run([venv / "bin/python", "-c", code], cwd=venv).stdout.strip()).resolve()
    assert path.is_file()
    assert path.is_relative_to(venv.resolve()), path


def test_web_page_is_installed(venv):
    """`odlora serve` finds the demo page's files (apps/web) in the installed package."""
    code = ("from ondevice_lora.web.app import static_file; "
            "print([len(static_file(r)[0]) for r in ('', '/app/app.js', '/app/style.css', '/app/favicon.svg')])")
    sizes = json.loads(run([venv / "bin/python", "-c", code], cwd=venv).stdout)
    assert all(size > 0 for size in sizes), sizes
