"""Bad input, round two (issue 33): exit code 2, exactly one line on stderr, no traceback, no run folder made.

One table per class: hangs and crashes, config files, errors that used to come after the study's directory was
written, options that did nothing, and writes or reads that a symbolic link or another user could redirect. Each
case runs in this process (with a 30 s alarm), except those that need an environment fixed before torch loads.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from toylab import io
from toylab.errors import ToylabError

from test_bad_inputs import run

SECONDS = 30
FAST = ["--fast", "--no-progress", "-j", "1"]
STUDY = ["study", "run", "expert-specialization", *FAST]
TRAIN = ["train", "--no-progress"]
FILES = {
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "deep.toml": "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "nested.json": '{"train": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}",
    "bigint.json": '{"train": {"steps": ' + "9" * 5000 + "}}",
    "bigint.toml": "[train]\nsteps = " + "9" * 5000 + "\n",
    "moe.toml": '[model]\nffn = "moe"\n',
    "vocab.toml": "[model]\nvocab_size = 5\n",
}


def folders(root: Path) -> set[str]:
    """Every folder under `root` (symbolic links to folders included)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, content in FILES.items():
        (tmp_path / name).write_text(content)
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refusal(capsys, args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of `toylab ARGS` in this process, within `SECONDS`."""
    code, _, err = run(capsys, args, SECONDS)
    return code, err


def check_refused(workdir: Path, code: int, err: str, message: str, before: set[str]) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and message in err, err
    assert folders(workdir) == before, "a refused command made a folder"
    assert not list((workdir / "outside").iterdir()), "a refused command wrote outside its run directory"


HANGS_AND_CRASHES = [
    (TRAIN + ["--set", "devices=2"], "one process per device (DDP), which toylab does not support"),
    (STUDY + ["--set", "train.devices=2"], "one process per device (DDP)"),
    (TRAIN + ["--set", "threads=100000"], "threads must be in [1, "),
    (TRAIN + ["--set", "steps=999999999999999999999999999999"], "an int of at most 64 bits"),
    (TRAIN + ["--set", "steps=100000000000"], "hours (more than 12); ask for fewer (--set steps=...), or pass --force"),
    (["study", "run", "expert-specialization", "--seeds", "100000"], "hours (more than 12)"),
    (["study", "run", "expert-specialization", "--sweep", "eval_seed=" + ",".join(map(str, range(3000)))],
     "of 3,000 configurations of the sweep would take about"),
    (TRAIN + ["--config", "fifo.toml"], "is not a regular file"),
    (TRAIN + ["--set", "lr=1e300"], "magnitude at most 3.4e+38"),
    (STUDY[:-2] + ["-j", "461168601842"], "workers must be in [1, 1024]"),
    (STUDY + ["--launcher", "slurm"], "the slurm launcher needs SLURM's sbatch"),
]


@pytest.mark.parametrize("args,message", HANGS_AND_CRASHES, ids=[" ".join(a)[:70] for a, _ in HANGS_AND_CRASHES])
def test_hangs_and_crashes_are_refused_first(workdir, capsys, monkeypatch, args, message):
    monkeypatch.setenv("PATH", str(workdir))  # no SLURM here
    before = folders(workdir)
    check_refused(workdir, *refusal(capsys, args), message, before)


CONFIG_FILES = [
    (TRAIN + ["--config", "deep.json"], "nests deeper than 16"),
    (TRAIN + ["--config", "deep.toml"], "nests deeper than 16"),
    (TRAIN + ["--config", "nested.json"], "nests deeper than 16"),
    (TRAIN + ["--config", "bigint.json"], "Exceeds the limit (4300 digits)"),
    (TRAIN + ["--config", "bigint.toml"], "Exceeds the limit (4300 digits)"),
    (STUDY + ["--config", "deep.json"], "nests deeper than 16"),
    (STUDY + ["--config", "bigint.toml"], "Exceeds the limit (4300 digits)"),
    (STUDY + ["--config", "bigint.json"], "Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize("args,message", CONFIG_FILES, ids=[" ".join(a)[:60] for a, _ in CONFIG_FILES])
def test_config_files_nested_deeply_or_with_huge_integers(workdir, capsys, args, message):
    before = folders(workdir)
    check_refused(workdir, *refusal(capsys, args), message, before)


BEFORE_WRITING = [
    (STUDY + ["--set", "eval_seed=-1"], "eval_seed must be in [0, "),
    (STUDY + ["--set", "n_eval=100000000000"], "GiB of memory"),
    (STUDY + ["--set", "train.n_val=100000000000"], "GiB of memory"),
    (["study", "run", "superposition", *FAST, "--set", "n_features=100000000"], "n_features must be in [1, 10000]"),
    (["study", "run", "superposition", *FAST, "--set", "seeds=1000000000"], "GiB of memory"),
    (STUDY + ["--set", "train.devices=3"], "devices"),
    (STUDY + ["--set", "train.accelerator=mps"], "accelerator 'mps' is not available here"),
    (STUDY + ["--set", "n_permutations=100000000000000"], "n_permutations must be in [1, 100,000]"),
    (["study", "run", "dictionaries", *FAST, "--set", "token_layer=5"],
     "hook point 'blocks.5.ln2.hook_normalized' does not exist in the study's model of brackets"),
    (["study", "run", "dictionaries", *FAST, "--set", "token_layer=-1"], "hook point 'blocks.-1.ln2.hook_normalized' does not exist"),
    (["study", "run", "dictionaries", *FAST, "--set", "token_model.ffn=dense"],
     "hook point 'blocks.1.mlp.hook_expert_indices' does not exist in the study's model of brackets (ffn='dense', n_layers=2)"),
    (["study", "run", "dictionaries", *FAST, "--set", "token_task=superposition"], "real-valued inputs, not tokens"),
    (STUDY + ["--sweep", "eval_seed=1,-1"], "eval_seed must be in [0, "),
    (STUDY + ["--launcher", "ray", "--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (STUDY + ["--sweep", "n_experts=2,4", "--launcher", "ray", "--address", "ray://127.0.0.1:1"], "cannot reach a Ray cluster"),
    (STUDY + ["--launcher", "ray", "--address", "auto"], "--address auto found no running Ray cluster"),  # none runs here
]


@pytest.mark.parametrize("args,message", BEFORE_WRITING, ids=[" ".join(a)[:60] for a, _ in BEFORE_WRITING])
def test_study_configs_are_checked_before_the_directory_is_made(workdir, capsys, args, message):
    before = folders(workdir)
    check_refused(workdir, *refusal(capsys, args), message, before)


DID_NOTHING = [
    (STUDY + ["--set", "router_label=depth"], "router_label names the label that router='label'"),
    (STUDY + ["--set", "model.ffn=bogus"], "model.ffn='bogus' has no effect"),
    (STUDY + ["--set", "model.n_experts=8"], "model.n_experts='8' has no effect: the study sets n_experts itself (--set"),
    (STUDY + ["--set", "model.vocab_size=5"], "vocab_size is the task's"),
    (STUDY + ["--set", "train.seed=3"], "train.seed=3 has no effect"),
    (TRAIN + ["--model", "dense", "--config", "moe.toml"], "choose the model with --model"),
    (TRAIN + ["--config", "vocab.toml"], "'vocab_size' in the model table of vocab.toml does nothing"),
    (STUDY + ["--task", "brackets", "--set", "task=modes"], "'task' is given twice"),
    (STUDY + ["--seeds", "3", "--set", "seeds=4"], "'seeds' is given twice"),
    (STUDY + ["-o", "k=3", "--set", "task_options.k=4"], "'task_options.k' is given twice"),
    (STUDY + ["--set", "n_experts=8", "--sweep", "n_experts=2"], "'n_experts' is given twice, by --sweep"),
    (STUDY + ["--sweep", "n_experts=2,2"], "sweep n_experts lists '2' twice"),
    (TRAIN + ["--seed", "1", "--set", "seed=2"], "'seed' is given twice, by --seed 1"),
    (TRAIN + ["--set", "steps=5", "--set", "steps=6"], "option 'steps' given twice"),
    (["tasks", "show", "brackets", "-o", "k=\u0663\u0663"], "expected int"),
    (TRAIN + ["--set", "steps=\u0663"], "expected int"),
    (STUDY + ["--seeds", "\u0663"], "invalid --seeds"),
    (STUDY[:-2] + ["-j", "\u0663"], "Invalid value for '--workers' / '-j'"),
    (["tasks", "show", "brackets", "-n", "\u0663"], "Invalid value for '-n'"),
    (STUDY + ["--sweep", "n_experts=\u0662,\u0664"], "expected int"),
]


@pytest.mark.parametrize("args,message", DID_NOTHING, ids=[" ".join(a)[:60] for a, _ in DID_NOTHING])
def test_options_that_would_do_nothing_are_refused(workdir, capsys, args, message):
    before = folders(workdir)
    check_refused(workdir, *refusal(capsys, args), message, before)


@pytest.mark.parametrize("env,message", [({"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS='abc'"),
                                         ({"HOME": "afile/home"}, "n_experts must be >= 1")],
                         ids=["OMP_NUM_THREADS=abc", "read-only HOME"])
def test_the_environment_adds_no_lines(workdir, env, message):
    """Before torch or matplotlib load: a subprocess."""
    (workdir / "afile").write_text("a file where HOME's folders would go\n")
    before = folders(workdir)
    environment = {key: value for key, value in os.environ.items() if key not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR")}
    environment.update({key: str(workdir / value) if key == "HOME" else value for key, value in env.items()})
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-m", "toylab", *STUDY, "--set", "n_experts=0"], capture_output=True, text=True,
                            env=environment, timeout=SECONDS)
    check_refused(workdir, result.returncode, result.stderr, message, before)


def study_directory(out: Path) -> Path:
    """Where `toylab study run expert-specialization --fast --out OUT` writes."""
    from toylab.config import config_hash, to_dict
    from toylab.study import resolve

    config = resolve("expert-specialization", {}, fast=True).config
    return out / "expert-specialization" / config_hash({"study": "expert-specialization", **to_dict(config)})


def symlinked_models(workdir: Path) -> list[str]:
    (study_directory(workdir / "out").mkdir(parents=True))
    (study_directory(workdir / "out") / "models").symlink_to(workdir / "outside")
    return STUDY + ["--out", "out"]


def symlinked_figures(workdir: Path) -> list[str]:
    (workdir / "run").mkdir()
    (workdir / "run" / "config.json").write_text('{"study": "expert-specialization"}')
    (workdir / "run" / "results.json").write_text("{}")
    (workdir / "run" / "figures").symlink_to(workdir / "outside")
    return ["report", "run"]


def open_launcher_folder(workdir: Path) -> list[str]:
    """A SLURM (sbatch on PATH) and a study directory whose launcher/ others may write to."""
    for tool in ("sbatch", "srun"):
        (workdir / tool).write_text("#!/bin/sh\nexit 1\n")
        (workdir / tool).chmod(0o755)
    os.environ["PATH"] = f"{workdir}:{os.environ['PATH']}"
    launcher = study_directory(workdir / "out") / "launcher"
    launcher.mkdir(parents=True)
    launcher.chmod(0o777)
    return STUDY + ["--out", "out", "--launcher", "slurm"]


LINKS = [(symlinked_models, "a symbolic link there leads out of"), (symlinked_figures, "a symbolic link there leads out of"),
         (open_launcher_folder, "other users can write to it")]


@pytest.mark.parametrize("setup,message", LINKS, ids=[setup.__name__ for setup, _ in LINKS])
def test_nothing_is_written_out_of_a_run_or_unpickled_from_a_shared_folder(workdir, capsys, monkeypatch, setup, message):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after `open_launcher_folder` extends it
    args = setup(workdir)
    before = folders(workdir)
    check_refused(workdir, *refusal(capsys, args), message, before)


def test_reading_a_fifo_run_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ToylabError, match="not a regular file"):
        io.read_json(tmp_path / "config.json")


def test_a_private_launcher_folder_is_made_private(tmp_path):
    from toylab.executors import private_folder

    assert private_folder(tmp_path / "launcher").stat().st_mode & 0o777 == 0o700


def test_a_worker_whose_parent_dies_while_it_starts_exits_at_once(tmp_path):
    """Orphans at start-up: the parent-watch thread runs before the worker imports torch (here made to take 60 s)."""
    slow_torch = tmp_path / "torch.py"
    slow_torch.write_text("import time\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", "pass"])
    parent.wait()  # a pid that is no longer our parent
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from toylab.executors import start_worker; start_worker({parent.pid})"
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=environment, timeout=SECONDS, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr


def test_the_hooks_a_study_reads_are_checked_against_its_model():
    from toylab.registry import get_task
    from toylab.study import check_hooks

    task, moe = get_task("brackets"), {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 2, "ffn": "moe"}
    check_hooks(task, moe, ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_expert_indices"])  # they exist: accepted
    with pytest.raises(ToylabError, match=r"valid: blocks\.0\.mlp\.hook_expert_indices, blocks\.1\.mlp\.hook_expert_indices$"):
        check_hooks(task, moe, ["blocks.2.mlp.hook_expert_indices"])
    with pytest.raises(ToylabError, match=r"\(arch='gru', n_layers=1\); valid: none of that kind$"):
        check_hooks(task, {"arch": "gru", "d_model": 8, "n_layers": 1}, ["blocks.0.mlp.hook_post"])
