"""Launchers: the same study gives byte-identical results in this process, in local workers, on a local
Ray instance and through submitit's local executor; a killed worker's run is retried, never taken as finished."""

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from toylab import ToylabError, get_task
from toylab.config import build
from toylab.executors import LaunchConfig
from toylab.study import StudyContext, TrainJob, run_study
from toylab.training import TrainConfig, load_trained

TINY = {"seeds": 2, "train": {"steps": 30, "eval_every": 30, "n_train": 256, "n_val": 64}}


def results_bytes(launcher: LaunchConfig, out: Path) -> bytes:
    outcome = run_study("expert-specialization", TINY, out, fast=True, progress=False, launcher=launcher)
    return (outcome.directory / "results.json").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    return results_bytes(LaunchConfig(), tmp_path_factory.mktemp("in-process"))


@pytest.mark.parametrize(
    "launcher",
    [LaunchConfig(workers=2), LaunchConfig(launcher="ray", workers=2), LaunchConfig(launcher="slurm", cluster="local")],
    ids=["local", "ray", "slurm-local"],
)
def test_every_launcher_gives_byte_identical_results(reference, launcher, tmp_path):
    if launcher.launcher != "local":
        pytest.importorskip({"ray": "ray", "slurm": "submitit"}[launcher.launcher])
    assert results_bytes(launcher, tmp_path) == reference


def test_a_killed_worker_is_retried_and_never_taken_for_finished(tmp_path):
    task = get_task("brackets", k=2, m=3, max_length=10)
    config = TrainConfig(steps=400, n_train=512, n_val=16, eval_every=400, batch_size=16)
    jobs = [TrainJob(f"seed{seed}", task, {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}, replace(config, seed=seed))
            for seed in range(2)]
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any((tmp_path / "models").glob("*/.attempt-*")):
                workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                           if p.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())
                           and b"spawn_main" in (p.parent / "cmdline").read_bytes()]  # not the resource tracker
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker)
    with StudyContext(tmp_path, progress=False, workers=2) as ctx:
        killer.start()
        trained = ctx.train(jobs)
        killer.join()
    assert killed, "no worker was killed"
    assert ctx.failures == [] and all(trained[job.key] is not None for job in jobs)
    for job in jobs:
        assert load_trained(ctx.run_dir(job.key)).metrics == trained[job.key].metrics
        assert not list(ctx.run_dir(job.key).glob(".attempt-*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"launcher": "cloud"}, "valid: local, ray, slurm"),
        ({"launcher": "local", "address": "auto"}, "address applies to the ray launcher only"),
        ({"launcher": "ray", "partition": "cpu"}, "partition applies to the slurm launcher only"),
        ({"launcher": "slurm", "time": 0}, "time must be >= 1"),
        ({"workers": 0}, r"workers must be in \[1, 1024\]"),
    ],
)
def test_bad_launch_options_are_one_line_errors(options, message):
    with pytest.raises(ToylabError, match=message):
        build(LaunchConfig, options)


def test_an_unreachable_ray_address_fails_fast(tmp_path):
    pytest.importorskip("ray")
    start = time.monotonic()
    with pytest.raises(ToylabError, match="cannot reach a Ray cluster at 127.0.0.1:9"):
        LaunchConfig(launcher="ray", address="127.0.0.1:9").executor(tmp_path)
    assert time.monotonic() - start < 30
