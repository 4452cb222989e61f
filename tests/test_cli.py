"""The command line: one-line errors with exit code 2, exports, and studies end to end."""

import importlib
import json
import os
import stat

import re

import pytest
import torch

from toylab.cli import app
from toylab.errors import DivergenceError

TINY = ["--set", "competence=0", "--seeds", "2", "--set", "train.steps=16", "--set", "train.n_train=128", "--set", "train.n_val=32",
        "--set", "train.eval_every=8", "--set", "n_eval=24", "--set", "n_permutations=20",
        "--set", "model.d_model=16", "--set", "model.d_mlp=32", "-o", "max_length=12", "--no-progress"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        app(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["tasks", "show", "nope"], "unknown task 'nope'; valid: brackets"),
    (["tasks", "show", "brackets", "-o", "k=two"], "invalid value 'two' for 'k'"),
    (["tasks", "show", "brackets", "-o", "depth=3"], "unknown BracketsConfig key 'depth'; valid: k, m"),
    (["tasks", "show", "brackets", "-o", "k"], "expected KEY=VALUE"),
    (["tasks", "sample", "brackets", "-n", "0"], "-n"),
    (["study", "run", "nope"], "unknown study 'nope'; valid: ablation, calibration, causal-abstraction, dictionaries, dynamics, expert-specialization"),
    (["study", "run", "expert-specialization", "--set", "bogus=1"], "unknown ExpertSpecializationConfig key 'bogus'"),
    (["study", "run", "expert-specialization", "--seeds", "x"], "invalid --seeds 'x'; valid: a number of seeds >= 1, or auto"),
    (["study", "run", "expert-specialization", "--seeds", "auto", "--sweep", "top_k=1,2"], "--seeds auto runs one study at a time"),
    (["study", "run", "calibration", "--set", "grid=0.5,1"], "grid must rise strictly from 0"),
    (["study", "run", "expert-specialization", "--set", "steps=10"], "key 'steps' (did you mean 'train.steps'?)"),
    (["run", "expert-specialization"], "No such command 'run'. Did you mean 'runs'? (or 'toylab study run'?)"),
    (["study", "run", "expert-specialization", "--set", "train.lr=-1"], "lr must be a positive number"),
    (["study", "run", "expert-specialization", "--set", "model.width=3"], "unknown TransformerConfig key 'width'"),
    (["study", "run", "expert-specialization", "--task", "nope"], "unknown task 'nope'"),
    (["study", "run", "expert-specialization", "--config", "missing.toml"], "config file not found"),
    (["train", "--model", "sparse"], "unknown model 'sparse'; valid: dense, moe, lstm, gru"),
    (["train", "--model", "lstm", "--set", "n_heads=2"], "unknown option 'n_heads'; valid: accelerator, batch_size, checkpoint_every, checkpoint_spacing, d_model, devices,"),
    (["train", "--set", "colour=red"], "unknown option 'colour'; valid:"),
    (["train", "--set", "target=high"], "invalid value 'high' for 'target'; expected float or 'task'"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_config_file(capsys, tmp_path):
    bad = tmp_path / "study.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "study", "run", "expert-specialization", "--config", str(bad))
    assert code == 2 and "cannot parse config file" in err


def test_lists_and_show(capsys):
    code, out, _ = run(capsys, "tasks", "list")
    assert code == 0 and "brackets" in out
    code, out, _ = run(capsys, "study", "list")
    assert code == 0 and "expert-specialization" in out and "routing-variants" in out
    code, out, _ = run(capsys, "tasks", "show", "brackets", "-n", "2")
    assert code == 0 and "stack_top" in out and "function" in out and "sample 1:" in out
    code, out, _ = run(capsys, "study", "run", "--help")
    assert code == 0 and "Examples" in out


def test_sample_exports_jsonl(capsys, tmp_path):
    path = tmp_path / "dyck.jsonl"
    code, _, _ = run(capsys, "tasks", "sample", "brackets", "-n", "50", "--seed", "3", "--out", str(path), "-o", "k=3")
    assert code == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50
    for row in rows:
        assert row["tokens"][0] == "<bos>"
        assert set(row["labels"]) == {"token_type", "position", "depth", "stack_top", "match_distance"}
        assert all(len(v) == len(row["tokens"]) for v in row["labels"].values())
        opens = sum(t in "([{" for t in row["tokens"])
        closes = sum(t in ")]}" for t in row["tokens"])
        assert row["labels"]["depth"][-1] == opens - closes


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "expert-specialization", "--out", str(out), *TINY])
    assert exit_info.value.code == 0
    (directory,) = (out / "expert-specialization").iterdir()
    return directory


