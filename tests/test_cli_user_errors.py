"""A user's mistake ends in one `error:` line naming what is wrong, exit status 2, no traceback.

Each class of mistake runs the real `diffprompt` command in a subprocess: an unknown split, a
missing or broken checkpoint, json or image, a bad flag value, a missing argument. (Artifacts
and `diffprompt serve`: tests/service/test_service_cli.py.) A bug keeps its traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIFFPROMPT = Path(sys.executable).with_name("diffprompt")
FOUNDATION = REPO / "checkpoints" / "foundation"


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DIFFPROMPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def run_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process (torch is imported once): for the variants of a class of mistake."""
    from diffprompt.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str, only_line: bool = True) -> str:
    """Exit 2, no traceback, and the last stderr line says `error:` and names every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    if only_line:  # a UserError: nothing else on stderr
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: "), lines
    assert "error:" in lines[-1]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def world(small_world, tmp_path_factory) -> Path:
    """A copy of the small synthetic world that the tests may damage."""
    out = tmp_path_factory.mktemp("cli_world")
    shutil.copy(small_world / "val.json", out / "val.json")
    shutil.copytree(small_world / "images" / "val", out / "images" / "val")
    return out


# -- unknown split -------------------------------------------------------------------------------------


def test_unknown_split_lists_the_valid_ones(tmp_path, capsys):
    line = assert_user_error(run(tmp_path, "evaluate", "--checkpoint", str(FOUNDATION), "--split", "vall"),
                             "argument --split", "invalid choice: 'vall'", only_line=False)
    assert all(name in line for name in ("'val'", "'testA'", "'testB'"))
    assert_user_error(run_here(capsys, "data", "write", "--split", "tset"), "invalid choice: 'tset'", only_line=False)


def test_an_absent_object_split_is_not_for_recall(tmp_path, capsys):
    assert_user_error(run_here(capsys, "evaluate", "--checkpoint", str(FOUNDATION), "--split", "test_absent"),
                      "test_absent", "diffprompt calibrate")


# -- checkpoints --------------------------------------------------------------------------------------


def test_missing_checkpoint_directory(tmp_path, capsys):
    # the README's example with a directory that is not there
    assert_user_error(run(tmp_path, "evaluate", "--checkpoint", "/models/owlv2", "--json", "x.json"),
                      "/models/owlv2: no such directory")
    assert_user_error(run_here(capsys, "export", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path / "a")),
                      "nope", "neither a pipeline directory")


def test_broken_checkpoints(tmp_path, world, capsys):
    broken = tmp_path / "foundation"
    shutil.copytree(FOUNDATION, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_user_error(run(tmp_path, "evaluate", "--checkpoint", str(broken), "--json", str(world / "val.json")),
                      "model.safetensors: not a readable safetensors file")
    (broken / "tokenizer.json").unlink()
    shutil.copy(FOUNDATION / "model.safetensors", weights)
    assert_user_error(run_here(capsys, "evaluate", "--checkpoint", str(broken), "--json", str(world / "val.json")),
                      "foundation: no tokenizer; a checkpoint needs tokenizer.json, or vocab.json + merges.txt")


def test_broken_pipeline_directories(tmp_path, world, capsys):
    root = tmp_path / "checkpoints"
    for name in ("diffprompt", "foundation", "mask_vae", "prompt_dit_tokens"):
        shutil.copytree(REPO / "checkpoints" / name, root / name)
    pipeline = root / "diffprompt"
    args = ("evaluate", "--checkpoint", str(pipeline), "--json", str(world / "val.json"), "--ddim-steps", "5")
    spec = json.loads((pipeline / "pipeline.json").read_text())
    (pipeline / "pipeline.json").write_text("{not json")
    assert_user_error(run(tmp_path, *args), "pipeline.json: not valid JSON")
    (pipeline / "pipeline.json").write_text(json.dumps({**spec, "mask_vae": "../no_vae"}))
    assert_user_error(run_here(capsys, *args), "no_vae: no such directory")
    (pipeline / "pipeline.json").write_text(json.dumps({**spec, "prompt_dit": None}))
    assert_user_error(run_here(capsys, *args), "pipeline.json: names no prompt_dit directory")
    (pipeline / "pipeline.json").write_text(json.dumps(spec))
    (root / "prompt_dit_tokens" / "scheduler_config.json").unlink()
    assert_user_error(run_here(capsys, *args), "scheduler_config.json: missing")


def test_missing_artifact(tmp_path, capsys):
    # (a damaged artifact: tests/service/test_service_cli.py and tests/model_export)
    assert_user_error(run_here(capsys, "evaluate", "--artifact", str(tmp_path / "nope"), "--split", "val"),
                      "nope: artifact directory does not exist")
    assert_user_error(run_here(capsys, "calibrate", "--artifact", str(tmp_path / "nope")),
                      "nope: artifact directory does not exist")


# -- annotations and images -----------------------------------------------------------------------------


def test_missing_and_broken_json(tmp_path, capsys):
    assert_user_error(run(tmp_path, "evaluate", "--checkpoint", str(FOUNDATION), "--json", "missing.json"),
                      "missing.json: file not found")
    (tmp_path / "bad.json").write_text('{"images": [')
    assert_user_error(run_here(capsys, "evaluate", "--checkpoint", str(FOUNDATION), "--json",
                               str(tmp_path / "bad.json")), "bad.json: invalid JSON")


def test_missing_and_broken_images(world, tmp_path, capsys):
    data = json.loads((world / "val.json").read_text())
    first = data["images"][0]["file_name"]
    (world / first).rename(world / (first + ".moved"))
    try:
        assert_user_error(run(tmp_path, "evaluate", "--checkpoint", str(FOUNDATION), "--json",
                              str(world / "val.json"), "--no-progress"), "image file not found", first)
    finally:
        (world / (first + ".moved")).rename(world / first)
    original = (world / first).read_bytes()
    (world / first).write_bytes(b"not a png at all")
    try:
        assert_user_error(run_here(capsys, "evaluate", "--checkpoint", str(FOUNDATION), "--json",
                                   str(world / "val.json"), "--no-progress"), first, "cannot read image")
    finally:
        (world / first).write_bytes(original)


# -- flag values and missing arguments -------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["evaluate", "--checkpoint", str(FOUNDATION), "--split", "val", "--ddim-steps", "0"],
     "argument --ddim-steps: must be a positive integer, got '0'"),
    (["evaluate", "--checkpoint", str(FOUNDATION), "--split", "val", "--threads", "two"],
     "argument --threads: not an integer: 'two'"),
    (["evaluate", "--artifact", "a", "--split", "val", "--providers", "quantum"], "invalid choice: 'quantum'"),
    (["data", "write", "--split", "val", "--n-images", "-3"], "argument --n-images: must be a positive integer"),
    (["export", "--steps", "5", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["evaluatee"], "invalid choice: 'evaluatee'"),
])
def test_bad_flag_values(tmp_path, capsys, args, needle):
    assert_user_error(run_here(capsys, *args), needle, only_line=False)


def test_a_bad_flag_value_in_a_real_process(tmp_path):
    assert_user_error(run(tmp_path, "evaluate", "--checkpoint", str(FOUNDATION), "--split", "val", "--limit", "-1"),
                      "argument --limit: must be a positive integer, got '-1'", only_line=False)


@pytest.mark.parametrize("args, needle", [
    (["evaluate", "--checkpoint", str(FOUNDATION)], "nothing to evaluate: give --split and/or --json"),
    (["evaluate", "--split", "val"], "give --checkpoint (PyTorch) or --artifact (onnxruntime)"),
    (["calibrate"], "give --checkpoint (PyTorch) or --artifact (onnxruntime)"),
])
def test_missing_arguments(tmp_path, capsys, args, needle):
    assert_user_error(run_here(capsys, *args), needle)


def test_a_bug_keeps_its_traceback(capsys):
    """Only UserError is the user's: anything else propagates (here in-process, as the command would)."""
    from diffprompt.cli import run as run_command

    def buggy(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(buggy, None)
    assert capsys.readouterr().err == ""


def test_help_lists_serve_and_calibrate(tmp_path):
    proc = run(tmp_path, "--help")
    assert proc.returncode == 0
    assert "serve" in proc.stdout and "calibrate" in proc.stdout
