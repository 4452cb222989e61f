"""Dictionary learning on planted features: SAE and Switch SAE recover known directions, find nothing in
noise, and every score is checked against a known answer."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, r2_score

from toylab.analysis.dictionary import (
    PRIMARY,
    adjust_families,
    assignment_codes,
    chance_mean_max_cosine,
    code_rsa,
    cosines,
    detection_f1,
    expert_codes,
    label_detection,
    matched_cosine,
    matched_label_detection,
    mean_max_cosine,
    sparsity_stats,
    summarize_detection,
    summarize_rsa,
    variance_explained,
)
from toylab.analysis.stats import compare
from toylab.config import build
from toylab.errors import ToylabError
from toylab.models.sae import SAEConfig, SAETrainConfig, SparseAutoencoder, encode, train_sae

N_TRUE, D = 24, 16


def planted(n: int = 20000, density: float = 0.06, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse non-negative combinations of 24 known unit directions in 16 dimensions: (x, directions, active).

    The seed differs from the SAEs' initialization seeds, whose first draws would otherwise be these directions.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(N_TRUE, D, generator=generator), dim=-1)
    active = torch.rand(n, N_TRUE, generator=generator) < density
    return (torch.rand(n, N_TRUE, generator=generator) * active) @ directions, directions, active


def test_matching_is_the_best_one_to_one_assignment() -> None:
    cos = np.random.default_rng(0).uniform(-1, 1, (5, 6))
    best = max(sum(cos[i, p[i]] for i in range(5)) for p in itertools.permutations(range(6), 5)) / 5
    score, match = matched_cosine(cos)
    assert score == pytest.approx(best) and len(set(match)) == 5
    assert mean_max_cosine(cos) == pytest.approx(cos.max(1).mean())
    assert mean_max_cosine(cos) >= score


def test_cosines_and_scores_against_known_answers() -> None:
    assert cosines([[1, 0], [0, 2]], [[0, 3], [1, 1]]) == pytest.approx(np.array([[0, 2 ** -0.5], [1, 2 ** -0.5]]))
    rng = np.random.default_rng(1)
    active, codes = rng.random((500, 3)) < 0.3, rng.random((500, 4)) * (rng.random((500, 4)) < 0.4)
    expected = [[f1_score(active[:, f], codes[:, l] > 0) for l in range(4)] for f in range(3)]
    assert detection_f1(active, codes) == pytest.approx(np.array(expected))
    x, r = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
    assert variance_explained(x, r) == pytest.approx(r2_score(x, r, multioutput="variance_weighted"))
    stats = sparsity_stats(np.array([[1.0, 0, 0], [2.0, 3.0, 0]]))
    assert stats == {"l0": 1.5, "dead": pytest.approx(1 / 3), "dense": pytest.approx(2 / 3)}


@pytest.mark.parametrize(("n_experts", "activation"), [(1, "relu"), (1, "topk"), (4, "relu"), (4, "topk")])
def test_sae_and_switch_sae_recover_planted_directions(n_experts: int, activation: str) -> None:
    x, directions, active = planted()
    cfg = SAEConfig(d_in=D, n_latents=32, n_instances=2, n_experts=n_experts, activation=activation, k=2)
    sae = train_sae(SparseAutoencoder(cfg, seeds=[0, 1]), x, SAETrainConfig(steps=1500), l1=0.01 if activation == "relu" else 0.0)
    codes, out = encode(sae, x)
    for i in range(2):
        learned = sae.decoder()[i].detach()
        assert mean_max_cosine(cosines(directions, learned)) >= 0.9 > chance_mean_max_cosine(learned, N_TRUE) + 0.2
        assert variance_explained(x, out[:, i]) > 0.7
        best_f1 = detection_f1(active.numpy(), codes[:, i].numpy()).max(1)
        shuffled = active.numpy()[np.random.default_rng(i).permutation(len(x))]  # the null: activity unrelated to x
        assert np.median(best_f1) > max(0.4, 3 * np.median(detection_f1(shuffled, codes[:, i].numpy()).max(1)))
    if activation == "topk":
        assert ((codes > 0).sum(-1) <= 2).all()


def test_on_noise_a_dictionary_finds_nothing_planted() -> None:
    x = torch.randn(20000, D, generator=torch.Generator().manual_seed(3))  # isotropic: no direction is special
    _, directions, _ = planted()
    sae = train_sae(SparseAutoencoder(SAEConfig(d_in=D, n_latents=32)), x, SAETrainConfig(steps=1500), l1=0.01)
    learned = sae.decoder()[0].detach()
    assert abs(mean_max_cosine(cosines(directions, learned)) - chance_mean_max_cosine(learned, N_TRUE)) < 0.05


def test_switch_sae_routing_shapes_and_load_balance() -> None:
    x, _, _ = planted(n=4000)
    cfg = SAEConfig(d_in=D, n_latents=32, n_instances=3, n_experts=4, load_balance_weight=0.05)
    sae = train_sae(SparseAutoencoder(cfg), x, SAETrainConfig(steps=800), l1=0.01)
    out, cache = sae.run_with_cache(x[:1000])
    assert out.shape == (1000, 3, D) and cache["hook_latents"].shape == (1000, 3, 32)
    assert cache["hook_expert_indices"].shape == (1000, 3) and cache["hook_router_probs"].shape == (1000, 3, 4)
    chosen = cache["hook_expert_indices"]
    owner = torch.arange(32) // 8  # latents of expert e are e*8 .. e*8+7
    fired = cache["hook_latents"] > 0
    assert not (fired & (owner != chosen.unsqueeze(-1))).any()  # only the chosen expert's latents fire
    usage = torch.stack([torch.bincount(chosen[:, i], minlength=4) for i in range(3)]).float() / 1000
    assert (usage > 0.05).all(), usage  # load balancing keeps every expert in use
    assert torch.allclose(sae.decoder().norm(dim=-1), torch.ones(3, 32))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"d_in": 8, "n_latents": 30, "n_experts": 4}, "divisible"), ({"d_in": 8, "n_latents": 8, "activation": "topk", "k": 9}, "k=9"),
     ({"d_in": 0, "n_latents": 8}, "d_in"), ({"d_in": 8, "n_latents": 8, "activation": "gelu"}, "valid: relu, topk")],
)
def test_bad_sae_configs_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(ToylabError, match=message):
        build(SAEConfig, options)


def test_expert_neurons_form_one_dictionary() -> None:
    neurons = np.arange(12, dtype=np.float32).reshape(3, 2, 2)  # 3 tokens, k=2 experts each, 2 neurons
    experts = np.array([[0, 2], [1, 0], [2, 1]])
    codes = expert_codes(neurons, experts, n_experts=3)
    assert codes.shape == (3, 6)
    assert codes[0].tolist() == [0, 1, 0, 0, 2, 3] and codes[1].tolist() == [6, 7, 4, 5, 0, 0]


def test_label_detection_finds_a_planted_class_detector() -> None:
    label = np.random.default_rng(0).integers(0, 3, 1000)
    perfect = np.stack([(label == c).astype(float) for c in range(3)], 1)
    assert label_detection(perfect, label) == pytest.approx(1.0)
    assert label_detection(np.random.default_rng(1).random((1000, 3)) - 0.5, label) < 0.6


def test_code_rsa_is_one_for_the_same_code_and_near_zero_without_correspondence() -> None:
    rng = np.random.default_rng(0)
    codes = np.maximum(rng.normal(size=(300, 12)), 0)  # sparse non-negative, like SAE latents
    same = code_rsa(codes, 3 * codes[:, rng.permutation(12)], seed=0)  # rescaled, latents reordered: same geometry
    assert same["rsa"] == pytest.approx(1.0) and abs(same["shuffled"]) < 0.05
    independent = code_rsa(codes, np.maximum(rng.normal(size=(300, 5)), 0), seed=0)
    assert abs(independent["rsa"]) < 0.05 and abs(independent["shuffled"]) < 0.05
    routing = assignment_codes(np.array([[0], [2], [-1]]), np.log([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]]))
    assert routing["onehot"].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]  # an empty slot (-1) marks nothing
    assert np.allclose(routing["router"], [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]])
    tokens = rng.integers(0, 4, 300)  # an expert assignment that is a function of a code's cluster
    clustered = np.eye(4)[tokens] + 0.05 * rng.normal(size=(300, 4))
    assert code_rsa(clustered, assignment_codes(tokens[:, None], np.zeros((300, 4)))["onehot"], seed=0)["rsa"] > 0.5


def seed_codes(x: np.ndarray, init: int) -> np.ndarray:
    """A sparse code of activations `x` as a dictionary fit with seed `init` gives: ReLU of 128 seed-specific directions."""
    return np.maximum(x @ np.random.default_rng(init).normal(size=(x.shape[1], 128)), 0)


def test_rsa_reference_is_two_seeds_of_one_dictionary_on_the_same_activations() -> None:
    """SAE and Switch SAE codes drawn like two seeds of one dictionary of each model's activations agree as much as
    the reference says, not more; a reference across models (different activations) would call them "more"."""
    per_seed = []
    for seed in range(5):  # each seed: another model, so other activations
        x = np.random.default_rng(100 + seed).normal(size=(300, 8))
        per_seed.append({name: seed_codes(x, 10 * seed + i) for i, name in enumerate(("sae", "switch", "sae_reseed", "switch_reseed"))})
    references = {"sae": "sae_reseed", "switch": "switch_reseed"}
    summary = summarize_rsa(per_seed, [("sae", "switch")], references, margin=0.05)
    same = [code_rsa(c["sae"], c["sae_reseed"], s)["rsa"] for s, c in enumerate(per_seed)]
    assert summary["reference"]["sae"]["mean"] == pytest.approx(np.mean(same))
    pair = summary["sae-switch"]
    assert pair["vs_sae_reference"]["verdict"] == pair["vs_switch_reference"]["verdict"] == "equivalent"
    across_models = [code_rsa(per_seed[s]["sae"], per_seed[(s + 1) % 5]["sae"], s)["rsa"] for s in range(5)]
    assert max(np.abs(across_models)) < 0.2 < min(pair["per_seed"])  # the confounded reference sits far below the pair
    identical = [{**c, "switch": c["sae"]} for c in per_seed]  # the Switch SAE is the SAE: never less than its reference
    assert summarize_rsa(identical, [("sae", "switch")], references, margin=0.05)["sae-switch"]["vs_sae_reference"]["verdict"] == "more"
    families = adjust_families([], summary)  # corrected in place: the pair vs shuffled, and vs each code's reference
    assert {name: f["tests"] for name, f in families.items()} == {"RSA vs shuffled": 1, "RSA vs reference": 2}
    assert pair["vs_sae_reference"]["family_size"] == 2 and pair["vs_shuffled"]["verdict"] == "more"


def test_dictionaries_of_two_seeds_are_fit_on_the_same_activations() -> None:
    from toylab.studies.dictionaries import RESEED, DictionariesConfig, fit_tokens

    rng = np.random.default_rng(0)
    resid, resid_eval = rng.normal(size=(400, 8)).astype(np.float32), rng.normal(size=(120, 8)).astype(np.float32)
    cfg = DictionariesConfig(seeds=2, token_size=8, n_experts=4, sae_train=SAETrainConfig(steps=20, batch_size=64))
    experts = np.maximum(rng.normal(size=(120, 16)), 0)
    fitted = fit_tokens(3, resid, resid_eval, experts, {"a": rng.integers(0, 3, 120)}, np.arange(50), cfg)
    assert set(fitted["codes"]) == {"sae", "switch", "sae_reseed", "switch_reseed"}
    for method, n_experts in (("sae", 1), ("switch", 4)):
        sae_cfg = SAEConfig(d_in=8, n_latents=8, n_experts=n_experts)
        refit = train_sae(SparseAutoencoder(sae_cfg, [3 + RESEED]), resid, SAETrainConfig(steps=20, batch_size=64, seed=3 + RESEED), cfg.token_l1)
        np.testing.assert_allclose(fitted["codes"][f"{method}_reseed"], encode(refit, resid_eval[:50])[0][:, 0].numpy(), atol=1e-6)
        assert not np.allclose(fitted["codes"][method], fitted["codes"][f"{method}_reseed"])
    assert fitted["detection"]["a"]["latents"] == 8


def test_label_detection_gives_every_code_the_same_latent_count_and_its_own_null() -> None:
    """Codes with no signal: 8 latents and 128 latents of the same kind score alike once both get 8 candidates,
    while the best of all 128 would look better; each code sits at its own null."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, 2000)
    codes = {"small": np.maximum(rng.normal(size=(2000, 8)), 0), "large": np.maximum(rng.normal(size=(2000, 128)), 0) * (rng.random((2000, 128)) < 0.3)}
    codes["small"] *= rng.random((2000, 8)) < 0.3
    per_seed = [matched_label_detection(codes, label, seed) for seed in range(4)]
    assert {s["latents"] for s in per_seed} == {8}
    assert label_detection(codes["large"], label) > label_detection(codes["small"], label) + 0.01  # unmatched: more candidates win
    summary = summarize_detection(per_seed, ["small", "large"], "small", margin=0.05)
    assert summary["latents"] == 8 and summary["large"]["vs_small"]["verdict"] == "equivalent"
    for name in codes:
        assert summary[name]["vs_null"]["verdict"] == "equivalent"
        assert abs(summary[name]["f1"]["mean"] - summary[name]["null"]["mean"]) < 0.02
    perfect = {**codes, "detector": np.eye(4)[label]}  # a code that holds the label beats its own null
    detected = summarize_detection([matched_label_detection(perfect, label, s) for s in range(3)], list(perfect), "small", 0.05)
    assert detected["detector"]["f1"]["mean"] == pytest.approx(1.0) and detected["detector"]["vs_small"]["verdict"] == "more"
    assert detected["latents"] == 4


