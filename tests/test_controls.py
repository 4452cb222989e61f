"""The controls of `expert-specialization` end to end: label and hash routers on the planted `modes` task."""

import pytest

from toylab.cli import app
from toylab.study import run_study

TINY = {"competence": 0, "seeds": 2, "n_eval": 24, "n_permutations": 20, "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 2},
        "train": {"steps": 16, "n_train": 128, "n_val": 32, "eval_every": 8}}


def test_tiny_label_and_hash_routers_give_their_known_assignments(tmp_path):
    label = run_study("expert-specialization", {**TINY, "task": "modes", "router": "label", "router_label": "mode"},
                      out=tmp_path, progress=False).results
    for layer in ("0", "1"):
        assert label["specialization"][layer]["mode"]["routing_min_nmi"] == pytest.approx(1.0)
    hashed = run_study("expert-specialization", {**TINY, "task": "modes", "router": "hash"}, out=tmp_path, progress=False)
    assert all(e["max"] == 0 for e in hashed.results["expert_entropy_given_token"].values())
    mode = hashed.results["specialization"]["0"]["mode"]
    # exactly 0 given the token in every seed, as its null: identical by construction, and said so
    assert mode["routing_cnmi"]["mean"] == 0 and mode["conditional_vs_null"]["identical"]
    assert mode["conditional_vs_null"]["verdict"] == "equivalent"
    report = (hashed.directory / "report.md").read_text()
    assert report.startswith("# Expert specialization on `modes`\n\n## Smoke test\n") and "\n**Bottom line.**" in report
    assert "## Controls" in report
    assert "Routing is a function of the token" in report


@pytest.mark.parametrize("args,message", [
    (["--set", "router=label", "--set", "router_label=depth"], "router_label 'depth' is not a label of task 'modes'"),
    (["--set", "router=label"], "set both or neither"),
    (["--set", "router=hash", "--set", "top_k=2"], "top_k=1"),
    (["--set", "router=teleport"], "router"),
])
def test_bad_router_options_exit_2_with_one_line(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        app(["study", "run", "expert-specialization", "--task", "modes", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_hash_router_on_real_valued_task_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        app(["train", "--task", "superposition", "--model", "moe", "--set", "router=hash", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "real-valued inputs" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_label_router_recovers_mode_more_than_kmeans_in_every_seed(tmp_path):
    """Acceptance (issue 18): the default study (5 seeds) with the label router on `mode`, 4 experts for 4 modes."""
    results = run_study("expert-specialization", {"task": "modes", "router": "label", "router_label": "mode"},
                        out=tmp_path, progress=False, workers=2).results
    for layer, labels in results["specialization"].items():
        assert labels["mode"]["verdict"]["verdict"] == "more", layer
        assert labels["mode"]["routing_min_nmi"] >= 0.95


@pytest.mark.slow
def test_hash_router_is_a_function_of_the_token_and_carries_no_mode_beyond_it(tmp_path):
    results = run_study("expert-specialization", {"task": "modes", "router": "hash"}, out=tmp_path, progress=False,
                        workers=2).results
    for layer, labels in results["specialization"].items():
        assert results["expert_entropy_given_token"][layer]["max"] < 1e-9
        assert labels["token_type"]["routing_nmi"]["mean"] < 1  # more token types than experts
        assert labels["mode"]["conditional_vs_null"]["verdict"] == "equivalent"
        assert labels["mode"]["routing_max_cnmi_p_value"] > 0.05
