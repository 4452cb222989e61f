"""Training a study's runs in worker processes: same results as in-process, failures kept apart, reuse counted."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from toylab import get_task
from toylab.io import load_tensors
from toylab.study import StudyContext, TrainJob, target_note
from toylab.training import TrainConfig

TINY = TrainConfig(steps=6, n_train=64, n_val=16, eval_every=6, batch_size=16)
MODEL = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}


def jobs() -> list[TrainJob]:
    task = get_task("brackets", k=2, m=3, max_length=10)
    return [TrainJob(f"{ffn}-seed{seed}", task, {**MODEL, "ffn": ffn}, replace(TINY, seed=seed))
            for seed in (0, 1) for ffn in ("dense", "moe")]


def test_workers_give_the_same_models_as_training_in_process(tmp_path) -> None:
    alone, together = (StudyContext(tmp_path / "one", progress=False, competence=0),
                       StudyContext(tmp_path / "two", progress=False, workers=2, competence=0))
    with together:
        first, second = alone.train(jobs()), together.train(jobs())
    assert list(first) == list(second) == [job.key for job in jobs()]
    for job in jobs():
        a, b = (load_tensors(ctx.run_dir(job.key) / "model.safetensors") for ctx in (alone, together))
        assert a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)
        assert first[job.key].metrics == second[job.key].metrics
    assert (together.trained, together.reused) == (4, 0)

    with StudyContext(tmp_path / "two", progress=False, workers=2, competence=0) as again:
        again.train(jobs())
    assert (again.trained, again.reused) == (0, 4)


def test_a_run_diverging_in_a_worker_fails_alone(tmp_path) -> None:
    good, bad = jobs()[:2]
    bad = replace(bad, config=replace(bad.config, lr=1e12, grad_clip=1e12, steps=40, eval_every=40))
    with StudyContext(tmp_path, progress=False, workers=2, competence=0) as ctx:
        trained = ctx.train([good, bad])
    assert trained[good.key] is not None and trained[bad.key] is None
    assert [f["run"] for f in ctx.failures] == [bad.key] and "diverged" in ctx.failures[0]["error"]
    assert not (ctx.run_dir(bad.key) / "final.json").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_map_keeps_the_order_of_its_arguments_and_raises_their_errors(tmp_path, workers) -> None:
    with StudyContext(tmp_path, progress=False, workers=workers) as ctx:
        assert ctx.map(math.pow, [2, 3, 5], [1, 2, 3], description="powers") == [2.0, 9.0, 125.0]
        with pytest.raises(ValueError, match="math domain error"):
            ctx.map(math.sqrt, [4, -1, 9], description="roots")
        assert ctx.map(abs, [-1, -2], description="the workers still serve") == [1, 2]


def weight_sum(*run_dirs) -> float:
    """A stand-in analysis of a group's runs (in a worker): the sum of their weights."""
    return float(sum(t.double().sum() for d in run_dirs for t in load_tensors(Path(d) / "model.safetensors").values()))


def seed_plan(seed: int, runs: dict) -> list:
    """One analysis per seed of the runs usable there, one more per usable MoE run."""
    return [(f"seed{seed}", tuple(runs.values())), *((key, (d,)) for key, d in runs.items() if key.startswith("moe"))]


@pytest.mark.parametrize("workers", [1, 2])
def test_train_and_analyse_gives_the_models_of_train_and_analyses_in_plan_order(tmp_path, workers) -> None:
    """Each seed's analysis runs once its runs are done; results and their order do not depend on the workers, a
    diverged run is left out of its group's plan as `train` leaves it out, and a rerun reuses every run."""
    runs = jobs()
    runs[1] = replace(runs[1], config=replace(runs[1].config, lr=1e12, grad_clip=1e12, steps=40, eval_every=40))  # moe-seed0 diverges
    with StudyContext(tmp_path / "pipelined", progress=False, workers=workers, competence=0) as ctx:
        models, analysed = ctx.train_and_analyse(runs, weight_sum, seed_plan)
    with StudyContext(tmp_path / "trained", progress=False, competence=0) as alone:
        trained = alone.train(runs)
    assert list(analysed) == ["seed0", "seed1", "moe-seed1"]
    assert [f["run"] for f in ctx.failures] == [f["run"] for f in alone.failures] == ["moe-seed0"]
    assert {key: m is None for key, m in models.items()} == {key: m is None for key, m in trained.items()}
    assert analysed["seed0"] == weight_sum(ctx.run_dir("dense-seed0"))
    assert analysed["seed1"] == weight_sum(ctx.run_dir("dense-seed1"), ctx.run_dir("moe-seed1"))
    assert ctx.training_seconds > 0 and ctx.steps_trained == 6 * 3
    with StudyContext(tmp_path / "pipelined", progress=False, competence=0) as again:
        assert again.train_and_analyse(runs, weight_sum, seed_plan)[1] == analysed
    assert (again.trained, again.reused) == (1, 3)  # the diverged run is tried again


