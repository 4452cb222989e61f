"""Checkpoint series: the steps kept, the batches of a resumed run, and a run killed mid-way resuming to the very
weights of an uninterrupted one."""

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from toylab import training
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.training import (
    CHECKPOINTS, RESUME, StepBatches, TrainConfig, checkpoint_steps, kept_steps, load_checkpoint, load_trained, train,
)

TASK = get_task("brackets", {"max_length": 12})
MOE = {"ffn": "moe", "router": "noisy", "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}
CFG = TrainConfig(steps=60, n_train=320, n_val=50, batch_size=32, eval_every=30, checkpoint_every=10)


def test_the_kept_steps_start_at_the_initialization_and_end_at_the_last_step() -> None:
    assert checkpoint_steps(CFG) == [0, 10, 20, 30, 40, 50, 60]
    assert checkpoint_steps(replace(CFG, checkpoint_every=7, checkpoint_spacing="log")) == [0, 7, 14, 28, 56, 60]
    assert checkpoint_steps(replace(CFG, checkpoint_every=0)) == []
    with pytest.raises(ValueError, match="checkpoint_spacing"):
        TrainConfig(checkpoint_spacing="cubic")


def test_the_batches_of_any_start_step_are_those_of_the_random_sampler_over_epochs() -> None:
    cfg = TrainConfig(steps=25, n_train=100, batch_size=8, seed=3)  # 12 batches an epoch, 4 indices dropped
    sampler = RandomSampler(range(cfg.n_train), generator=torch.Generator().manual_seed(cfg.seed))
    reference = [batch for _ in range(3) for batch in BatchSampler(sampler, cfg.batch_size, drop_last=True)][:cfg.steps]
    assert list(StepBatches(cfg, lambda: 0)) == reference
    assert list(StepBatches(cfg, lambda: 17)) == reference[17:] and len(StepBatches(cfg, lambda: 17)) == 8


def test_a_run_killed_mid_way_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch) -> None:
    whole = train(TASK, MOE, CFG, tmp_path / "whole", progress=False)
    plain = train(TASK, MOE, replace(CFG, checkpoint_every=0), tmp_path / "plain", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), plain.model.state_dict().values()))
    assert not (tmp_path / "whole" / CHECKPOINTS / RESUME).exists() and kept_steps(tmp_path / "whole") == checkpoint_steps(CFG)

    keep = training.Checkpoints.on_train_batch_end

    def killed_after_step_30(self, trainer, module, *args) -> None:
        keep(self, trainer, module, *args)
        if trainer.global_step == 35:
            raise RuntimeError("killed")

    monkeypatch.setattr(training.Checkpoints, "on_train_batch_end", killed_after_step_30)
    with pytest.raises(RuntimeError, match="killed"):
        train(TASK, MOE, CFG, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / CHECKPOINTS / RESUME).is_file() and not training.is_finished(tmp_path / "resumed")
    monkeypatch.undo()
    resumed = train(TASK, MOE, CFG, tmp_path / "resumed", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()))
    assert resumed.metrics == whole.metrics
    for step in checkpoint_steps(CFG):
        early, again = load_checkpoint(whole, step), load_checkpoint(load_trained(tmp_path / "resumed"), step)
        assert all(torch.equal(a, b) for a, b in zip(early.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(load_checkpoint(whole, 0).W_U.weight, whole.model.W_U.weight)


def test_a_missing_or_tampered_checkpoint_is_named_in_one_line(tmp_path) -> None:
    run = train(TASK, MOE, replace(CFG, steps=20), tmp_path / "run", progress=False)
    with pytest.raises(ToylabError, match="no checkpoint at step 5 .* kept: 0, 10, 20"):
        load_checkpoint(run, 5)
    path = tmp_path / "run" / CHECKPOINTS / "step-000010.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ToylabError, match="SHA-256 differs"):
        load_checkpoint(run, 10)


def test_a_run_with_a_target_stops_once_it_has_held_and_keeps_its_last_weights(tmp_path) -> None:
    cfg = replace(CFG, steps=400, eval_every=20, target=0.3, patience=2, checkpoint_every=100)
    run = train(TASK, MOE, cfg, tmp_path / "run", progress=False)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["stopped_at_target"] and final["steps"] < 400 and final["steps"] % 20 == 0
    assert run.metrics["closing_accuracy"] >= 0.3
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    accuracy = [float(r[rows[0].index("val_closing_accuracy")]) for r in rows[1:] if r[rows[0].index("val_closing_accuracy")]]
    held = [i for i in range(1, len(accuracy)) if accuracy[i - 1] >= 0.3 and accuracy[i] >= 0.3]
    assert held and held[0] == len(accuracy) - 1  # it stopped at the first validation that made two in a row
    assert kept_steps(tmp_path / "run")[-1] == final["steps"]
    assert train(TASK, MOE, replace(cfg, target=1.1), tmp_path / "cap", progress=False).metrics  # never reached: the cap
    assert json.loads((tmp_path / "cap" / "final.json").read_text())["steps"] == 400


def test_target_task_stops_at_the_tasks_own_target(tmp_path, monkeypatch) -> None:
    cfg = replace(CFG, steps=400, eval_every=20, patience=2, checkpoint_every=0)
    monkeypatch.setattr(type(TASK), "target", 0.3)
    own = json.loads((train(TASK, MOE, replace(cfg, target="task"), tmp_path / "own", progress=False).run_dir / "final.json").read_text())
    given = json.loads((train(TASK, MOE, replace(cfg, target=0.3), tmp_path / "given", progress=False).run_dir / "final.json").read_text())
    assert own["stopped_at_target"] and own["steps"] == given["steps"] < 400 and own["weights_sha256"] == given["weights_sha256"]
    monkeypatch.setattr(type(TASK), "target", None)  # a task without a target trains every step
    assert json.loads((train(TASK, MOE, replace(cfg, target="task"), tmp_path / "none", progress=False).run_dir
                       / "final.json").read_text())["steps"] == 400
