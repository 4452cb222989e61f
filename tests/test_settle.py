"""Training to a target with settled routing (`TrainConfig.settle`): routing that keeps changing does not stop a run,
stable routing does, the logged stability is the share of tokens keeping their expert set, and a resumed run keeps it."""

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from toylab.config import build
from toylab.determinism import data_seed
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.study import target_note
from toylab.training import ROUTING_STABLE, SequenceModel, TrainConfig, load_checkpoint, train

TASK = get_task("brackets", {"max_length": 10, "min_length": 2})
MOE = {"ffn": "moe", "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}
# Target 0 is reached at every validation, so only routing can hold a run back; lr 1e-6 barely moves the router.
STILL = TrainConfig(steps=60, batch_size=16, n_train=160, n_val=40, eval_every=10, warmup_steps=0, lr=1e-6, target=0.0, settle=0.9)


def logged(run_dir, column: str) -> dict[int, float]:
    """`{step: value}` of a validation metric in a run's metrics.csv (Lightning's step column is the step before)."""
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return {int(row["step"]) + 1: float(row[column]) for row in rows if row.get(column)}


def final(run_dir) -> dict:
    return json.loads((run_dir / "final.json").read_text())


@pytest.mark.parametrize("settle, message", [(0.0, r"settle must be in \(0, 1\]"), (-0.5, r"\(0, 1\]"), (1.5, r"\(0, 1\]"),
                                             (math.nan, "'settle'; expected a finite number")])
def test_a_settle_outside_0_1_is_refused_in_one_line(settle, message) -> None:
    with pytest.raises(ToylabError, match=message) as error:
        build(TrainConfig, {"target": "task", "settle": settle})
    assert "\n" not in str(error.value)


def test_a_settle_without_a_target_is_refused_in_one_line() -> None:
    with pytest.raises(ToylabError, match="set target too"):
        build(TrainConfig, {"settle": 0.95})
    assert build(TrainConfig, {"target": "task", "settle": "0.95"}).settle == 0.95  # as `--set train.settle=0.95` gives it


def test_routing_that_keeps_changing_holds_a_run_that_reached_its_target(tmp_path, monkeypatch) -> None:
    def redraw_routers(self, *args) -> None:  # a fresh random router after every step: the expert sets keep changing
        for layer in self.model.moe_layers():
            torch.nn.init.normal_(self.model.blocks[layer].mlp.W_router)

    monkeypatch.setattr(SequenceModel, "on_train_batch_end", redraw_routers, raising=False)
    run = train(TASK, MOE, STILL, tmp_path / "moving", progress=False).run_dir
    assert final(run)["steps"] == 60 and not final(run)["stopped_at_target"]
    assert max(logged(run, ROUTING_STABLE).values()) < 0.9
    assert train(TASK, MOE, replace(STILL, settle=None), tmp_path / "target", progress=False).run_dir.joinpath("final.json").is_file()
    assert final(tmp_path / "target")["steps"] == 20  # the target alone: two validations in a row


def test_stable_routing_stops_one_validation_after_the_target_alone(tmp_path) -> None:
    run = train(TASK, MOE, STILL, tmp_path / "still", progress=False).run_dir
    stable = logged(run, ROUTING_STABLE)
    assert final(run)["steps"] == 30 and final(run)["stopped_at_target"]  # validation 10 has no earlier one to compare with
    assert sorted(stable) == [20, 30] and min(stable.values()) >= 0.9 and final(run)["routing_stable"] == pytest.approx(stable[30])
    dense = train(TASK, {**MOE, "ffn": "dense"}, STILL, tmp_path / "dense", progress=False).run_dir  # no routing: the target alone
    assert final(dense)["steps"] == 20 and "routing_stable" not in final(dense) and not logged(dense, ROUTING_STABLE)


def test_the_logged_stability_is_the_least_share_over_layers_of_tokens_keeping_their_expert_set(tmp_path) -> None:
    cfg = replace(STILL, steps=30, lr=3e-2, target=1.1, checkpoint_every=10)  # a target never reached: every step
    run = train(TASK, {**MOE, "n_layers": 2}, cfg, tmp_path / "run", progress=False)
    val = TASK.sample_split(cfg.n_val, data_seed(cfg.seed, "val"), "heldout")
    keep = TASK.positions(val)

    def sets(step: int) -> list[np.ndarray]:
        model = load_checkpoint(run, step)
        _, cache = model.run_with_cache(torch.from_numpy(val.inputs), names="blocks.*.mlp.hook_expert_indices")
        return [np.sort(indices.numpy()[keep], axis=-1) for indices in cache.values()]

    series = {step: sets(step) for step in (10, 20, 30)}
    expected = {step: min(float((a == b).all(-1).mean()) for a, b in zip(series[step - 10], series[step])) for step in (20, 30)}
    assert len(series[10]) == 2 and logged(run.run_dir, ROUTING_STABLE) == pytest.approx(expected)
    assert 0 < min(expected.values()) < 1  # routing moved, but not all of it


def test_a_resumed_run_keeps_the_last_expert_sets_and_stops_where_an_uninterrupted_one_does(tmp_path, monkeypatch) -> None:
    cfg = replace(STILL, checkpoint_every=10)
    whole = train(TASK, MOE, cfg, tmp_path / "whole", progress=False)
    step = SequenceModel.training_step

    def killed_at_step_25(self, batch, batch_idx):  # after the validation at 20 and its checkpoint, before the one at 30
        if self.global_step == 25:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SequenceModel, "training_step", killed_at_step_25)
    with pytest.raises(RuntimeError, match="killed"):
        train(TASK, MOE, cfg, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed = train(TASK, MOE, cfg, tmp_path / "resumed", progress=False)
    assert final(resumed.run_dir)["steps"] == final(whole.run_dir)["steps"] == 30  # it saw validations 20 and 30 in a row
    assert logged(resumed.run_dir, ROUTING_STABLE) == {30: logged(whole.run_dir, ROUTING_STABLE)[30]}
    assert final(resumed.run_dir)["weights_sha256"] == final(whole.run_dir)["weights_sha256"]


def test_the_target_note_says_when_runs_waited_for_their_routing_to_settle() -> None:
    runs = {"dense-seed0": {"steps": 400, "cap": 1000, "stopped_at_target": True},
            "moe-seed0": {"steps": 700, "cap": 1000, "stopped_at_target": True, "routing_stable": 0.97}}
    assert "`train.settle`" in target_note(runs)[0].blocks[0].markdown
    assert "`train.settle`" not in target_note({"dense-seed0": runs["dense-seed0"]})[0].blocks[0].markdown


def test_a_run_without_settle_keeps_the_config_and_hash_it_had_before_settle_existed(tmp_path) -> None:
    """`settle` at its default is left out of a run's config (`OMIT_AT_DEFAULT`), so runs saved before it existed are
    reused; set, it is part of the config. (A new option without that metadata would change every run's hash.)"""
    from toylab.config import config_hash, to_dict

    assert config_hash(to_dict(TrainConfig())) == "dd64641c99"  # TrainConfig() before settle existed (commit 2f0deba)
    assert "settle" not in to_dict(TrainConfig()) and "target" in to_dict(TrainConfig())
    assert to_dict(TrainConfig(steps=60, target=0.5, settle=0.9))["settle"] == 0.9
    trained = train(TASK, MOE, replace(STILL, settle=None, steps=10), tmp_path / "run", progress=False)
    saved = json.loads((trained.run_dir / "config.json").read_text())
    assert "settle" not in saved["train"] and saved["train"]["target"] == 0.0