def planted_grid(switch_gain: float, seeds: int, rng: np.random.Generator) -> list[dict]:
    """The study's planted-feature summary of per-seed scores drawn around known means: the Switch SAE's MMCS is the
    SAE's plus `switch_gain`, at each of 4 (size, L1) points; every other score is noise."""
    from toylab.studies.dictionaries import SCORES, Dictionaries, DictionariesConfig

    study = Dictionaries(DictionariesConfig(seeds=seeds, sizes=(20, 40), l1=(0.01, 0.03), token_task=None))
    per_seed = []
    for _ in range(seeds):
        seed: dict = {"kmeans_group_nmi": rng.uniform(0.3, 0.5)}
        for size in (20, 40):
            sae = [{score: rng.uniform(0, 0.2) for score in SCORES} | {"mmcs": 0.7 + rng.normal(0, 0.05)} for _ in range(2)]
            switch = [{score: rng.uniform(0, 0.2) for score in SCORES} | {"mmcs": r["mmcs"] + switch_gain + rng.normal(0, 0.03),
                                                                           "router_group_nmi": rng.uniform(0.3, 0.5)} for r in sae]
            seed |= {f"sae-{size}": sae, f"switch-{size}": switch}
        per_seed.append(seed)
    return study.summarize_planted(per_seed)["grid"]


