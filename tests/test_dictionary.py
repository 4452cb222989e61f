"""Dictionary learning on planted features: SAE and Switch SAE recover known directions, find nothing in
noise, and every score is checked against a known answer."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, r2_score

from toylab.analysis.dictionary import (
    assignment_codes,
    chance_mean_max_cosine,
    code_rsa,
    cosines,
    detection_f1,
    expert_codes,
    label_detection,
    matched_cosine,
    mean_max_cosine,
    sparsity_stats,
    variance_explained,
)
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


@pytest.mark.slow
def test_dictionaries_study_runs_end_to_end(tmp_path) -> None:
    from toylab.study import run_study

    outcome = run_study("dictionaries", {"seeds": 2}, tmp_path, fast=True, progress=False)
    results = outcome.results
    assert {"planted", "tokens"} <= set(results) and (outcome.directory / "report.md").is_file()
    point = results["planted"]["grid"][0]
    assert point["switch_vs_sae_mmcs"]["verdict"] in ("more", "less", "equivalent", "inconclusive")
    assert all(0 <= point[m]["mmcs"]["mean"] <= 1 for m in ("sae", "switch"))
    rsa = results["tokens"]["rsa"]
    assert set(rsa["seed_to_seed"]) == {"sae", "switch", "onehot", "router"}
    for pair in ("sae-switch", "sae-onehot", "switch-router"):
        assert -1 <= rsa[pair]["rsa"]["mean"] <= 1 and {"vs_shuffled", f"vs_{pair.split('-')[0]}_seeds"} <= set(rsa[pair])
