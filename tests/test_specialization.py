"""The specialization analysis finds planted expert-label structure, and nothing in noise."""

import numpy as np
import pytest

from toylab import get_task
from toylab.analysis.clustering import kmeans
from toylab.analysis.null_routers import balanced_kmeans, random_linear_routers
from toylab.analysis.specialization import (
    MARGIN_FLOOR, alignment, analysable_labels, floor_compare, label_margin, label_scores, summarize,
)
from toylab.analysis.stats import FLOOR, adjust_family, compare, verdict_label


def test_planted_assignment_is_found_and_random_is_not():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, 4000)
    planted = np.where(rng.random(4000) < 0.9, label % 4, rng.integers(0, 4, 4000))  # 4 experts, 5 classes
    found = alignment(planted, label, 5, n_permutations=200, seed=0)
    assert found["nmi"] > 0.6 and found["p_value"] == pytest.approx(1 / 201)
    assert found["null_nmi_mean"] < 0.01
    table = np.array(found["contingency"])
    assert table.shape == (4, 5) and table.sum() == 4000
    assert table[0, 0] > 0.8 * (label == 0).sum()
    noise = alignment(rng.integers(0, 4, 4000), label, 5, n_permutations=200, seed=0)
    assert noise["nmi"] < 0.01 and noise["p_value"] > 0.01


def fake_seed(routing: float, kmeans: float, p: float = 0.001, ceiling: float = 0.8) -> dict:
    def result(nmi: float) -> dict:
        return {"nmi": nmi, "ami": nmi - 0.001, "ari": nmi / 2, "cnmi": nmi / 3, "null_nmi_mean": 0.001, "null_cnmi_mean": 0.002,
                "p_value": p, "cnmi_p_value": p}

    scores = {"routing": result(routing), "kmeans_moe": result(kmeans), "kmeans_dense": result(kmeans),
              "linear": {"accuracy": 0.9, "baseline": 0.3, "nmi": ceiling}, "label": {"entropy_given_token": 1.0}}
    return {"0": {"depth": scores}}


def test_summary_gives_cis_and_four_way_verdicts_over_seeds():
    more = summarize([fake_seed(0.8, 0.3), fake_seed(0.75, 0.35), fake_seed(0.82, 0.31)])["0"]["depth"]
    assert more["routing_nmi"]["mean"] == pytest.approx(0.79)
    assert more["routing_nmi"]["ci_low"] < 0.79 < more["routing_nmi"]["ci_high"]
    assert more["verdict"]["verdict"] == "more" and more["routing_min_nmi"] == 0.75
    assert more["linear_accuracy"]["mean"] == pytest.approx(0.9)
    unclear = summarize([fake_seed(0.5, 0.4), fake_seed(0.3, 0.45), fake_seed(0.6, 0.5)])["0"]["depth"]
    assert unclear["verdict"]["verdict"] == "inconclusive"
    same = summarize([fake_seed(0.5, 0.49), fake_seed(0.3, 0.31), fake_seed(0.6, 0.6)])["0"]["depth"]
    assert same["verdict"]["verdict"] == "equivalent"
    failed_seed = summarize([fake_seed(0.8, 0.3), None, fake_seed(0.82, 0.31)])["0"]["depth"]
    assert failed_seed["routing_nmi"]["n"] == 2
    assert more["routing_ami"]["mean"] == pytest.approx(0.789) and more["margin"] == {"delta": 0.05, "rule": "absolute"}


def test_relative_margin_scales_with_the_linear_ceiling():
    """The default margin is a share of what a linear probe reads: the same differences (about 0.03 NMI) are
    equivalent beside a ceiling of 0.8 (δ = 0.08) and a difference (more) beside one of 0.2 (δ = 0.02); the floor holds."""
    assert label_margin(0.8)["delta"] == pytest.approx(0.08) and label_margin(0.4)["delta"] == pytest.approx(0.04)
    assert label_margin(0.02)["delta"] == MARGIN_FLOOR and label_margin(0.8, margin=0.05) == {"delta": 0.05, "rule": "absolute"}
    pairs = [(0.50, 0.47), (0.31, 0.29), (0.62, 0.58), (0.44, 0.41)]
    for ceiling, delta, verdict in ((0.8, 0.08, "equivalent"), (0.2, 0.02, "more")):
        s = summarize([fake_seed(r, k, ceiling=ceiling) for r, k in pairs], margin=None)["0"]["depth"]
        assert s["margin"]["rule"] == "relative" and s["margin"]["delta"] == pytest.approx(delta)
        assert s["verdict"]["margin"] == s["conditional_verdict"]["margin"] == pytest.approx(delta)
        assert s["verdict"]["verdict"] == verdict and not s["verdict"]["both_at_floor"]