def test_study_writes_a_complete_run_directory(tiny_study):
    files = {p.relative_to(tiny_study).as_posix() for p in tiny_study.rglob("*") if p.is_file()}
    assert {"config.json", "code_version.json", "results.json", "report.md", "timing.json"} <= files
    assert {"figures/nmi_comparison.png", "figures/training_curves.png", "figures/experts_layer0.png"} <= files
    for run in ("dense-seed0", "moe-seed0", "dense-seed1", "moe-seed1"):
        assert {f"models/{run}/model.safetensors", f"models/{run}/metrics.csv", f"models/{run}/final.json"} <= files
    results = json.loads((tiny_study / "results.json").read_text())
    layer0 = results["specialization"]["0"]
    assert set(layer0) == {"token_type", "position", "depth", "stack_top", "match_distance"}
    assert {"routing_nmi", "kmeans_moe_nmi", "kmeans_dense_nmi", "null_nmi", "verdict"} <= set(layer0["depth"])
    report = (tiny_study / "report.md").read_text()
    assert "## Verdicts" in report and "k-means" in report and "![" in report
    assert f"{layer0['depth']['routing_nmi']['mean']:.3f}" in report  # report numbers come from results.json


def test_same_seed_gives_identical_results(tiny_study, tmp_path, capsys):
    """Also with the runs trained in this process instead of worker processes."""
    code, out, _ = run(capsys, "study", "run", "expert-specialization", "--out", str(tmp_path), "--workers", "1", *TINY)
    assert code == 0 and "report:" in out
    (directory,) = (tmp_path / "expert-specialization").iterdir()
    assert directory.name == tiny_study.name
    assert (directory / "results.json").read_bytes() == (tiny_study / "results.json").read_bytes()