def test_train_and_analyse_leaves_below_competence_runs_out_and_raises_analysis_errors(tmp_path) -> None:
    with StudyContext(tmp_path, progress=False, competence=0) as ctx:
        scores = {key: model.metrics["closing_accuracy"] for key, model in ctx.train(jobs()).items()}
    middle = (min(scores.values()) + max(scores.values())) / 2
    with StudyContext(tmp_path, progress=False, competence=middle) as ctx:
        models, analysed = ctx.train_and_analyse(jobs(), weight_sum, seed_plan)
    kept = [key for key, value in scores.items() if value >= middle]
    assert sorted(key for key, model in models.items() if model is not None) == sorted(kept)
    assert set(analysed) == {f"seed{seed}" for seed in (0, 1) if any(k.endswith(f"seed{seed}") for k in kept)} | {
        k for k in kept if k.startswith("moe")}
    with StudyContext(tmp_path, progress=False, competence=0) as ctx, pytest.raises(ValueError, match="math domain"):
        ctx.train_and_analyse(jobs(), math.sqrt, lambda seed, runs: [(seed, (-1,))])


SEQUENTIAL = {"task": "modes", "primary_labels": ["mode"], "null_draws": 0, "n_permutations": 30,
              "train": {"steps": 150, "n_train": 1000, "n_val": 100, "eval_every": 150}}


def test_seeds_auto_stops_when_the_primary_verdict_is_settled_and_resumes(tmp_path) -> None:
    """The label router on `mode` (a planted positive): the primary verdict is *more* well before the budget is spent
    (O'Brien–Fleming spends almost nothing at 3 of 9 seeds, so it may take a second look); the record names the rule
    and every look, the report opens with it, and a rerun reuses every run."""
    from toylab.runs import rerender
    from toylab.study import SeedBudget, run_study

    overrides = {**SEQUENTIAL, "router": "label", "router_label": "mode"}
    outcome = run_study("expert-specialization", overrides, tmp_path, fast=True, progress=False, workers=2, budget=SeedBudget(9))
    sequential = outcome.results["sequential"]
    assert sequential["schedule"] == [3, 5, 7, 9] and sequential["stopped"] == "settled"
    used = [look["seeds"] for look in sequential["looks"]]
    assert used in ([3], [3, 5]) and sequential["looks"][-1]["verdicts"] == ["more"]
    assert sequential["looks"][0]["alpha"] < 0.001  # O'Brien–Fleming spends little at the first look
    assert sorted(p.name for p in (outcome.directory / "models").iterdir()) == sorted(f"{k}-seed{s}" for k in ("dense", "moe") for s in range(used[-1]))
    report = (outcome.directory / "report.md").read_text()
    assert report.index("Seeds spent sequentially") < report.index("Bottom line")
    assert f"It stopped at {used[-1]} seeds because no primary" in report
    again = run_study("expert-specialization", overrides, tmp_path, fast=True, progress=False, workers=2, budget=SeedBudget(9))
    assert again.directory == outcome.directory and json.loads((outcome.directory / "timing.json").read_text())["runs_trained"] == 0
    before = (outcome.directory / "report.md").read_bytes()
    rerender(outcome.directory)
    assert (outcome.directory / "report.md").read_bytes() == before


