"""The `diffprompt` command: `--help` imports no torch; the training commands' options and defaults."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from diffprompt.cli import COMMANDS

HELP_WITHOUT_TORCH = """
import contextlib, io, json, sys
from diffprompt import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli.main([sys.argv[1], "--help"])
    except SystemExit as e:
        code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
usage = out.getvalue().startswith("usage: diffprompt " + sys.argv[1])
print(json.dumps({"code": code, "usage": usage, "heavy": heavy}))
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_no_torch(command):
    """`diffprompt COMMAND --help` builds the command's parser without torch, diffusers or transformers
    (what keeps it instant); the heavy imports wait for the command's main."""
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "usage": True, "heavy": []}, report


def test_the_command_parsers_offer_what_the_registries_hold():
    from diffprompt.training import pretrain_foundation, train_mask_vae, train_prompt_dit, train_prompts
    from diffprompt.training.models.grounding import GROUNDING_PRESETS
    from diffprompt.training.models.mask_vae import MASK_VAE_PRESETS
    from diffprompt.training.models.prompt_dit import PROMPT_DIT_PRESETS
    from diffprompt.training.models.prompt_learners import LEARNERS, MASK_INPUTS

    assert train_prompts.METHODS == tuple(LEARNERS) and train_prompts.MASK_INPUTS == MASK_INPUTS
    assert set(pretrain_foundation.PRESETS) == set(GROUNDING_PRESETS)
    assert set(train_mask_vae.PRESETS) == set(MASK_VAE_PRESETS)
    assert set(train_prompt_dit.PRESETS) == set(PROMPT_DIT_PRESETS)


TRAINING = {  # command -> (extra arguments, default output)
    "pretrain": ([], "runs/foundation"),
    "train-vae": ([], "runs/mask_vae"),
    "train-dit": (["--conditioning", "pooled"], "runs/prompt_dit_pooled"),
    "train-prompts": (["--method", "coop"], "runs/coop"),
}


@pytest.mark.parametrize("command", sorted(TRAINING))
def test_training_commands_write_under_runs_and_never_over_a_model_without_overwrite(command, tmp_path,
                                                                                     monkeypatch):
    from diffprompt.core.errors import OutputExistsError

    extra, default = TRAINING[command]
    module = importlib.import_module(COMMANDS[command][0])
    monkeypatch.chdir(tmp_path)
    (tmp_path / default).mkdir(parents=True)
    (tmp_path / default / "config.json").write_text("{}")  # a model someone trained before
    with pytest.raises(OutputExistsError, match=f"{default} exists and is not empty: pass --overwrite"):
        module.main(module.build_parser().parse_args(extra))
    assert [p.name for p in (tmp_path / default).iterdir()] == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [default.split("/")[1]]  # no run folder
