"""Tampered or foreign run folders (issue 33): every file read from a run directory is checked against its schema
(`toylab.schema`) before anything is written.

`toylab report` and `toylab runs show` refuse a bad file in one line naming it (exit 2) and change nothing; `runs list`
shows the run as corrupt and lists the others; a trained model whose files are bad is retrained, with one line saying
why, and a FIFO or a folder in place of a run file is refused at once, never read. A full disk is one line too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from toylab import io
from toylab.config import build
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.study import run_study
from toylab.training import TrainConfig, train, trained_run

from test_bad_inputs import run, snapshot

TINY = {"competence": 0, "seeds": 1, "train": {"steps": 8, "n_train": 128, "n_val": 32, "eval_every": 4}, "n_eval": 24,
        "n_permutations": 20, "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 2},
        "task_options": {"max_length": 12}}
SECONDS = 30


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished study run (its models included)."""
    return run_study("expert-specialization", TINY, out=tmp_path_factory.mktemp("runs"), progress=False, workers=1).directory


def write(name: str, data: object) -> Callable[[Path], None]:
    """Replace run file `name` by `data` (JSON, or text as given)."""
    return lambda run: (run / name).write_text(data if isinstance(data, str) else json.dumps(data))


def edit(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """Change run file `name` in place."""
    def apply(run: Path) -> None:
        data = json.loads((run / name).read_text())
        change(data)
        (run / name).write_text(json.dumps(data))
    return apply


def fifo(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).unlink()
        os.mkfifo(run / name)
    return apply


def folder(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return apply


STUDY_FILES = [  # (file, tamper, what the one line says, the commands that read it: list and show read results' envelope)
    ("results.json", write("results.json", {}), "key 'failed_runs' is missing", "report show list"),
    ("results.json", edit("results.json", lambda d: d.update(failed_runs=3)), "key 'failed_runs' must be an array, not an integer",
     "report show list"),
    ("results.json", edit("results.json", lambda d: d.pop("specialization")), "key 'specialization' is missing", "report"),
    ("results.json", edit("results.json", lambda d: d["task"].update(name=5)), "key 'task.name' must be a string", "report show list"),
    ("results.json", fifo("results.json"), "it is not a regular file", "report show list"),
    ("config.json", edit("config.json", lambda d: d.update(study=5)), "key 'study' must be a string, not an integer",
     "report show list"),
    ("results.json", edit("config.json", lambda d: d.update(study="superposition")), "results.json: key 'claims' is missing",
     "report"),
    ("config.json", edit("config.json", lambda d: d.update(seeds="many")), "key 'seeds'", "report show list"),
    ("config.json", folder("config.json"), "it is not a regular file", "report show list"),
    ("config.json", fifo("config.json"), "it is not a regular file", "report show list"),
    ("summary.json", write("summary.json", {"rows": 5}), "key 'rows' must be an array, not an integer", "show list"),
    ("summary.json", fifo("summary.json"), "it is not a regular file", "show list"),
    ("timing.json", write("timing.json", [1]), "the top level must be an object, not an array", "report"),
    ("timing.json", write("timing.json", "{}"), "key 'seconds' is missing", "report"),
    ("timing.json", edit("timing.json", lambda d: d.update(runs_trained="4")), "key 'runs_trained' must be an integer", "report"),
    ("timing.json", fifo("timing.json"), "it is not a regular file", "report"),
    ("expert_map.json", edit("expert_map.json", lambda d: d.update(seeds=[1])), "key 'seeds' must be an object", "report"),
    ("expert_map.json", edit("expert_map.json", lambda d: d.pop("layers")), "key 'layers' is missing", "report"),
    ("expert_map.json", fifo("expert_map.json"), "it is not a regular file", "report"),
    ("summary.json", fifo("summary.json"), "cannot write", "report"),  # what `report` replaces: refused before any figure
    ("report.html", folder("report.html"), "it is a folder", "report"),
    ("figures/nmi_comparison.png", fifo("figures/nmi_comparison.png"), "it is not a regular file", "report"),
]
COMMANDS = {"report": lambda run: ["report", str(run)], "show": lambda run: ["runs", "show", str(run)]}
REFUSED = [(command, *case[:3]) for case in STUDY_FILES for command in COMMANDS if command in case[3].split()]
LISTED = [case[:3] for case in STUDY_FILES if "list" in case[3].split()]


def copy_run(finished: Path, out: Path, name: str) -> Path:
    """A copy of the finished run (without its models) at `out/STUDY/name`."""
    run = out / finished.parent.name / name
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("models"))
    return run


@pytest.mark.parametrize("command,file,tamper,message", REFUSED, ids=[f"{c} {f} {m}"[:70] for c, f, _, m in REFUSED])
def test_a_tampered_run_file_is_refused_in_one_line_naming_it_before_anything_is_written(finished, tmp_path, capsys, command,
                                                                                          file, tamper, message):
    tampered = copy_run(finished, tmp_path, "tampered")
    tamper(tampered)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, COMMANDS[command](tampered), SECONDS)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(tampered / file) in err and message in err, err
    assert snapshot(tmp_path) == before, "a refused command wrote or rewrote a file (a figure, the report)"


