"""Training dynamics: saturation and its chance level on known routings, lock-in and learned steps, and the
`dynamics` study end to end, killed mid-training and resumed to the results of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from itertools import product

import numpy as np
import pytest

from toylab.analysis.dynamics import chance_agreement, lock_in, reached, saturation, timing
from toylab.analysis.ood import agreement, agreement_null, agrees, class_agreement, class_experts, ood_routing, shared_classes
from toylab.analysis.stats import verdict_label
from toylab.registry import get_task
from toylab.schema import validate_results
from toylab.training import build_model


def test_saturation_is_one_for_the_final_routing_and_at_chance_for_an_unrelated_one() -> None:
    rng = np.random.default_rng(0)
    final = np.sort(rng.integers(0, 4, (20000, 2)), axis=1)
    assert saturation(final, final) == 1.0
    unrelated = np.sort(rng.integers(0, 4, (20000, 2)), axis=1)  # the negative control: routing that ignores the end
    assert abs(saturation(unrelated, final) - chance_agreement(unrelated, final)) < 0.01
    planted = np.where(rng.random(20000)[:, None] < 0.7, final, unrelated)  # 70% routed as at the end
    expected = 0.7 + 0.3 * chance_agreement(unrelated, final)
    assert abs(saturation(planted, final) - expected) < 0.015


def test_chance_agreement_is_the_sum_over_expert_sets_of_both_usages() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 3, (500, 1)), np.minimum(rng.integers(0, 5, (400, 1)), 2)
    by_hand = sum(np.mean(a[:, 0] == e) * np.mean(b[:, 0] == e) for e in range(3))
    assert chance_agreement(a, b) == pytest.approx(by_hand)
    pairs = np.array(list(product(range(3), range(3))))
    assert chance_agreement(pairs, pairs[:1].repeat(9, 0)) == pytest.approx(1 / 9)


def test_lock_in_is_the_first_step_from_which_the_value_holds_and_timing_reads_it() -> None:
    steps = [0, 10, 20, 40, 80]
    assert lock_in(steps, ["less", "more", "less", "more", "more"]) == 40
    assert lock_in(steps, ["more"] * 5) == 0 and lock_in(steps, ["a", "a", "a", "a", "b"]) == 80
    assert reached(steps, [0.1, 0.96, 0.5, 0.97, 0.99], 0.95) == 40 and reached(steps, [0.99, 0.9], 0.95) is None
    assert timing(20, 40, "more") == "before" and timing(40, 40, "equivalent") == "with" and timing(80, 40, "less") == "after"
    assert timing(0, 40, "inconclusive") == "not a finding" and timing(0, None, "more") == "task not learned"


TINY = ["--fast", "--no-progress", "-j", "1", "--set", "seeds=2", "--set", "n_eval=24", "--set", "n_permutations=10",
        "--set", "train.steps=160", "--set", "train.checkpoint_every=40"]


def run_study(out, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toylab", "study", "run", "dynamics", *TINY, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_dynamics_study_killed_mid_training_resumes_to_the_results_of_an_uninterrupted_one(tmp_path) -> None:
    whole = run_study(tmp_path / "whole")
    killed = run_study(tmp_path / "killed", start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any((tmp_path / "killed").glob("dynamics/*/models/*/checkpoints/resume.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert killed.poll() is None, "the study finished before it could be killed mid-training"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    resumed = run_study(tmp_path / "killed")
    (_, err), (_, whole_err) = resumed.communicate(timeout=600), whole.communicate(timeout=600)
    assert resumed.returncode == 0 and whole.returncode == 0, err + whole_err
    assert "resuming" in err
    (done,), (again,) = (list((tmp_path / name).glob("dynamics/*/results.json")) for name in ("whole", "killed"))
    assert done.read_bytes() == again.read_bytes()
    results = json.loads(done.read_text())
    assert results["steps"] == [0, 40, 80, 120, 160] and len(results["series"]) == 5
    assert {"learned", "labels", "saturated"} <= set(results["lock_in"])
    assert results["series"][-1]["saturation"]["0"]["mean"] == 1.0  # the final checkpoint is the final routing
    validate_results(results, "dynamics")  # the documented schema
    expert_map = json.loads((done.parent / "expert_map.json").read_text())  # the final MoEs, in and off distribution
    assert set(expert_map["seeds"]) == set(expert_map["ood"]["seeds"]) == {"0", "1"}
    for layer, labels in results["ood"]["labels"].items():
        for name, scores in labels.items():
            assert expert_map["ood"]["agreement"][layer][name]["holds"] == verdict_label(scores["holds"])
    assert 'class="em-ood-key"' in (done.parent / "report.html").read_text()  # the page explains the OOD tab's marks


def test_the_class_map_holds_off_distribution_for_planted_routing_and_sits_at_its_null_for_random_routing() -> None:
    rng = np.random.default_rng(2)
    label, shifted = rng.integers(0, 5, 4000), rng.integers(0, 5, 4000)
    mapping = class_experts(label % 4, label, 5, 4)
    assert mapping.tolist() == [0, 1, 2, 3, 0]
    assert agreement(shifted % 4, shifted, mapping) == 1.0  # positive control: routed by class, in and off distribution
    assert (agrees(shifted % 4, shifted, mapping) == 1).all() and class_agreement(shifted % 4, shifted, mapping) == [1.0] * 5
    noise = rng.integers(0, 4, 4000)  # negative control: routing that ignores the class
    null = agreement_null(noise, shifted, mapping, 200, 0)
    assert abs(agreement(noise, shifted, mapping) - null.mean()) < 3 * null.std() + 1e-9
    assert abs(null.mean() - 0.25) < 0.02
    assert all(abs(share - 0.25) < 0.05 for share in class_agreement(noise, shifted, mapping))
    partial = np.array([0, 1, -1])  # class 2 is not in the map, -1 marks an undefined label
    assert agrees(np.array([0, 2, 1, 3]), np.array([0, 1, 2, -1]), partial).tolist() == [1, 0, -1, -1]
    assert class_agreement(np.array([0, 2, 1]), np.array([0, 1, 2]), partial) == [1.0, 0.0, None]


def test_shifted_inputs_are_deeper_or_longer_and_share_the_classes_by_name() -> None:
    brackets = get_task("brackets")
    deeper = brackets.shifted_sample(300, 0)
    assert (deeper.labels["depth"].max(1) > brackets.config.m).all() and brackets.shifted().vocab == brackets.vocab
    assert shared_classes(brackets, brackets.shifted(), "depth").tolist() == [0, 1, 2, 3, 4, -1, -1]
    modes = get_task("modes")
    assert modes.shifted().seq_len > modes.seq_len and modes.shifted().vocab == modes.vocab
    maze = get_task("gridworld", {"size": 3, "canvas": 4})
    assert maze.shifted().config.size == 4 and maze.shifted().vocab == maze.vocab and get_task("gridworld").shifted() is None
    assert get_task("superposition").shifted() is None


def test_a_label_routed_moe_keeps_its_class_map_off_distribution() -> None:
    task = get_task("brackets")
    model = build_model(task, {"ffn": "moe", "router": "label", "router_label": "depth", "n_experts": 4, "d_model": 16,
                               "n_heads": 2, "d_mlp": 32, "n_layers": 1})
    found = ood_routing(model, task, task.sample_split(60, 1, "heldout"), task.shifted(), task.shifted_sample(60, 2), 50, 0, ["depth"])
    depth = found["0"]["depth"]
    assert depth["agreement_id"] == depth["agreement_ood"] == 1.0 and depth["agreement_null"] < 0.5
