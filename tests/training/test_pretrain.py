"""Stage 0 runs end to end (single process and 2-process gloo DDP), saves, resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffprompt.core.errors import OutputExistsError
from diffprompt.training.models.grounding import load_grounding_model
from diffprompt.training.pretrain_foundation import build_parser, main
from tests.torchrun_util import run_torchrun


def _args(world: Path, tmp: Path, *extra: str):
    return build_parser().parse_args([
        "--data-dir", str(world), "--preset", "baby", "--batch-size", "4", "--max-queries", "8",
        "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--val-limit", "6",
        "--run-root", str(tmp / "runs"), "--output", str(tmp / "foundation"), "--threads", "1", "--no-progress",
        *extra,
    ])


def test_two_steps_save_a_loadable_foundation_and_resume(small_world, tmp_path):
    summary = main(_args(small_world, tmp_path, "--steps", "2"))
    out = tmp_path / "foundation"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    load_grounding_model(out)
    ckpt = Path(summary["run_dir"]) / "checkpoint-last"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert not any(p.suffix == ".bin" or p.suffix == ".pt" for p in ckpt.iterdir())  # nothing pickled
    # Resume to step 4 (into the same --output): the step counter continues and the weights move on.
    before = load_file(str(ckpt / "model.safetensors"))
    with pytest.raises(OutputExistsError, match=f"{out}.*--overwrite"):
        main(_args(small_world, tmp_path, "--steps", "4", "--resume", str(ckpt)))
    summary2 = main(_args(small_world, tmp_path, "--steps", "4", "--resume", str(ckpt), "--overwrite"))
    ckpt2 = Path(summary2["run_dir"]) / "checkpoint-last"
    assert json.loads((ckpt2 / "trainer_state.json").read_text())["step"] == 4
    after = load_file(str(ckpt2 / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)


def test_resume_from_a_missing_checkpoint_is_a_clear_error(small_world, tmp_path):
    from diffprompt.training.models.pretrained import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        main(_args(small_world, tmp_path, "--steps", "2", "--resume", str(tmp_path / "nope")))


@pytest.mark.slow
def test_torchrun_two_gloo_processes_stay_in_sync(small_world, tmp_path):
    """2 CPU ranks train 3 steps on different data; DDP must keep their weights identical."""
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from diffprompt.training.pretrain_foundation import build_parser, main\n"
        "from diffprompt.training.stages.runner import StageRunner\n"
        "real_close = StageRunner.close\n"
        "def check_then_close(self, in_step=True):\n"
        "    (ddp,) = self._wrapped  # the DDP wrapper of the stage's training step\n"
        "    flat = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])\n"
        "    gathered = [torch.zeros_like(flat) for _ in range(self.world_size)]\n"
        "    dist.all_gather(gathered, flat)\n"
        "    diff = max((g - gathered[0]).abs().max().item() for g in gathered)\n"
        "    print(f'RANK {self.rank} WORLD {self.world_size} MAXDIFF {diff}', flush=True)\n"
        "    real_close(self, in_step)\n"
        "StageRunner.close = check_then_close\n"
        "main(build_parser().parse_args(sys.argv[1:]))\n"
    )
    proc = run_torchrun([str(script), "--data-dir", str(small_world), "--preset", "baby", "--batch-size", "3",
                         "--max-queries", "8", "--steps", "3", "--eval-every", "100", "--save-every", "100",
                         "--val-limit", "4", "--run-root", str(tmp_path / "runs"), "--output", str(tmp_path / "f"),
                         "--threads", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks write to the same stdout: their lines may run together, so match, don't split
    reports = re.findall(r"RANK (\d) WORLD (\d) MAXDIFF ([-+0-9.e]+?)(?=RANK|\s|$)", proc.stdout)
    assert sorted(r[0] for r in reports) == ["0", "1"], proc.stdout
    for _, world, diff in reports:
        assert world == "2"
        assert float(diff) == 0.0
    # Only rank 0 wrote a run folder.
    assert len(list((tmp_path / "runs").iterdir())) == 1
