"""The serving dependencies are pyproject.toml's extras, carried by the wheel the image installs: `serve` (the web
stack) plus exactly one onnxruntime build, `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu + TensorRT), and none
of them holds a training dependency. The Dockerfile, the compose files and the Makefile pick them accordingly."""

from __future__ import annotations

import re
import zipfile

import pytest
import yaml
from deploy_testkit import COMPOSE_FILE, REPO, parse_dockerfile, run_parts
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_serve_is_the_web_stack_and_cpu_gpu_each_bring_one_onnxruntime():
    assert not names(EXTRAS["serve"]) & ONNXRUNTIMES, "serve must combine with either onnxruntime build"
    assert {"fastapi", "uvicorn", "prometheus-client"} <= names(EXTRAS["serve"])
    assert names(EXTRAS["cpu"]) & ONNXRUNTIMES == {"onnxruntime"}
    assert names(EXTRAS["gpu"]) & ONNXRUNTIMES == {"onnxruntime-gpu"} and "tensorrt" in names(EXTRAS["gpu"])
    assert not names(EXTRAS["cpu"]) & names(EXTRAS["gpu"])
    assert not names(PYPROJECT["dependencies"]) & ONNXRUNTIMES


@pytest.mark.parametrize("extra", ["serve", "cpu", "gpu"])
def test_no_training_dependency_is_served(extra):
    train = names(EXTRAS["train"])
    assert not names(EXTRAS[extra]) & train, "the serving image must not install torch & co."
    assert not names(PYPROJECT["dependencies"]) & train


def test_the_built_wheel_carries_the_extras(project_wheel):
    wheel = project_wheel
    with zipfile.ZipFile(wheel) as z:
        metadata = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    provided = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert {"serve", "cpu", "gpu", "train", "dev"} <= provided
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    by_extra: dict[str | None, set[str]] = {}
    for line in requires:
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
        by_extra.setdefault(extra.group(1) if extra else None, set()).add(canonicalize_name(req.name))
    for extra in ("serve", "cpu", "gpu"):
        assert by_extra[extra] == names(EXTRAS[extra]), extra
    assert by_extra[None] == names(PYPROJECT["dependencies"])


def test_the_dockerfile_installs_the_wheel_with_serve_and_one_onnxruntime():
    df = parse_dockerfile()
    runtime = df.stage("runtime")
    default = runtime.args()["EXTRAS"].split(",")
    assert default == ["serve", "gpu"], "the default base is CUDA"
    [line] = [run_parts(i)[1] for i in runtime.all("RUN") if "pip install" in i.args]
    assert '"$1[${EXTRAS}]"' in line and " -r " not in line, "the wheel's metadata is the dependency list"
    export_pip = " ".join(run_parts(i)[1] for i in df.stage("export").all("RUN") if "pip install" in i.args)
    assert "torch==" in export_pip and '"$1[train,cpu]"' in export_pip, "export checks graphs with onnxruntime"
    assert not (REPO / "requirements").exists(), "requirements/*.txt would be a second source of truth"


def test_the_compose_files_and_the_makefile_pick_one_onnxruntime():
    gpu = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["diffprompt"]["build"]["args"]
    assert gpu["EXTRAS"] == "serve,gpu"
    # make setup: everything for development on a CPU host (the `gpu` extra would clash with `cpu`).
    setup = re.search(r"pip install --quiet -e '\.\[([\w,]+)\]'", (REPO / "Makefile").read_text()).group(1)
    assert set(setup.split(",")) == {"train", "serve", "cpu", "dev"}
    local = (REPO / "deploy" / "local-engine.sh").read_text()
    assert '--build-arg "EXTRAS=serve,cpu"' in local
