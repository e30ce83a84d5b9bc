"""The evaluation command scores a checkpoint on synthetic splits and MDETR files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprompt.cli import main as cli_main
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.synthetic.vocabulary import synthetic_tokenizer
from diffprompt.training.evaluation.rec import evaluate_samples, expression_seeds, predict_samples, sample_seed
from diffprompt.training.models.grounding import GROUNDING_PRESETS, GroundingModel


@pytest.fixture(scope="module")
def baby_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    model = GroundingModel(GROUNDING_PRESETS["baby"](vocab_size=tok.vocab_size))
    out = tmp_path_factory.mktemp("baby")
    model.save_pretrained(out)
    tok.save(out)
    return out


def test_evaluate_prints_a_table_per_split_and_kind(baby_checkpoint, small_world, tmp_path, capsys):
    report = tmp_path / "report.json"
    rc = cli_main(["evaluate", "--checkpoint", str(baby_checkpoint), "--split", "testA", "testB",
                   "--data-dir", str(small_world), "--out", str(report), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("testA", "testB", "attribute", "relation", "R@1", "R@5", "UB"):
        assert word in out
    data = json.loads(report.read_text())
    rows = {r["group"]: r for r in data["results"]["testB"]}
    assert rows["all"]["n"] == len(load_mdetr(small_world / "testB.json"))
    for r in rows.values():
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["UB"] <= 1.0


def test_predictions_cover_every_patch_in_image_pixels(baby_checkpoint, small_world):
    from diffprompt.training.models.diffprompt import load_foundation

    model, tok = load_foundation(baby_checkpoint)
    samples = list(load_mdetr(small_world / "val.json"))[:3]
    preds = predict_samples(model, tok, samples, progress=False)
    for s, p in zip(samples, preds):
        assert p.boxes.shape == (model.config.num_patches, 4)
        assert np.all(np.diff(p.scores) <= 0)  # ranked
        assert p.boxes.min() >= 0 and p.boxes[:, [0, 2]].max() <= s.width and p.boxes[:, [1, 3]].max() <= s.height
    # GIoU is never more lenient than IoU.
    iou = evaluate_samples(model, tok, samples, criterion="iou", progress=False).summary()[-1]
    giou = evaluate_samples(model, tok, samples, criterion="giou", progress=False).summary()[-1]
    assert giou["UB"] <= iou["UB"]


def test_evaluate_without_data_is_a_clear_error(baby_checkpoint, capsys):
    assert cli_main(["evaluate", "--checkpoint", str(baby_checkpoint)]) == 2
    assert capsys.readouterr().err == "error: nothing to evaluate: give --split and/or --json\n"


def test_cli_help_lists_commands(capsys):
    assert cli_main([]) == 2
    out = capsys.readouterr().out
    for name in ("data", "pretrain", "evaluate"):
        assert name in out


@pytest.mark.parametrize("command", ["data", "pretrain", "evaluate", "calibrate", "serve"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: diffprompt " + command in capsys.readouterr().out


def test_seed_policies_service_gives_every_expression_the_raw_seed(small_world):
    samples = list(load_mdetr(small_world / "val.json"))[:4]
    assert expression_seeds(samples, 7) == [7, 7, 7, 7]  # the default: what POST /v1/ground does
    per_expression = expression_seeds(samples, 7, "expression")
    assert per_expression == [sample_seed(7, s.sample_id) for s in samples] and len(set(per_expression)) == 4
    with pytest.raises(ValueError, match="seed policy"):
        expression_seeds(samples, 7, "request")


def test_evaluate_records_its_seed_policy(baby_checkpoint, small_world, tmp_path):
    out = tmp_path / "e.json"
    assert cli_main(["evaluate", "--checkpoint", str(baby_checkpoint), "--split", "val", "--data-dir", str(small_world),
                     "--seed-policy", "expression", "--limit", "8", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["seed_policy"] == "expression"