def test_the_sequential_note_says_why_it_stopped() -> None:
    from toylab.analysis.sequential import look_alphas, stopping_rule_text
    from toylab.report import to_markdown, Document
    from toylab.study import sequential_note

    schedule = [3, 5]
    record = {"max_seeds": 5, "alpha": 0.05, "stopped": "budget spent", "rule_text": stopping_rule_text("obrien_fleming", 0.05, schedule),
              "looks": [{"seeds": n, "alpha": a, "verdicts": ["inconclusive"], "means": [0.01]} for n, a in zip(schedule, look_alphas(schedule))]}
    text = to_markdown(Document("t", [sequential_note(record)]))
    assert "It stopped at 5 seeds because the budget of 5 seeds was spent with the primary family still inconclusive" in text
    assert "the primary verdict is **inconclusive**" in text and "| 2 | 5 |" in text


def run_key(job: TrainJob, run_dir) -> str:
    return job.key


def test_models_below_the_task_competence_are_not_analysed_and_none_left_is_one_line(tmp_path) -> None:
    """Issue 27 §1: a run below its task's threshold gives None and is named; when none is left, a one-line error."""
    from toylab.errors import ToylabError
    from toylab.report import Document, to_markdown
    from toylab.study import competence_note

    with StudyContext(tmp_path, progress=False, competence=0) as ctx:
        trained = ctx.train(jobs())
    scores = sorted(model.metrics["closing_accuracy"] for model in trained.values())
    assert scores[0] < scores[-1]
    middle = (scores[0] + scores[-1]) / 2
    with StudyContext(tmp_path, progress=False, competence=middle) as ctx:
        kept = ctx.train(jobs())
        analysed = ctx.analyse_runs(jobs(), run_key, "analysing")
    below = {b["run"] for b in ctx.below}
    assert below and all(kept[key] is None for key in below) and all(kept[key] is not None for key in kept if key not in below)
    assert set(analysed) == {key for key in kept if key not in below}  # what the report says: not analysed
    assert all(b["value"] < middle and b["metric"] == "closing_accuracy" for b in ctx.below)
    text = to_markdown(Document("t", competence_note({"below_competence": ctx.below}, None)))
    assert "## Models below the task's competence threshold" in text and sorted(below)[0] in text
    with StudyContext(tmp_path, progress=False) as ctx, pytest.raises(ToylabError, match="no model reached the competence threshold of task 'brackets' "
                                                                         r"\(closing_accuracy >= 0.95") as error:
        ctx.train(jobs())  # six steps of training: nowhere near the task's own threshold
    assert "\n" not in str(error.value) and "--set competence=0" in str(error.value)


def test_study_list_reads_every_registered_study_without_importing_it() -> None:
    """Issue 27 §2: the names and one-line descriptions read from the source equal the imported classes'."""
    from toylab.registry import STUDIES, TASKS

    assert STUDIES.summaries() == {name: STUDIES.get(name).describe() for name in STUDIES.names()}
    assert list(TASKS.summaries()) == TASKS.names()


def test_the_target_note_counts_the_runs_that_stopped_and_their_steps_per_kind():
    assert target_note({}) == []
    runs = {"dense-seed0": {"steps": 400, "cap": 1000, "stopped_at_target": True},
            "dense-seed1": {"steps": 600, "cap": 1000, "stopped_at_target": True},
            "moe-seed0": {"steps": 1000, "cap": 1000, "stopped_at_target": False}}
    (section,) = target_note(runs)
    text = section.blocks[0].markdown
    assert "`dense` 2 of 2 at its target, after 400–600 steps (mean 500) of a cap of 1000" in text
    assert "`moe` 0 of 1 at its target, after 1000–1000 steps (mean 1000)" in text


def test_a_key_set_over_a_studys_default_keeps_the_rest_of_that_default():
    """`--set train.lr=...` changes the learning rate of the study's own training setup (planning: 2500 steps on 160,000
    mazes, no learning-rate floor), not of TrainConfig's class defaults; likewise one key of `model`."""
    from toylab.study import resolve

    default = resolve("planning", {}).config
    changed = resolve("planning", {"train": {"lr": 1e-3}, "model": {"n_layers": 1}}).config
    assert changed.train == replace(default.train, lr=1e-3)
    assert changed.model == {**default.model, "n_layers": 1}
    assert resolve("planning", {"train": {"steps": 1500}}, fast=True).config.train.lr_floor == 0.0  # the preset over it too