def test_nmi_intervals_stay_in_range():
    near_one = summarize([fake_seed(1.0, 0.3), fake_seed(0.9, 0.3), fake_seed(1.0, 0.3)])["0"]["depth"]["routing_nmi"]
    assert near_one["ci_high"] == 1.0 and near_one["ci_low"] < near_one["mean"]


def planted_seed(seed: int, routing: str, loud_label: bool = False) -> dict:
    """Activations with 4 loud clusters and a label in one quiet direction: k-means finds the clusters, a linear
    probe finds the label (with `loud_label`, the label is the loud cluster: both find it). `routing` is the
    label, k-means of the same activations, or random; the null routers have the routing's usage."""
    rng = np.random.default_rng(seed)
    n = 2000
    label, loud = rng.integers(0, 4, n), rng.integers(0, 4, n)
    if loud_label:
        loud = label
    acts = rng.normal(0, 0.05, (n, 8))
    acts[:, :2] += 10 * rng.normal(size=(4, 2))[loud]
    acts[:, 2] += 0.5 * label
    clusters = kmeans(acts, 4, seed)
    assignment = {"label": label, "kmeans": clusters, "random": rng.integers(0, 4, n)}[routing]
    usage = np.bincount(assignment, minlength=4)
    nulls = {"kmeans_balanced": balanced_kmeans(acts, usage, seed)[None], "random_linear": random_linear_routers(acts, usage, 3, seed)}
    scores = label_scores({"routing": assignment, "kmeans_moe": clusters, "kmeans_dense": clusters}, acts, label, 4,
                          tokens=rng.integers(0, 6, n), sequences=np.arange(n) // 10, n_permutations=50, seed=seed,
                          null_routers=nulls)
    return {"0": {"label": scores}}


@pytest.mark.parametrize("routing,verdict", [("label", "more"), ("kmeans", FLOOR), ("random", FLOOR)])
def test_planted_quiet_label_separates_routing_from_clustering(routing, verdict):
    """A label router beats k-means (and the usage-matched nulls, which miss the quiet label too); routing that is
    k-means, or random, sits with k-means at the null: both at floor, which is no evidence of equivalence."""
    seeds = [planted_seed(seed, routing)["0"] for seed in range(5)]
    s = summarize([{"0": seed} for seed in seeds], margin=None)["0"]["label"]
    assert s["kmeans_moe_nmi"]["mean"] < 0.02  # k-means misses the quiet label ...
    assert s["linear_accuracy"]["mean"] > 0.95 and s["linear_nmi"]["mean"] > 0.9  # ... which is linearly there
    assert s["margin"]["delta"] == pytest.approx(round(0.1 * s["linear_nmi"]["mean"], 3))
    assert s["kmeans_balanced_ami"]["mean"] < 0.02 and s["random_linear_ami"]["mean"] < 0.1
    for key in ("verdict", "vs_kmeans_balanced"):
        assert verdict_label(s[key]) == verdict and s[key]["both_at_floor"] == (routing != "label")
    evaluation = s["verdict"]["evaluation_se"]  # the shared evaluation batch's noise, in the primary interval:
    assert evaluation == 0 if routing == "kmeans" else 0 < evaluation < 0.05  # none in the difference of two identical assignments
    family = adjust_family([(s, "verdict")])  # after the correction, an "equivalent" at the floor still counts as not shown
    assert family["adjusted"]["more" if routing == "label" else "inconclusive"] == 1 and family["adjusted"]["equivalent"] == 0
    assert family.get("at_floor") == (None if routing == "label" else {"raw": 1, "adjusted": 1})
    assert verdict_label(s["verdict"]) == verdict
    if routing == "label":
        assert s["routing_min_nmi"] == pytest.approx(1.0) and s["routing_cnmi"]["mean"] == pytest.approx(1.0)
    if routing == "random":  # at the null, unconditionally and given the token
        routed = [seed["label"]["routing"] for seed in seeds]
        assert compare([r["nmi"] for r in routed], [r["null_nmi_mean"] for r in routed])["verdict"] == "equivalent"
        assert s["conditional_vs_null"]["verdict"] == "equivalent" and s["routing_max_p_value"] > 0.01


def test_loud_label_gives_equivalence_above_the_floor():
    """When k-means finds the label too (it is the loud cluster), a label router and k-means are equivalent, well
    above the null, so the equivalence stands (no floor flag)."""
    s = summarize([planted_seed(seed, "label", loud_label=True) for seed in range(4)], margin=None)["0"]["label"]
    assert s["kmeans_moe_nmi"]["mean"] > 0.95 and s["verdict"]["verdict"] == "equivalent" and not s["verdict"]["both_at_floor"]
    assert s["kmeans_balanced_nmi"]["mean"] > 0.95 and s["vs_kmeans_balanced"]["verdict"] == "equivalent"


