"""Instance-batched toy models of superposition, their mixture of experts, and training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from toylab.analysis.superposition import (
    feature_dimensionality,
    feature_norms,
    features_per_dimension,
    features_represented,
    own_block_share,
)
from toylab.config import build
from toylab.errors import ToylabError
from toylab.models.superposition import (
    ToyModel,
    ToyModelConfig,
    ToyMoE,
    ToyTrainConfig,
    build_toy_model,
    train_toy_model,
)
from toylab.registry import get_task

FEATURES, HIDDEN = 6, 3


def features(batch: int, inst: int, seed: int = 0) -> torch.Tensor:
    task = get_task("superposition", n_features=FEATURES, sparsity=0.5)
    return task.generate(batch, torch.Generator().manual_seed(seed), torch.full((inst,), 0.5))[0]


def single(model: ToyModel | ToyMoE, i: int) -> ToyModel | ToyMoE:
    """Instance i of `model` as a model of its own (built from its seed)."""
    cfg = ToyModelConfig(**{**model.cfg.__dict__, "n_instances": 1})
    return build_toy_model(cfg, seeds=[model.seeds[i]])


@pytest.mark.parametrize("options", [
    {}, {"activation": "linear"}, {"n_experts": 4, "top_k": 1}, {"n_experts": 4, "top_k": 2, "load_balance_weight": 0.1},
])
def test_instance_batched_equals_instances_run_separately(options: dict) -> None:
    """Same seeds give the same weights; outputs and gradients match instance by instance."""
    cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=3, **options)
    model = build_toy_model(cfg, seeds=[7, 8, 9])
    for p in model.parameters():  # move away from the zero bias so that the ReLU matters
        p.data += 0.1 * torch.randn(p.shape)
    x = features(64, 3)
    importance = torch.rand(3, FEATURES)
    out = model(x)
    (model.loss(x, out, importance) + model.aux_loss()).sum().backward()
    for i in range(3):
        alone = single(model, i)
        with torch.no_grad():
            for p, q in zip(alone.parameters(), model.parameters()):
                p.copy_(q[i : i + 1])
        out_i = alone(x[:, i : i + 1])
        assert torch.allclose(out_i, out[:, i : i + 1], atol=1e-6)
        (alone.loss(x[:, i : i + 1], out_i, importance[i : i + 1]) + alone.aux_loss()).sum().backward()
        for p, q in zip(alone.parameters(), model.parameters()):
            assert torch.allclose(p.grad, q.grad[i : i + 1], atol=1e-6)


def test_instance_initialization_depends_only_on_its_seed() -> None:
    cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=3)
    a, b = ToyModel(cfg, seeds=[1, 2, 3]), ToyModel(cfg, seeds=[5, 2, 6])
    assert torch.equal(a.W[1], b.W[1]) and not torch.equal(a.W[0], b.W[0])


def test_dense_model_computes_relu_of_wtw() -> None:
    model = ToyModel(ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=2))
    model.b.data = torch.randn(2, FEATURES)
    x = features(16, 2)
    out, cache = model.run_with_cache(x)
    for i in range(2):
        W, b = model.W[i].detach(), model.b[i].detach()
        assert torch.allclose(cache["hook_hidden"][:, i], x[:, i] @ W.T, atol=1e-6)
        assert torch.allclose(out[:, i], torch.relu(x[:, i] @ W.T @ W + b), atol=1e-6)
    assert cache["hook_hidden"].shape == (16, 2, HIDDEN) and cache["hook_out"].shape == (16, 2, FEATURES)
    linear = ToyModel(ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, activation="linear"))
    linear.b.data = -torch.ones(1, FEATURES)
    assert (linear(x[:, :1]) < 0).any()


def test_inputs_broadcast_over_instances_and_bad_shapes_fail() -> None:
    model = ToyModel(ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=3))
    x = features(8, 1)
    assert torch.allclose(model(x), model(x.expand(-1, 3, -1)))
    with pytest.raises(ToylabError, match=r"input must be \[batch, 3 \(or 1\), 6\]"):
        model(torch.zeros(8, 2, FEATURES))
    with pytest.raises(ToylabError, match="one seed per instance"):
        ToyModel(ToyModelConfig(n_instances=3), seeds=[1])


def test_one_expert_moe_equals_dense_model() -> None:
    cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=2)
    dense, moe = ToyModel(cfg, seeds=[3, 4]), ToyMoE(cfg, seeds=[3, 4])
    assert torch.equal(moe.W[:, 0], dense.W)
    dense.b.data = moe.b.data[:, 0] = torch.randn(2, FEATURES)
    x = features(32, 2)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_the_default_top1_gate_learns_from_the_reconstruction() -> None:
    """Renormalized top-1 weights are p / p = 1: the loss sends the gate nothing; the default (softmax) trains it."""
    def gate_grad(**options: Any) -> float:
        cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_experts=4, top_k=1, **options)
        model = ToyMoE(cfg, seeds=[0])
        x = features(256, 1)
        ((model(x) - x) ** 2).mean().backward()
        return model.W_gate.grad.abs().max().item()

    assert ToyModelConfig().gate_weights == "softmax"
    assert gate_grad() > 1e-4
    assert gate_grad(gate_weights="renormalized") < 1e-8


@pytest.mark.parametrize(("top_k", "gate_weights"), [(1, "renormalized"), (1, "softmax"), (3, "renormalized"), (3, "softmax")])
def test_moe_routing_and_mixing_equal_a_per_sample_loop(top_k: int, gate_weights: str) -> None:
    E, inst = 5, 2
    cfg = ToyModelConfig(
        n_features=FEATURES, n_hidden=HIDDEN, n_instances=inst, n_experts=E, top_k=top_k, gate_weights=gate_weights
    )
    model = ToyMoE(cfg)
    model.b.data = 0.1 * torch.randn(inst, E, FEATURES)
    model.W_gate.data *= 3
    x = features(40, inst, seed=1)
    out, cache = model.run_with_cache(x)
    assert cache["hook_expert_indices"].shape == cache["hook_expert_weights"].shape == (40, inst, top_k)
    assert cache["hook_router_logits"].shape == (40, inst, E)
    assert cache["hook_hidden"].shape == (40, inst, E, HIDDEN)
    assert cache["hook_expert_out"].shape == (40, inst, E, FEATURES)
    W, b, gate = model.W.detach(), model.b.detach(), model.W_gate.detach()
    for s in range(40):
        for i in range(inst):
            probs = torch.softmax(gate[i] @ x[s, i], 0)
            chosen = cache["hook_expert_indices"][s, i]  # the top k, best first (any order among ties)
            assert torch.equal(probs[chosen], probs.sort(descending=True).values[:top_k])
            weights = probs[chosen] / (probs[chosen].sum() if top_k > 1 or gate_weights == "renormalized" else 1)
            expected = sum(w * torch.relu(W[i, e].T @ (W[i, e] @ x[s, i]) + b[i, e]) for w, e in zip(weights, chosen))
            assert torch.allclose(out[s, i], expected, atol=1e-5)
    sums = cache["hook_expert_weights"].sum(-1)
    assert torch.allclose(sums, torch.ones(40, inst)) == (top_k > 1 or gate_weights == "renormalized")


def test_load_balance_loss() -> None:
    model = ToyMoE(ToyModelConfig(n_features=FEATURES, n_instances=2, n_experts=4, top_k=2, load_balance_weight=0.5))
    uniform = torch.full((8, 2, 4), 0.25)
    spread = torch.tensor([[0, 1], [2, 3]] * 4).view(8, 1, 2).expand(8, 2, 2)
    assert torch.allclose(model.load_balance_loss(uniform, spread), torch.ones(2))
    collapsed = torch.zeros(8, 2, 4)
    collapsed[..., 0] = 1.0
    assert torch.allclose(model.load_balance_loss(collapsed, torch.tensor([0, 1]).expand(8, 2, 2)), torch.full((2,), 2.0))
    _, cache = model.run_with_cache(features(8, 2))
    probs = cache["hook_router_logits"].softmax(-1)
    assert torch.allclose(model.aux_loss(), 0.5 * model.load_balance_loss(probs, cache["hook_expert_indices"]))


def test_khot_gate_routes_each_block_to_its_expert() -> None:
    """Chaudhari et al.'s K-hot initialization: disjoint near-equal feature blocks, one per expert; a sample whose
    active features lie in one block goes to that block's expert; at k = 1 with renormalized weights (and no load
    balancing) the reconstruction gives the gate no gradient, so routing stays where the initialization put it."""
    E, n, inst = 3, 8, 2
    model = ToyMoE(ToyModelConfig(n_features=n, n_hidden=HIDDEN, n_instances=inst, n_experts=E, gate_init="khot",
                                  gate_weights="renormalized"), seeds=[0, 1])
    blocks = model.khot_blocks
    assert blocks.shape == (inst, n) and not torch.equal(blocks[0], blocks[1])  # each instance draws its own blocks
    for i in range(inst):
        assert sorted(torch.bincount(blocks[i], minlength=E).tolist()) == [2, 3, 3]
        assert torch.equal(model.W_gate.detach()[i], torch.nn.functional.one_hot(blocks[i], E).T.float())
    x = torch.zeros(n, inst, n)
    x[torch.arange(n), :, torch.arange(n)] = 1.0  # sample j: feature j alone
    _, cache = model.run_with_cache(x)
    assert torch.equal(cache["hook_expert_indices"][..., 0], blocks.T)
    model.loss(x, model(x), torch.ones(inst, n)).sum().backward()
    assert model.W_gate.grad.abs().max() < 1e-8 < model.W.grad.abs().max()  # p / p = 1: zero up to rounding
    assert ToyMoE(ToyModelConfig(n_features=n, n_experts=E), seeds=[0]).khot_blocks.eq(-1).all()  # Xavier: no blocks


def test_own_block_share_and_features_per_dimension_on_planted_weights() -> None:
    W = torch.zeros(2, 2, 4)  # 2 experts, m = 2, n = 4; expert 0 holds features 0, 1; expert 1 holds 2 and, weakly, 3
    W[0, 0, 0] = W[0, 1, 1] = W[1, 0, 2] = 1.0
    W[1, 1, 3] = 0.1
    blocks = torch.tensor([0, 0, 1, 1])
    assert own_block_share(W, blocks).tolist() == [1.0, 1.0]
    assert own_block_share(W, torch.tensor([1, 1, 0, 0])).tolist() == [0.0, 0.0]  # every feature in the other's block
    assert own_block_share(torch.zeros(2, 2, 4), blocks).isnan().all()  # nothing represented
    assert features_per_dimension(W, torch.tensor([0.5, 0.5]), top_k=1).item() == pytest.approx(0.5 * 1 + 0.5 * 1.01 / 2)
    assert features_per_dimension(W, torch.tensor([0.5, 0.5]), top_k=2).item() == pytest.approx((0.5 + 0.5 * 1.01 / 2) / 2)


@pytest.mark.parametrize(("cls", "options", "message"), [
    (ToyModelConfig, {"n_features": 3, "n_experts": 4, "gate_init": "khot"}, "needs n_experts <= n_features"),
    (ToyModelConfig, {"n_experts": 2, "top_k": 3}, "top_k must be in"),
    (ToyModelConfig, {"n_hidden": 0}, "n_hidden must be >= 1"),
    (ToyModelConfig, {"activation": "gelu"}, "valid: relu, linear"),
    (ToyTrainConfig, {"lr": -1}, "lr must be a positive number"),
    (ToyTrainConfig, {"threads": 0}, "threads must be >= 1"),
])
def test_config_errors(cls: type, options: dict, message: str) -> None:
    with pytest.raises(ToylabError, match=message):
        build(cls, options)


def test_training_is_seeded_and_validates_settings() -> None:
    task = get_task("superposition", n_features=FEATURES)
    cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=2)
    train = ToyTrainConfig(steps=30, batch_size=64, log_every=10, n_eval=256)
    threads = torch.get_num_threads()
    a = train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.1, 0.9])
    b = train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.1, 0.9])
    assert torch.equal(a.model.W, b.model.W) and np.array_equal(a.loss, b.loss)
    assert torch.get_num_threads() == threads  # training ran on train.threads and restored the setting
    assert a.history.shape == (3, 2) and a.loss.shape == (2,)
    with pytest.raises(ToylabError, match="one value per instance"):
        train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.1])
    with pytest.raises(ToylabError, match="importance must be"):
        train_toy_model(build_toy_model(cfg), task, train, importance=np.ones(3))


def test_finished_runs_are_reused(tmp_path: Path) -> None:
    task = get_task("superposition", n_features=FEATURES)
    cfg = ToyModelConfig(n_features=FEATURES, n_hidden=HIDDEN, n_instances=2, n_experts=2)
    train = ToyTrainConfig(steps=20, batch_size=32, log_every=10, n_eval=64)
    first = train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.5, 0.9], run_dir=tmp_path)
    final = json.loads((tmp_path / "final.json").read_text())
    (tmp_path / "final.json").write_text(json.dumps({**final, "loss": [7.0, 7.0]}))  # marks the stored run
    again = train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.5, 0.9], run_dir=tmp_path)
    assert again.loss.tolist() == [7.0, 7.0] and torch.equal(again.model.W, first.model.W)
    assert np.array_equal(again.history, first.history)
    other = train_toy_model(build_toy_model(cfg), task, train, sparsity=[0.5, 0.8], run_dir=tmp_path)
    assert other.loss.tolist() != [7.0, 7.0]


def test_training_finds_the_paper_s_planted_geometry() -> None:
    """n=20, m=5, I_i=0.7^i: dense features give the 5 most important orthogonally; sparse ones superpose."""
    task = get_task("superposition")
    sparsity = [0.0] * 3 + [0.99] * 3
    model = build_toy_model(ToyModelConfig(n_instances=len(sparsity)), seeds=range(6))
    result = train_toy_model(model, task, ToyTrainConfig(steps=2500, batch_size=256, lr=1e-2), sparsity=sparsity)
    W = result.model.W.detach()
    norms, D = feature_norms(W), feature_dimensionality(W)
    dense, sparse = slice(0, 3), slice(3, 6)
    assert (norms[dense, :5] > 0.9).all() and (norms[dense, 5:] < 0.5).all()
    assert (D[dense, :5] > 0.9).all()
    assert (features_represented(W[sparse]) >= 8).all()
    assert ((D[sparse] - 0.5).abs() < 0.1).sum(-1).min() >= 4  # antipodal pairs
    assert (result.history[-1] < result.history[0]).all()
