"""Training a study's runs in worker processes: same results as in-process, failures kept apart, reuse counted."""

import math
from dataclasses import replace

import pytest

from toylab import get_task
from toylab.io import load_tensors
from toylab.study import StudyContext, TrainJob
from toylab.training import TrainConfig

TINY = TrainConfig(steps=6, n_train=64, n_val=16, eval_every=6, batch_size=16)
MODEL = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}


def jobs() -> list[TrainJob]:
    task = get_task("brackets", k=2, m=3, max_length=10)
    return [TrainJob(f"{ffn}-seed{seed}", task, {**MODEL, "ffn": ffn}, replace(TINY, seed=seed))
            for seed in (0, 1) for ffn in ("dense", "moe")]


def test_workers_give_the_same_models_as_training_in_process(tmp_path) -> None:
    alone, together = StudyContext(tmp_path / "one", progress=False), StudyContext(tmp_path / "two", progress=False, workers=2)
    with together:
        first, second = alone.train(jobs()), together.train(jobs())
    assert list(first) == list(second) == [job.key for job in jobs()]
    for job in jobs():
        a, b = (load_tensors(ctx.run_dir(job.key) / "model.safetensors") for ctx in (alone, together))
        assert a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)
        assert first[job.key].metrics == second[job.key].metrics
    assert (together.trained, together.reused) == (4, 0)

    with StudyContext(tmp_path / "two", progress=False, workers=2) as again:
        again.train(jobs())
    assert (again.trained, again.reused) == (0, 4)


def test_a_run_diverging_in_a_worker_fails_alone(tmp_path) -> None:
    good, bad = jobs()[:2]
    bad = replace(bad, config=replace(bad.config, lr=1e12, grad_clip=1e12, steps=40, eval_every=40))
    with StudyContext(tmp_path, progress=False, workers=2) as ctx:
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
