"""The stage runner (training/stages/runner.py): data shards, output rules, atomic saves, EMA, and
the runner itself under torchrun with two gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffprompt.core.errors import OutputExistsError
from diffprompt.training.stages.runner import ShardedBatches, check_output
from diffprompt.training.utils.checkpoint import save_checkpoint
from diffprompt.training.utils.ema import EMA
from tests.torchrun_util import run_torchrun


def test_ranks_share_each_epochs_order_and_take_disjoint_batches():
    n, batch, world = 50, 4, 3
    ranks = [ShardedBatches(n, batch, seed=7, rank=r, world_size=world) for r in range(world)]
    assert {len(r) for r in ranks} == {n // (batch * world)}  # every rank takes the same number of steps
    for epoch in (0, 1):
        order = np.random.default_rng([7, epoch]).permutation(n)
        taken = [b for r in ranks for b in r.epoch(epoch)]
        assert all(len(b) == batch for b in taken)
        flat = np.concatenate(taken)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        # batch i of rank r is the (i * world + r)-th batch of the shared order
        for r, sharded in enumerate(ranks):
            for i, b in enumerate(sharded.epoch(epoch)):
                np.testing.assert_array_equal(b, order[(i * world + r) * batch: (i * world + r + 1) * batch])
    one = ShardedBatches(n, batch, seed=7)
    steps = [one.at_step(s) for s in range(2 * len(one))]
    expected = [*one.epoch(0), *one.epoch(1)]
    assert all(np.array_equal(a, b) for a, b in zip(steps, expected, strict=True))


def test_a_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "model"
    assert check_output(out, overwrite=False) == out  # missing
    out.mkdir()
    check_output(out, overwrite=False)  # empty
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=f"{out} exists and is not empty: pass --overwrite"):
        check_output(out, overwrite=False)
    assert check_output(out, overwrite=True) == out


def test_a_save_replaces_the_directory_whole_and_a_failed_save_changes_nothing(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, lambda d: (d / "a.txt").write_text("first"), None, None)
    save_checkpoint(target, lambda d: (d / "b.txt").write_text("second"), None, None)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged

    def broken(d: Path) -> None:
        (d / "c.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(target, broken, None, None)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind


def test_ema_warms_up_then_averages_and_applies_for_a_block_only():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    assert [ema.decay_at(k) for k in (1, 2)] == [0.0, pytest.approx(1 - 2 ** (-2 / 3))]
    assert ema.decay_at(10_000) == 0.5  # capped
    with torch.no_grad():
        p.fill_(2.0)
    ema.update([p])  # the first update copies
    assert torch.equal(ema.averages[0], torch.full((3,), 2.0))
    with torch.no_grad():
        p.fill_(4.0)
    ema.update([p])
    rate = 1 - ema.decay_at(2)
    torch.testing.assert_close(ema.averages[0], torch.full((3,), 2.0 + 2.0 * rate))
    with ema.applied([p]):
        assert torch.equal(p.detach(), ema.averages[0])
    assert torch.equal(p.detach(), torch.full((3,), 4.0))


RUNNER_SCRIPT = '''
import argparse, json, sys
import torch, torch.distributed as dist
from diffprompt.training.stages.runner import StageRunner, TrainStep

args = argparse.Namespace(output=sys.argv[1], overwrite=False, threads=1, device="cpu", run_root=sys.argv[2],
                          seed=0, progress=False)


def train(run, args):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.arange(48, dtype=torch.float32).view(12, 4) / 48
    step = run.wrap(TrainStep(lambda xb: model(xb).pow(2).mean(), model=model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = run.batches(len(x), 2)
    seen = []
    for idx in batches.epoch(0):
        seen += idx.tolist()
        opt.zero_grad()
        step(x[idx]).backward()  # DDP averages the gradients of the ranks' different batches
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(run.world_size)]
    dist.all_gather(gathered, flat)
    all_seen = [None] * run.world_size
    dist.all_gather_object(all_seen, seen)
    report = {"rank": run.rank, "world": run.world_size, "steps": len(batches),
              "in_sync": all(torch.equal(g, gathered[0]) for g in gathered),
              "disjoint": len(set(sum(all_seen, []))) == sum(map(len, all_seen))}
    # one file per rank: the ranks share stdout, where two lines written at once can interleave
    with open(f"{sys.argv[3]}/report-{run.rank}.json", "w") as f:
        json.dump(report, f)
    if run.is_main:
        run.save(lambda d: (d / "weights.json").write_text(json.dumps(flat.tolist())))
    return run.finish({"steps": len(batches)})


with StageRunner("toy", args) as run:
    train(run, args)
'''


@pytest.mark.slow
def test_the_runner_under_torchrun_keeps_ranks_in_step_and_writes_on_rank_0(tmp_path):
    script = tmp_path / "toy_stage.py"
    script.write_text(RUNNER_SCRIPT)
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    proc = run_torchrun([str(script), str(tmp_path / "out"), str(tmp_path / "runs"), str(reports_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(reports_dir.glob("report-*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["steps"] == 3 and r["in_sync"] and r["disjoint"] for r in reports)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["weights.json"]
    (run_dir,) = (tmp_path / "runs").iterdir()  # rank 0 only
    assert run_dir.name == "000-toy"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


def test_precision_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import argparse

    import torch

    from diffprompt.core.errors import UserError
    from diffprompt.training.stages import runner

    cpu = torch.device("cpu")
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(runner, "native_bf16", lambda device, native=native: native)
        args = argparse.Namespace(precision="auto")
        assert runner.resolve_precision(args, cpu) == expected and args.precision == expected
    args = argparse.Namespace(precision="bf16")  # an explicit choice is kept, native or emulated
    assert runner.resolve_precision(args, cpu) == "bf16"
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA device"):
        runner.resolve_precision(argparse.Namespace(precision="fp16"), cpu)
    monkeypatch.undo()
    assert runner.native_bf16(cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