def test_floor_compare_flags_scores_at_their_nulls_only():
    at_null = floor_compare([0.011, 0.012, 0.010], [0.012, 0.011, 0.011], [0.01] * 3, [0.01] * 3, 0.05)
    assert at_null["verdict"] == "inconclusive" and at_null["both_at_floor"]
    above = floor_compare([0.411, 0.412, 0.410], [0.412, 0.411, 0.411], [0.01] * 3, [0.01] * 3, 0.05)
    assert above["verdict"] == "equivalent" and not above["both_at_floor"]
    one_above = floor_compare([0.30, 0.35, 0.32], [0.012, 0.011, 0.011], [0.01] * 3, [0.01] * 3, 0.05)
    assert one_above["verdict"] == "more" and not one_above["both_at_floor"]


def test_families_put_function_labels_of_the_last_layer_first_and_correct_each_family():
    """No effect anywhere: many uncorrected one-sided verdicts at 5% per direction give directional calls; Benjamini–Hochberg
    within each family leaves almost none; the primary family is the function labels at the last MoE layer."""
    from toylab.analysis.specialization import FAMILIES, NULL_ROUTERS, PRIMARY, adjust_families, primary_labels

    task = get_task("brackets")
    rng = np.random.default_rng(1)

    def noise() -> dict:
        return compare(rng.normal(size=5), rng.normal(size=5))

    raw = adjusted = 0
    for _ in range(100):
        summary = {layer: {label: {"verdict": noise(), "conditional_verdict": noise(), "conditional_vs_null": noise(),
                                   "label_entropy_given_token": 1.0} for label in analysable_labels(task)} for layer in ("0", "1")}
        families = adjust_families(summary, {}, task)
        assert set(families) == set(FAMILIES) - {"paths", *NULL_ROUTERS}
        assert families[PRIMARY]["tests"] == len(primary_labels(task)) == 3
        assert sum(f["tests"] for f in families.values()) == 3 * 2 * len(analysable_labels(task))
        raw += any(f["raw"]["more"] + f["raw"]["less"] for f in families.values())
        adjusted += sum(f["adjusted"]["more"] + f["adjusted"]["less"] > 0 for f in families.values())
        assert all("raw_verdict" in s["verdict"] for labels in summary.values() for s in labels.values())
    assert raw >= 90 and adjusted <= 0.1 * 100 * 4  # at most about 5% of the 400 families, with room for chance


def test_activations_past_the_memory_bound_are_refused_in_one_line(monkeypatch) -> None:
    """`token_activations` collects every hook point in one forward pass, within `ACTIVATION_BYTES`."""
    from toylab.analysis import specialization as module
    from toylab.errors import ToylabError
    from toylab.models import Transformer, TransformerConfig

    task = get_task("brackets")
    model = Transformer(TransformerConfig(vocab_size=len(task.vocab), max_len=task.seq_len, d_model=16, n_heads=2, d_mlp=16, n_layers=1,
                                          ffn="moe", n_experts=2)).eval()
    batch, names = task.sample(8, 0), ["blocks.0.mlp.hook_post", "blocks.0.ln2.hook_normalized"]
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda self, *args, _f=type(model).forward: calls.append(1) or _f(self, *args))
    found = module.token_activations(model, task, batch, names)
    assert len(calls) == 2 and [found[name].shape[0] for name in names] == [int(task.positions(batch).sum())] * 2  # one sequence, then all
    monkeypatch.setattr(module, "ACTIVATION_BYTES", 1024)
    with pytest.raises(ToylabError, match=r"activations of 8 sequences at 2 hook point\(s\) would take .* GiB, above the bound") as error:
        module.token_activations(model, task, batch, names)
    assert "\n" not in str(error.value)


def test_one_layer_without_a_dense_twin_scores_as_the_full_analysis_does() -> None:
    """`specialization(dense=None, layers=...)` (what calibration reads): that layer alone, no dense control, and the
    same scores as in the full analysis of both models."""
    from toylab.analysis.specialization import specialization
    from toylab.training import build_model

    task = get_task("brackets", k=2, m=3, max_length=10)
    model = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 2}
    moe, dense = build_model(task, {**model, "ffn": "moe", "n_experts": 4}), build_model(task, model)
    batch = task.sample(60, 0)
    full = specialization(moe, dense, task, batch, 20, 0, null_draws=2)
    part = specialization(moe, None, task, batch, 20, 0, null_draws=2, layers=[1])
    assert list(full) == ["0", "1"] and list(part) == ["1"]
    for name, scores in full["1"].items():
        assert "kmeans_dense" in scores and "kmeans_dense" not in part["1"][name]
        assert repr(part["1"][name]) == repr({kind: s for kind, s in scores.items() if kind != "kmeans_dense"})