def test_the_primary_family_finds_a_planted_gain_and_no_direction_in_a_null() -> None:
    """A Switch SAE better by 0.2 MMCS in every seed is "more" at every point after the correction; with no difference
    anywhere, the chance of any "more" or "less" in the family stays near 5% (BH over the 4 points; 100 simulated grids)."""
    rng = np.random.default_rng(0)
    grid = planted_grid(0.2, 4, rng)
    families = adjust_families(grid)
    assert list(families) == [PRIMARY, "router vs k-means"] and families[PRIMARY]["tests"] == 4
    assert families[PRIMARY]["adjusted"]["more"] == 4 and all("p_adjusted" in p["switch_vs_sae_mmcs"] for p in grid)
    assert planted_grid(0.2, 2, rng)[0]["switch_vs_sae_mmcs"]["too_few_seeds"]  # two seeds: no verdict
    def null_point() -> dict:
        sae = rng.normal(0.7, 0.05, 4)
        return {key: compare(sae + rng.normal(0, 0.03, 4), sae, 0.05) for key in ("switch_vs_sae_mmcs", "router_vs_kmeans")}

    false = [adjust_families([null_point() for _ in range(4)])[PRIMARY]["adjusted"] for _ in range(100)]
    assert np.mean([f["more"] + f["less"] > 0 for f in false]) <= 0.1