@pytest.mark.parametrize("file,tamper,message", LISTED, ids=[f"{f} {m}"[:60] for f, _, m in LISTED])
def test_runs_list_shows_a_tampered_run_as_corrupt_and_lists_the_others(finished, tmp_path, capsys, file, tamper, message):
    copy_run(finished, tmp_path, "intact")
    tampered = copy_run(finished, tmp_path, "tampered")
    tamper(tampered)
    code, out, err = run(capsys, ["runs", "list", "--out", str(tmp_path)], SECONDS)
    assert code == 0 and not err, err
    lines = {Path(line.split()[-1]).name: line for line in out.splitlines()[1:]}
    assert set(lines) == {"intact", "tampered"}
    assert " finished " in lines["intact"], lines["intact"]
    assert " corrupt " in lines["tampered"] and str(tampered / file) in lines["tampered"] and message in lines["tampered"], lines


MODEL_FILES = [
    ("final.json", edit("final.json", lambda d: d["metrics"].update(loss="low")), "key 'metrics.loss' must be a number, not a string"),
    ("final.json", edit("final.json", lambda d: d["metrics"].update(loss=None)), "key 'metrics.loss' must be a number, not null"),
    ("final.json", write("final.json", {}), "key 'metrics' is missing"),
    ("final.json", edit("final.json", lambda d: d.update(steps="16")), "key 'steps' must be an integer, not a string"),
    ("config.json", edit("config.json", lambda d: d.update(model=5)), "key 'model' must be an object, not an integer"),
    ("config.json", edit("config.json", lambda d: d.pop("task_options")), "key 'task_options' is missing"),
    ("config.json", fifo("config.json"), "it is not a regular file"),
]


def trained_model(finished: Path, out: Path) -> tuple[Path, tuple]:
    """A copy of one of the study's trained models as `toylab train` leaves one (`out/train/NAME/`), with what trains it."""
    model = out / "train" / "brackets-moe"
    shutil.copytree(finished / "models" / "moe-seed0", model)
    config = json.loads((model / "config.json").read_text())
    return model, (get_task(config["task"], config["task_options"]), config["model"], build(TrainConfig, config["train"]))


@pytest.mark.parametrize("file,tamper,message", MODEL_FILES, ids=[f"{f} {m}"[:60] for f, _, m in MODEL_FILES])
def test_a_tampered_trained_model_is_retrained_with_one_line_saying_why_and_listed_as_corrupt(finished, tmp_path, capsys, caplog,
                                                                                             file, tamper, message):
    model, job = trained_model(finished, tmp_path)
    assert trained_run(*job, model) is not None  # control: the intact copy is reused
    tamper(model)
    with caplog.at_level(logging.WARNING):
        assert trained_run(*job, model) is None
    notes = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(notes) == 1 and notes[0].startswith(f"retraining {model}: ") and str(model / file) in notes[0] and message in notes[0], notes
    code, out, err = run(capsys, ["runs", "list", "--out", str(tmp_path)], SECONDS)
    assert code == 0 and not err and len(out.splitlines()) == 2, out + err
    assert " corrupt " in out and str(model / file) in out and message in out, out


@pytest.mark.parametrize("file", ["config.json", "final.json"])
@pytest.mark.parametrize("tamper", [fifo, folder])
def test_training_over_a_run_file_that_is_not_a_file_is_refused_before_anything_changes(finished, tmp_path, tamper, file):
    model, job = trained_model(finished, tmp_path)
    tamper(file)(model)
    before = snapshot(model)
    with pytest.raises(ToylabError, match=f"^cannot write {model / file}: it is "):
        train(*job, model, progress=False)
    assert snapshot(model) == before


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    def full(*_, **__):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ToylabError, match=f"^cannot write {tmp_path / 'model.safetensors'}: No space left on device"):
        io.save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)})

    def no_space(_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ToylabError, match=f"^cannot write {tmp_path / 'results.json'}: No space left on device$"):
        io.write_json(tmp_path / "results.json", {})
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
