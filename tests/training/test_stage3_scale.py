"""Stage 3 at real size: gradient accumulation, gradient checkpointing, the one-cycle schedule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffprompt.core.errors import UserError
from diffprompt.training import train_prompts
from diffprompt.training.models.grounding import GroundingModel
from diffprompt.training.models.prompt_learners import PromptLearner, prompted_forward
from diffprompt.training.stages.prompts import micro_batches, one_cycle
from tests.foundation_testkit import save_baby_foundation


@pytest.fixture(scope="module")
def foundation_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("baby")
    save_baby_foundation(root)
    return root


def train(foundation_dir, small_world, out, *extra: str) -> dict:
    argv = ["--method", "vpt", "--foundation", str(foundation_dir), "--data-dir", str(small_world),
            "--run-root", str(out.parent / "runs"), "--threads", "1", "--no-progress", "--eval-every", "0",
            "--precision", "fp32", "--output", str(out), *extra]
    return train_prompts.main(train_prompts.build_parser().parse_args(argv))


def test_accumulated_micro_batches_train_the_same_weights_as_the_whole_batch(foundation_dir, small_world, tmp_path):
    whole = train(foundation_dir, small_world, tmp_path / "whole", "--epochs", "2", "--batch-size", "8")
    parts = train(foundation_dir, small_world, tmp_path / "parts", "--epochs", "2", "--batch-size", "8",
                  "--micro-batch-size", "3")
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert parts["history"][-1]["loss"] == pytest.approx(whole["history"][-1]["loss"], rel=1e-4)


def test_exactly_ten_optimizer_steps_train(foundation_dir, small_world, tmp_path):
    """32 train expressions in batches of 32 = 1 step per epoch; 10 epochs = 10 steps (OneCycleLR divided by zero)."""
    summary = train(foundation_dir, small_world, tmp_path / "ten", "--epochs", "10", "--batch-size", "32")
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 11))


@pytest.mark.parametrize("total", [1, 2, 3, 9, 10, 11, 20, 500])
def test_one_cycle_steps_through_any_length_and_keeps_ten_percent_warm_up(total):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = one_cycle(optimizer, 1e-3, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    if total == 500:
        assert max(range(total), key=lrs.__getitem__) == 49  # peak at 10%, as always
    assert max(lrs) <= 1e-3 + 1e-12


def test_micro_batches_cover_the_batch_once():
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batches(7, None) == [slice(0, 7)]


def test_bad_micro_batch_size_and_fp16_on_cpu_are_user_errors(foundation_dir, small_world, tmp_path):
    with pytest.raises(UserError, match="--micro-batch-size must be >= 1"):
        train(foundation_dir, small_world, tmp_path / "a", "--micro-batch-size", "0")
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA device"):
        train(foundation_dir, small_world, tmp_path / "b", "--precision", "fp16", "--device", "cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(foundation_dir):
    foundation = GroundingModel.from_pretrained(foundation_dir).requires_grad_(False)
    learner = PromptLearner.for_foundation(foundation, "vpt", depth=2, length=4)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, foundation.config.image_size, foundation.config.image_size)
    ids = torch.tensor([[1, 5, 7, 2], [1, 6, 2, 0]])
    mask = (ids > 0).long()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        learner.zero_grad(set_to_none=True)
        out = prompted_forward(foundation, learner, pixels, ids, mask)
        (out.logits.square().sum() + out.pred_boxes.sum()).backward()
        return out.logits.detach(), [p.grad.clone() for p in learner.parameters()]

    plain_logits, plain_grads = run()
    foundation.set_gradient_checkpointing()
    assert foundation.vision_model.encoder.gradient_checkpointing
    ckpt_logits, ckpt_grads = run()
    torch.testing.assert_close(ckpt_logits, plain_logits)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)
