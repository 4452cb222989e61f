"""Bad input on every command: exit code 2, exactly one line on stderr, no traceback, no file created or changed.

The table holds one or more cases of each class of bad input: usage errors, output paths, config
files, values the config must check (not torch, numpy or Lightning), impossible or huge sizes, and
mismatches between a command and a task or study.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toylab.cli import app
from toylab.errors import ToylabError

FILES = {
    "afile": "not a folder\n",
    "binary.json": b"\x00\x01\xff\xfe",
    "latin1.toml": "k = 'caf\xe9'\n".encode("latin-1"),
    "null.json": "null",
    "list.json": "[1, 2]",
    "string.json": '"train"',
    "train5.toml": "train = 5\n",
    "model5.toml": "model = 5\n",
    "options5.json": '{"task_options": 5}',
    "badvalue.toml": "[train]\nsteps = true\n",
    "nan.toml": "[train]\nweight_decay = nan\n",
    "config.yaml": "steps: 5\n",
    "huge.json": "{" + " " * (2 << 20) + "}",
}
CPU_ONLY = ["--set", "accelerator=cpu"]

CASES = [
    # usage errors (Typer/Click), each one line pointing to --help
    (["bogus"], "No such command 'bogus'; see 'toylab --help'"),
    (["tasks"], "missing command (list, show, sample, new)"),
    (["tasks", "show"], "Missing argument"),
    (["tasks", "show", "brackets", "-n", "abc"], "'-n'"),
    (["tasks", "show", "brackets", "--colour"], "No such option"),
    (["tasks", "show", "brackets", "--seed", "-1"], "'--seed'"),
    (["tasks", "sample", "brackets", "--seed", str(2**40)], "'--seed'"),
    (["tasks", "list", "extra"], "unexpected extra argument"),
    (["train", "--seed", "-1"], "'--seed'"),
    (["train", "--model", "drc"], "reads the input as a grid, and task 'brackets' has none"),
    (["study", "run"], "Missing argument"),
    (["study", "run", "expert-specialization", "-j", "0"], "'--workers'"),
    # output paths
    (["tasks", "sample", "brackets", "--out", "adir"], "cannot write adir: it is a folder"),
    (["tasks", "sample", "brackets", "--out", "afile/x.jsonl"], "afile is a file, not a folder"),
    (["tasks", "sample", "brackets", "--out", "afile/deeper/x.jsonl"], "afile is a file, not a folder"),
    (["tasks", "sample", "brackets", "--out", "fifo.jsonl"], "not a regular file"),
    (["tasks", "sample", "brackets", "--out", "/dev/null"], "not a regular file"),
    (["tasks", "sample", "brackets", "--out", ""], "'--out': must not be empty"),
    (["train", "--out", "", "--set", "steps=1"], "'--out': must not be empty"),
    (["train", "--out", "afile", "--set", "steps=1"], "afile is a file, not a folder"),
    (["study", "run", "expert-specialization", "--out", ""], "'--out': must not be empty"),
    (["study", "run", "expert-specialization", "--out", "afile"], "afile"),
    # config files
    (["train", "--config", "binary.json"], "not UTF-8 text"),
    (["train", "--config", "latin1.toml"], "not UTF-8 text"),
    (["train", "--config", "null.json"], "must hold a table of keys"),
    (["train", "--config", "list.json"], "must hold a table of keys"),
    (["train", "--config", "string.json"], "must hold a table of keys"),
    (["train", "--config", "train5.toml"], "'train' in train5.toml must be a table"),
    (["train", "--config", "model5.toml"], "'model' in model5.toml must be a table"),
    (["train", "--config", "options5.json"], "'task_options' in options5.json must be a table"),
    (["train", "--config", "badvalue.toml"], "invalid value True for 'steps'"),
    (["train", "--config", "nan.toml"], "expected a finite number"),
    (["train", "--config", "fifo.json"], "is not a regular file"),
    (["train", "--config", "folder.toml"], "is not a regular file"),
    (["train", "--config", "/dev/zero"], "unsupported config file"),
    (["train", "--config", "config.yaml"], "unsupported config file"),
    (["train", "--config", "missing.toml"], "config file not found"),
    (["train", "--config", "huge.json"], "at most"),
    (["train", "--config", ""], "'--config': must not be empty"),
    (["study", "run", "expert-specialization", "--config", "null.json"], "must hold a table of keys"),
    (["study", "run", "expert-specialization", "--config", "list.json"], "must hold a table of keys"),
    (["study", "run", "expert-specialization", "--config", "train5.toml"], "'train' is a table, not a value"),
    (["study", "run", "expert-specialization", "--config", "binary.json"], "not UTF-8 text"),
    # values the config checks, before torch, numpy or Lightning see them
    (["train", "--model", "moe", "--set", "top_k=5"], "top_k must be in [1, n_experts=4]"),
    (["train", "--model", "moe", "--set", "n_experts=0"], "n_experts must be >= 1"),
    (["train", "--model", "moe", "--set", "d_expert=0"], "d_expert"),
    (["train", "--model", "moe", "--set", "load_balance_weight=-1"], "load_balance_weight"),
    (["train", "--set", "accelerator=quantum"], "unknown accelerator 'quantum'; valid: cpu, gpu"),
    (["train", *CPU_ONLY, "--set", "devices=0"], "devices must be >= 1"),
    (["train", *CPU_ONLY, "--set", "devices=100000"], "devices must be in [1,"),
    (["train", "--set", "weight_decay=nan"], "expected a finite number"),
    (["train", "--set", "lr=inf"], "expected a finite number"),
    (["train", "--set", "grad_clip=-1"], "grad_clip must be a finite number >= 0"),
    (["train", "--set", "d_model=0"], "d_model must be >= 1"),
    (["train", "--set", "n_heads=0"], "n_heads must be >= 1"),
    (["train", "--set", "n_layers=-2"], "n_layers must be >= 1"),
    (["train", "--set", "warmup_steps=-5"], "warmup_steps must be >= 0"),
    (["train", "--set", "batch_size=100000"], "batch_size=100000 exceeds n_train=20000"),
    (["train", "--set", "steps=2.5"], "expected int"),
    (["tasks", "show", "brackets", "-o", "k=0"], "k must be in [1,"),
    (["tasks", "show", "gridworld", "-o", "size=1"], "size must be in [2, 10]"),
    (["tasks", "show", "superposition", "-o", "sparsity=nan"], "expected a finite number"),
    # impossible or huge sizes: refused at once, with what is valid or an estimate
    (["tasks", "show", "brackets", "-o", "min_length=1000", "-o", "max_length=1000"], "use min_length <= 7"),
    (["tasks", "show", "brackets", "-o", "min_length=30", "-o", "m=2"], "rejection sampling would not finish"),
    (["tasks", "show", "brackets", "-o", "max_length=100000000"], "max_length <= 10000"),
    (["tasks", "show", "brackets", "-o", "m=1000000000"], "m must be in [1, max_length=32]"),
    (["tasks", "show", "brackets", "-n", "100000000000"], "'-n'"),
    (["tasks", "sample", "brackets", "-n", "100000000000"], "GiB of memory, more than this machine's"),
    (["tasks", "sample", "superposition", "-o", "n_features=1000000000"], "n_features must be in [1, 10000]"),
    (["tasks", "sample", "gridworld", "-o", "pause=1000000000"], "pause must be in [0, 1000]"),
    (["train", "--set", "n_train=100000000000"], "GiB of memory"),
    (["train", "--set", "d_model=1000000", "--set", "n_heads=1"], "parameters"),
    # mismatches between a command and a task or study
    (["train", "--task", "superposition"], "real-valued inputs, not tokens; token tasks: brackets, gridworld"),
    (["study", "run", "expert-specialization", "--task", "superposition"], "token tasks: brackets, gridworld"),
    (["study", "run", "moe-superposition", "--set", "top_k=7"], "top_k=7 exceeds every number of experts"),
    (["study", "run", "expert-specialization", "--set", "train=5"], "'train' is a table, not a value"),
    (["study", "run", "expert-specialization", "--set", "model=5"], "'model' is a table, not a value"),
    (["study", "run", "expert-specialization", "--set", "task_options=5"], "'task_options' is a table"),
    (["study", "run", "expert-specialization", "--set", "train=5", "--set", "train.steps=3"], "both as a value and as a table"),
    (["study", "run", "expert-specialization", "--set", "train.steps.x=3"], "'steps' takes a single value, not a table"),
    (["study", "run", "superposition", "--set", "train.weight_decay=-1"], "weight_decay"),
]


class Hung(Exception):
    """A command that did not return in time (not an OSError, which the CLI would print as one line)."""


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` with its kind, size and modification time."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "adir").mkdir()
    (tmp_path / "folder.toml").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    os.mkfifo(tmp_path / "fifo.jsonl")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, args: list[str], seconds: int = 60) -> tuple[int, str, str]:
    def hung(*_):
        raise Hung(f"{args} did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        with pytest.raises(SystemExit) as exit_info:
            app(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(args)[:70] for args, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workdir, capsys, args, message):
    before = snapshot(workdir)
    code, _, err = run(capsys, args)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert message in err
    assert snapshot(workdir) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("args", [["train", "--set", "accelerator=gpu", "--set", "steps=1"],
                                  ["study", "run", "expert-specialization", "--fast", "--no-progress", "-j", "1",
                                   "--set", "train.accelerator=gpu"]])
def test_a_missing_gpu_is_one_line_before_anything_is_written(workdir, capsys, args):
    before = snapshot(workdir)
    code, _, err = run(capsys, args)
    assert code == 2 and len(err.splitlines()) == 1 and "accelerator 'gpu' is not available here" in err, err
    assert snapshot(workdir) == before


def test_the_table_covers_every_command():
    commands = {tuple(a for a in args[:2] if not a.startswith("-")) for args, _ in CASES}
    assert {("tasks", "show"), ("tasks", "sample"), ("tasks", "list"), ("study", "run")} <= commands
    assert len(CASES) >= 40 and any(args[0] == "train" for args, _ in CASES)


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left"),
                                         (errno.EACCES, "Permission denied")])
def test_write_errors_name_the_path_and_leave_nothing(workdir, capsys, monkeypatch, code, reason):
    """A read-only folder, a full disk, no permission: simulated, since the tests may run as root."""
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    before = snapshot(workdir)
    status, _, err = run(capsys, ["tasks", "sample", "brackets", "-n", "5", "--out", "out/x.jsonl"])
    assert status == 2 and len(err.splitlines()) == 1
    assert "cannot write out/x.jsonl" in err and reason in err
    assert not list(workdir.glob("out/*")) and set(snapshot(workdir)) - set(before) <= {"out"}


def test_io_refuses_to_replace_a_special_file(tmp_path):
    from toylab import io

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ToylabError, match="not a regular file"):
        io.write_text(tmp_path / "pipe", "x")
    assert (tmp_path / "pipe").is_fifo()


def test_brackets_keep_rate_matches_the_sampler():
    """The rejection-sampling check rests on this share; compare it with the sampler's own strings."""
    from toylab.registry import get_task
    from toylab.tasks.brackets import OPEN, keep_rate

    for m, length in [(4, 8), (2, 10), (1, 3), (6, 20)]:
        tokens, _ = get_task("brackets", m=m, min_length=1, max_length=40)._generate(100_000, np.random.default_rng(0))
        share = ((tokens >= OPEN).sum(1) >= length).mean()
        assert abs(share - keep_rate(m, length)[0]) < 0.006
    rate, longest = keep_rate(4, 1000)
    assert rate < 0.01 and keep_rate(4, longest)[0] >= 0.01 > keep_rate(4, longest + 1)[0]


def test_help_and_task_listing_do_not_import_torch():
    """Start-up stays fast (benchmarks/bench_startup.py times it): no torch, Lightning, pandas or matplotlib."""
    code = ("import sys; from toylab.cli import app\n"
            "for args in (['--help'], ['tasks', 'list'], ['--version']):\n"
            "    try: app(args)\n"
            "    except SystemExit as e: assert e.code == 0, e.code\n"
            "heavy = {'torch', 'pytorch_lightning', 'pandas', 'matplotlib'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