def test_planted_score_intervals_stay_in_their_range() -> None:
    """L0 near 0 and shares near 1 keep their intervals in range; variance explained may be negative, so its interval may too."""
    from toylab.studies.dictionaries import SCORES, Dictionaries, DictionariesConfig

    study = Dictionaries(DictionariesConfig(seeds=3, sizes=(20,), l1=(0.01,), token_task=None))
    rows = [{score: 0.5 for score in SCORES} | {"l0": l0, "dead": dead, "variance_explained": ve, "router_group_nmi": 0.5}
            for l0, dead, ve in ((0.0, 1.0, -0.3), (0.02, 0.9, -0.2), (0.4, 1.0, -0.25))]
    point = study.summarize_planted([{"sae-20": [r], "switch-20": [r], "kmeans_group_nmi": 0.5} for r in rows])["grid"][0]["sae"]
    assert point["l0"]["ci_low"] == 0.0 < point["l0"]["ci_high"] and point["dead"]["ci_high"] == 1.0 > point["dead"]["ci_low"]
    assert point["variance_explained"]["ci_low"] < point["variance_explained"]["mean"] < 0


@pytest.mark.slow
def test_dictionaries_study_runs_end_to_end(tmp_path) -> None:
    from toylab.study import run_study

    outcome = run_study("dictionaries", {"seeds": 2}, tmp_path, fast=True, progress=False)
    results = outcome.results
    assert {"planted", "tokens"} <= set(results) and (outcome.directory / "report.md").is_file()
    point = results["planted"]["grid"][0]
    assert point["switch_vs_sae_mmcs"]["too_few_seeds"] and point["switch_vs_sae_mmcs"]["verdict"] == "inconclusive"
    assert next(iter(results["test_families"])) == PRIMARY and results["test_families"][PRIMARY]["tests"] == len(results["planted"]["grid"])
    assert "Primary question and families of tests" in (outcome.directory / "report.md").read_text()
    assert all(point[m]["mmcs"]["mean"] > point[m]["mmcs_null"]["mean"] + 0.2 for m in ("sae", "switch"))  # planted features found
    tokens = results["tokens"]
    assert set(tokens["rsa"]["reference"]) == {"sae", "switch"}
    for pair in ("sae-switch", "sae-onehot", "switch-router"):
        assert {"vs_shuffled", f"vs_{pair.split('-')[0]}_reference"} <= set(tokens["rsa"][pair])
    for summary in tokens["labels"].values():
        assert {"null", "vs_null"} <= set(summary["experts"]) and "vs_sae" in summary["switch"]
