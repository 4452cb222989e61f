"""Study processes: workers die with their parent, Ctrl-C stops cleanly, concurrent invocations share a
directory safely, and a study whose every run fails says so."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toylab.training import load_trained

STUDY = [sys.executable, "-m", "toylab", "study", "run", "expert-specialization", "--fast", "--no-progress", "--seeds", "3"]
SLOW_TRAINING = ["--set", "train.steps=3000", "--set", "train.eval_every=1000"]


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def training_started(out: Path) -> bool:
    return any(out.glob("expert-specialization/*/models/*/.attempt-*"))


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def test_workers_die_with_their_killed_parent(tmp_path):
    main = subprocess.Popen([*STUDY, "-j", "2", "--out", str(tmp_path), *SLOW_TRAINING], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: training_started(tmp_path) and len(children(main.pid)) >= 2, 120)
        workers = children(main.pid)
        main.kill()
        main.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 5), "a worker outlived its parent"
    finally:
        main.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_exits_130_with_one_line_and_resumes(tmp_path, workers):
    command = [*STUDY, "-j", workers, "--out", str(tmp_path), *SLOW_TRAINING]
    # Ctrl-C as in a terminal: SIGINT handled by default in the study, whatever the test runner's process does with it
    main = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert wait_until(lambda: training_started(tmp_path), 120)
        time.sleep(1)
        main.send_signal(signal.SIGINT)
        out, err = main.communicate(timeout=180)
    finally:
        main.kill()  # never leave a study training on after a failure
    assert main.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "rerun the same command" in lines[0], err
    assert "Traceback" not in err + out
    assert wait_until(lambda: not children(main.pid), 5)


def test_two_invocations_into_one_directory_leave_it_valid_and_resumable(tmp_path):
    command = [*STUDY, "-j", "1", "--out", str(tmp_path), "--set", "train.steps=150"]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2))
    for process in (first, second):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    (study,) = tmp_path.glob("expert-specialization/*")
    for run_dir in (study / "models").iterdir():
        load_trained(run_dir)  # every run finished, intact, with one clean log
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith(("epoch", "step", "train", "val")) and all(len(r.split(",")) == len(rows[0].split(",")) for r in rows)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    timing = json.loads((study / "timing.json").read_text())
    assert timing["runs_trained"] == 0 and timing["runs_reused"] == 6


def test_a_study_whose_every_run_fails_exits_2_with_one_line(tmp_path):
    done = subprocess.run([*STUDY, "-j", "1", "--out", str(tmp_path), "--set", "train.lr=1e30", "--set", "train.grad_clip=0"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines[-1].startswith("error: all 6 training runs failed"), done.stderr
    assert "Traceback" not in done.stderr
