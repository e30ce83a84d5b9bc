"""The installed package: one `diffprompt` namespace, and its layers as import-linter contracts.

The wheel is built from this checkout (no network: --no-build-isolation), unpacked, and checked as
a user gets it: every repository folder appears under `diffprompt.`, nothing generic lands at the
top of site-packages, and `lint-imports` keeps every contract of pyproject.toml. A negative control
proves the contracts can fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
SETUPTOOLS = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]


@pytest.fixture(scope="module")
def unpacked_wheel(project_wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("installed") / "site-packages"
    with zipfile.ZipFile(project_wheel) as z:
        z.extractall(site)
    return site


def lint_imports(site: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, str(PYPROJECT), "--no-cache"], cwd=site, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})


def test_the_package_list_names_every_package_folder():
    mapped = SETUPTOOLS["package-dir"]  # installed name -> folder in the repository

    def folder(package: str) -> Path:
        for name, path in sorted(mapped.items(), key=lambda kv: -len(kv[0])):
            if package == name or package.startswith(name + "."):
                return REPO / path / Path(*package[len(name):].lstrip(".").split(".") if package != name else ())
        raise AssertionError(f"{package} is under no package-dir mapping")

    on_disk = set()
    for name, path in mapped.items():
        for init in (REPO / path).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / path)
            on_disk.add(".".join([name, *rel.parts]))
    listed = set(SETUPTOOLS["packages"])
    data_only = {p for p in listed if not (folder(p) / "__init__.py").exists()}
    assert on_disk == listed - data_only, "pyproject's [tool.setuptools] packages and the folders differ"
    assert all(folder(p).is_dir() for p in listed)


def test_the_wheel_installs_one_namespace(unpacked_wheel):
    top = sorted(p.name for p in unpacked_wheel.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["diffprompt"], top
    pkg = unpacked_wheel / "diffprompt"
    for sub in ("core", "training", "model_export", "service"):
        assert (pkg / sub / "__init__.py").exists(), sub
    assert (pkg / "service" / "static" / "index.html").exists()
    assert (pkg / "service" / "static" / "favicon.ico").exists()
    assert sorted(p.name for p in (pkg / "service" / "static" / "samples").glob("*.png"))
    assert (pkg / "model_export" / "triton_model.py").exists()


def test_import_linter_keeps_every_layer_contract(unpacked_wheel):
    proc = lint_imports(unpacked_wheel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout
    for contract in contracts:
        assert f"{contract['name']} KEPT" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("service/schemas.py", "import diffprompt.training.models.grounding", "service imports neither"),
    ("core/ddim.py", "import torch", "the core is torch-free"),
    ("training/losses.py", "import diffprompt.model_export.export", "training imports neither"),
])
def test_a_forbidden_import_breaks_its_contract(unpacked_wheel, tmp_path, module, line, contract):
    broken = tmp_path / "site"
    shutil.copytree(unpacked_wheel, broken)
    path = broken / "diffprompt" / module
    path.write_text(path.read_text() + f"\n{line}  # the negative control\n")
    proc = lint_imports(broken)
    assert proc.returncode != 0
    assert any(contract in row and "BROKEN" in row for row in proc.stdout.splitlines()), proc.stdout
