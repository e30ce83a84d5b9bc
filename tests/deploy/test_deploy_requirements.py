"""requirements/serve*.txt say exactly what pyproject.toml says (one source of truth) and hold no torch."""

from __future__ import annotations

import pytest
from deploy_testkit import REPO, parse_dockerfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_file(name: str) -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for raw in (REPO / "requirements" / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{name}: options ({line}) belong in the Dockerfile, not here"
        req = Requirement(line)
        key = canonicalize_name(req.name)
        assert key not in out, f"{name}: {req.name} listed twice"
        out[key] = req
    return out


def as_dict(requirements: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in requirements}


def same(found: dict[str, Requirement], expected: dict[str, Requirement]) -> list[str]:
    problems = [f"missing {r}" for k, r in expected.items() if k not in found]
    problems += [f"not in pyproject.toml: {r}" for k, r in found.items() if k not in expected]
    for key in found.keys() & expected.keys():
        a, b = found[key], expected[key]
        if (a.specifier, a.extras, a.marker) != (b.specifier, b.extras, b.marker):
            problems.append(f"{a} differs from pyproject.toml's {b}")
    return problems


CORE = as_dict(PYPROJECT["dependencies"])
SERVE = as_dict(PYPROJECT["optional-dependencies"]["serve"])
GPU = as_dict(PYPROJECT["optional-dependencies"]["gpu"])


def test_cpu_requirements_are_the_core_dependencies_plus_the_serve_extra():
    assert same(requirement_file("serve.txt"), {**CORE, **SERVE}) == []


def test_gpu_requirements_swap_onnxruntime_for_the_gpu_extra():
    expected = {**CORE, **{k: v for k, v in SERVE.items() if k != "onnxruntime"}, **GPU}
    assert same(requirement_file("serve-gpu.txt"), expected) == []
    assert "onnxruntime" not in requirement_file("serve-gpu.txt"), "onnxruntime and onnxruntime-gpu clash"


@pytest.mark.parametrize("name", ["serve.txt", "serve-gpu.txt"])
def test_no_training_dependency_is_served(name):
    train = set(as_dict(PYPROJECT["optional-dependencies"]["train"]))
    assert not set(requirement_file(name)) & train, "the serving image must not install torch & co."


def test_the_dockerfile_installs_these_files():
    df = parse_dockerfile()
    runtime = df.stage("runtime")
    default = runtime.args()["REQUIREMENTS"]
    assert default == "requirements/serve-gpu.txt"
    pip_lines = [i.args for i in runtime.all("RUN") if "pip install" in i.args]
    assert pip_lines == ['pip install --no-cache-dir -r "${REQUIREMENTS}"'], pip_lines
    export_pip = " ".join(i.args for i in df.stage("export").all("RUN") if "pip install" in i.args)
    assert "torch==" in export_pip and ".[train]" in export_pip