def test_killed_study_resumes_reusing_finished_runs(tiny_study, tmp_path, capsys):
    import shutil

    copy = tmp_path / "expert-specialization" / tiny_study.name
    shutil.copytree(tiny_study, copy)
    (copy / "results.json").unlink()
    (copy / "models" / "moe-seed1" / "final.json").unlink()  # this run was cut off before finishing
    kept = (copy / "models" / "dense-seed0" / "model.safetensors").stat().st_mtime_ns
    code, _, _ = run(capsys, "study", "run", "expert-specialization", "--out", str(tmp_path), *TINY)
    assert code == 0
    assert (copy / "models" / "dense-seed0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (copy / "models" / "moe-seed1" / "final.json").is_file()
    assert (copy / "results.json").read_bytes() == (tiny_study / "results.json").read_bytes()


def test_diverging_run_fails_alone(tmp_path, capsys, monkeypatch):
    import toylab.study

    real_train = toylab.study.train

    def train(task, model_options, cfg, run_dir, progress=True):
        if run_dir.name == "moe-seed1":
            raise DivergenceError("training diverged: loss is nan at step 3")
        return real_train(task, model_options, cfg, run_dir, progress)

    monkeypatch.setattr(toylab.study, "train", train)  # patched in this process only, hence one worker
    code, out, _ = run(capsys, "study", "run", "expert-specialization", "--out", str(tmp_path), "-j", "1", *TINY)
    assert code == 0 and "1 run(s) failed" in out
    (directory,) = (tmp_path / "expert-specialization").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert results["failed_runs"] == [{"run": "moe-seed1", "error": "training diverged: loss is nan at step 3"}]
    assert results["specialization"]["0"]["depth"]["routing_nmi"]["n"] == 1
    assert "## Failed runs" in (directory / "report.md").read_text()


def test_fast_study_through_the_cli(tmp_path, capsys):
    code, out, _ = run(capsys, "study", "run", "expert-specialization", "--fast", "--out", str(tmp_path), "--no-progress")
    assert code == 0
    assert "NMI routing" in out and "report:" in out
    summary = out.split("\nfinished in")[0]  # the bottom line, the smoke-test warning, the table: 100 columns at most
    assert out.startswith("Bottom line. Primary question:") and max(len(line) for line in summary.splitlines()) <= 100
    (directory,) = (tmp_path / "expert-specialization").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert len(results["performance"]["moe"]) == 3 and not results["failed_runs"]


def test_fast_planning_study_through_the_cli(tmp_path, capsys):
    code, out, _ = run(capsys, "study", "run", "planning", "--fast", "--out", str(tmp_path), "--no-progress")
    assert code == 0
    assert "solve rate" in out and "report:" in out
    (directory,) = (tmp_path / "planning").iterdir()
    results = json.loads((directory / "results.json").read_text())
    assert set(results["performance"]) == {f"{kind}-seed{s}" for kind in ("dense", "moe", "dense-pause0") for s in (0, 1)}
    assert not results["failed_runs"]
    report = (directory / "report.md").read_text()
    assert "## Solving mazes" in report and "## Time" in report
    timing = json.loads((directory / "timing.json").read_text())
    assert timing["runs_trained"] == 6 and timing["runs_reused"] == 0


def test_train_reads_task_options_from_a_config_file(capsys, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('[task_options]\nk = 3\nmax_length = 10\n[model]\nd_model = 16\nn_heads = 2\n'
                      '[train]\nsteps = 4\nn_train = 32\nn_val = 8\neval_every = 2\nbatch_size = 16\n')
    code, out, _ = run(capsys, "train", "--model", "moe", "--config", str(config), "--out", str(tmp_path), "--no-progress")
    assert code == 0 and "closing_accuracy" in out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task_options"]["k"] == 3 and saved["model"]["d_model"] == 16 and saved["train"]["steps"] == 4
    assert "arch" not in saved["model"]  # a transformer's run config (and hash) is as before the recurrent models came


def test_train_progress_goes_to_stderr_and_a_reused_run_says_so(capsys, tmp_path):
    args = ["train", "-o", "max_length=10", "-o", "min_length=2", "--set", "steps=4", "--set", "n_train=32",
            "--set", "batch_size=16", "--set", "n_val=8", "--set", "eval_every=2", "--set", "d_model=16",
            "--set", "n_heads=2", "--out", str(tmp_path)]
    code, out, err = run(capsys, *args)
    assert code == 0 and "closing_accuracy" in out
    assert "epoch" not in out and "step" not in out and "epoch" in err and "reusing" not in err
    assert "/-" not in err  # the bar counts steps of the budget, not "Epoch 1/-2" (issue 27 §6)
    code, out, err = run(capsys, *args)
    assert code == 0 and "closing_accuracy" in out
    assert "reusing the finished run in" in err and "epoch" not in err


def test_tasks_show_prints_class_names_and_unambiguous_sets(capsys):
    code, out, _ = run(capsys, "tasks", "show", "superposition", "-o", "n_features=14", "-o", "sparsity=0.5", "-n", "3")
    assert code == 0
    samples = out[out.index("sample 0:"):].splitlines()
    sets = [cell for line in samples if line.strip().startswith("active ") for cell in line.split()[1:]]
    assert sets and all(cell.startswith("{") and cell.endswith("}") for cell in sets)
    assert any("," in cell for cell in sets)  # {f2,f12}, never 212
    code, out, _ = run(capsys, "tasks", "show", "brackets", "-n", "1")
    stack_top = next(line for line in out[out.index("sample 0:"):].splitlines() if line.strip().startswith("stack_top "))
    assert "empty" in stack_top.split() and not any(cell.isdigit() for cell in stack_top.split()[1:])


def test_sample_help_shows_the_json_shape(capsys):
    code, out, _ = run(capsys, "tasks", "sample", "--help")
    assert code == 0
    assert '{"tokens": [token, ...], "labels": {label: [value per token, ...], ...}}' in out


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"toylab {version('toylab')}"


def test_written_files_follow_the_umask(tmp_path):
    from toylab import io

    old = os.umask(0o027)
    try:
        importlib.reload(io)
        io.write_text(tmp_path / "a.txt", "x")
        io.save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
        importlib.reload(io)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640


def test_code_version_stores_booleans():
    from toylab.study import code_version

    info = code_version()
    assert "git_dirty" not in info or isinstance(info["git_dirty"], bool)
    assert isinstance(info["toylab"], str)


def test_runs_list_tells_runs_apart_aligns_and_speaks_json(tmp_path, capsys):
    """Issue 27 §4: what differs between runs of one study, their seeds, models of `toylab train`, aligned columns, --json."""
    import json

    from toylab import io

    for name, router, seeds in (("aaaa", "hash", 5), ("bbbb", "label", "auto")):
        run_dir = tmp_path / "expert-specialization" / name
        io.write_json(run_dir / "config.json", {"study": "expert-specialization", "task": "modes", "router": router, "seeds": seeds,
                                                "train": {"steps": 1000}})
        results = {"task": {"name": "modes", "options": {}}, "runs": {}, "failed_runs": [], "below_competence": [], "heldout": []}
        if seeds == "auto":
            looks = [{"seeds": n, "alpha": 0.025, "verdicts": [], "settled": False} for n in (5, 10)]
            results["sequential"] = {"max_seeds": 10, "batch": 5, "alpha": 0.05, "rule": "obrien_fleming", "schedule": [5, 10],
                                     "looks": looks, "stopped": "budget spent"}
        io.write_json(run_dir / "results.json", results)
        io.write_json(run_dir / "summary.json", {"rows": [[["label", "mode"], ["verdict", "more"]]]})
    model = tmp_path / "train" / "modes-moe-0123456789"
    io.write_json(model / "config.json", {"task": "modes", "task_options": {}, "model": {"ffn": "moe"}, "train": {"seed": 3}})
    io.write_json(model / "final.json", {"metrics": {"sequence_accuracy": 1.0}, "weights_sha256": "0" * 64})
    code, out, _ = run(capsys, "runs", "list", "--out", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:6] == ["study", "task", "date", "hash", "seeds", "status"] and len(lines) == 4
    assert len({re.match(r"\S+\s+", line).end() for line in lines}) == 1  # the second column starts alike on every line
    code, out, _ = run(capsys, "runs", "list", "--out", str(tmp_path), "--json")
    found = {r["config_hash"]: r for r in json.loads(out)}
    assert found["aaaa"]["differs"] == "router=hash" and found["bbbb"]["differs"] == "router=label"
    assert found["bbbb"]["seeds"] == "auto: 10" and found["aaaa"]["seeds"] == "5"
    assert found["modes-moe-0123456789"]["status"] == "trained (toylab train)" and found["modes-moe-0123456789"]["seeds"] == "seed 3"
    assert "sequence_accuracy 1.000" in found["modes-moe-0123456789"]["headline"]
