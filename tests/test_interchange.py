"""Interchange interventions and DAS on a planted model, whose variable V lives in a known 2-D subspace of its hook
point, and known answers on a real transformer."""

import math

import pytest
import torch
from torch import nn

from toylab import get_task
from toylab.analysis.interchange import (
    Pairs,
    Subspace,
    das_analysis,
    fit_das,
    interchange_accuracy,
    interchange_logits,
)
from toylab.determinism import torch_threads
from toylab.errors import ToylabError
from toylab.models.hooks import HookedModule, HookPoint
from toylab.training import build_model

D, VOCAB, N_V, POS = 16, 12, 3, 4
STEPS = 100
CHANCE = 1 / N_V
"""IIA of guessing V uniformly at random. On informative positions an intervention that changes nothing scores 0,
below it; an intervention that scrambles V scores about this."""


class Planted(HookedModule):
    """Token t carries V = t % 3, written as a point on a circle in a random 2-D subspace `v_plane` of `hook_mid`, and
    W = t // 3, written as a random code in the orthogonal 14 dims; the readout reads V's plane only (class = V)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        rotation = torch.linalg.qr(torch.randn(D, D, generator=generator)).Q
        self.v_plane, w_dims = rotation[:, :2], rotation[:, 2:]
        angles = 2 * math.pi * torch.arange(N_V) / N_V
        circle = torch.stack([angles.cos(), angles.sin()], -1)  # [3, 2]
        w_codes = torch.randn(VOCAB // N_V, D - 2, generator=generator)
        tokens = torch.arange(VOCAB)
        self.embed = nn.Embedding.from_pretrained(circle[tokens % N_V] @ self.v_plane.T + w_codes[tokens // N_V] @ w_dims.T,
                                                  freeze=False)
        self.readout = nn.Linear(D, N_V, bias=False)
        with torch.no_grad():
            self.readout.weight.copy_(circle @ self.v_plane.T)
        self.hook_mid = HookPoint()  # [batch, pos, D]
        self.setup_hooks()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hook_mid(self.embed(tokens)))


def v_pairs(combos: torch.Tensor, n: int, seed: int) -> Pairs:
    """`n` sequences of pairs, each position's (base token, source token) drawn from `combos` (ids base * VOCAB + source);
    the counterfactual target is the source's V."""
    drawn = combos[torch.randint(len(combos), (n, POS), generator=torch.Generator().manual_seed(seed))]
    base, source = drawn // VOCAB, drawn % VOCAB
    return Pairs((base,), (source,), source % N_V, torch.ones(n, POS, dtype=torch.bool), base_targets=base % N_V)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is many times faster than several on a busy CPU."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted()


@pytest.fixture(scope="module")
def splits() -> tuple[Pairs, Pairs]:
    """Training and test pairs over disjoint (base token, source token) combinations (positions are independent)."""
    combos = torch.randperm(VOCAB * VOCAB, generator=torch.Generator().manual_seed(1))
    return v_pairs(combos[:108], 256, 2), v_pairs(combos[108:], 128, 3)


@pytest.fixture(scope="module")
def analysis(planted, splits) -> dict:
    return das_analysis(planted, "hook_mid", *splits, rank=2, steps=STEPS, seed=0)


def test_das_and_the_full_swap_find_the_planted_variable_and_a_random_subspace_does_not(analysis) -> None:
    assert analysis["full"]["iia"] == analysis["full"]["iia_all"] == 1
    assert analysis["das"]["iia"] >= 0.95
    assert analysis["random"]["iia"] <= CHANCE + 0.05
    assert analysis["none"]["iia"] == 0 and analysis["none"]["iia_all"] == pytest.approx(1 / 3, abs=0.1)
    assert {arm["n_all"] for arm in analysis.values() if isinstance(arm, dict)} == {128 * POS}
    assert 0.5 * 128 * POS < analysis["das"]["n"] < 128 * POS  # about 2/3 of the positions change V


def test_one_direction_is_not_enough_for_a_three_valued_variable_on_a_circle(planted, splits) -> None:
    train, test = splits
    found = das_analysis(planted, "hook_mid", train, {"test": test, "train": train}, rank=1, steps=STEPS, seed=0)
    assert found["test"]["das"]["iia"] < 0.75 and found["test"]["full"]["iia"] == 1
    assert found["train"]["das"]["n_all"] == 256 * POS  # one fit, scored on every set named


def test_a_das_subspace_is_orthonormal_reproducible_and_spans_the_planted_plane(planted, splits) -> None:
    train = splits[0]
    fit = [fit_das(planted, "hook_mid", train.base, train.source, train.targets, train.mask, rank=2, steps=steps, seed=seed)
           for seed, steps in ((0, STEPS), (1, 20), (1, 20))]
    q = fit[0].basis.detach()
    assert torch.allclose(q.T @ q, torch.eye(2), atol=1e-5)
    assert (q.T @ planted.v_plane).square().sum() / 2 > 0.9  # mean squared cosine of the principal angles
    assert torch.equal(fit[1].basis, fit[2].basis) and not torch.equal(fit[1].basis, Subspace(D, 2, seed=1).basis)
    assert planted.training and all(p.requires_grad for p in planted.parameters())  # frozen only while fitting


def test_interventions_touch_only_the_subspace_and_the_positions_asked(planted, splits) -> None:
    test = splits[1]
    base_acts = planted.embed(test.base[0]).detach()
    within = Subspace.from_basis(planted.v_plane)  # V's plane exactly: swaps V and nothing else
    with torch.no_grad():
        logits = interchange_logits(planted, "hook_mid", test.base, test.source, within)
        assert interchange_accuracy(logits, test.targets, test.mask, test.base_targets)["iia"] == 1
        positions = torch.zeros(len(test.targets), POS, dtype=torch.bool)
        positions[:, 0] = True
        partial = interchange_logits(planted, "hook_mid", test.base, test.source, None, positions)
    assert torch.equal(partial[:, 1:], planted.readout(base_acts)[:, 1:])
    assert (partial[:, 0].argmax(-1) == test.targets[:, 0]).all()


def test_interchange_accuracy_counts_informative_positions() -> None:
    logits = torch.eye(3)[torch.tensor([[0, 1, 2], [2, 2, 0]])]  # argmax [[0, 1, 2], [2, 2, 0]]
    targets, base_targets = torch.tensor([[0, 1, 1], [2, 0, 0]]), torch.tensor([[0, 2, 1], [1, 0, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert interchange_accuracy(logits, targets, mask) == {"iia": 0.6, "n": 5, "iia_all": 0.6, "n_all": 5}
    assert interchange_accuracy(logits, targets, mask, base_targets) == {"iia": 1.0, "n": 2, "iia_all": 0.6, "n_all": 5}
    assert math.isnan(interchange_accuracy(logits, targets, mask, targets)["iia"])


@pytest.mark.parametrize("rank", [0, 17])
def test_a_rank_outside_1_to_d_is_refused(planted, splits, rank) -> None:
    train = splits[0]
    with pytest.raises(ToylabError, match=rf"^rank must be in \[1, d=16\] \(got {rank}\)$"):
        fit_das(planted, "hook_mid", train.base, train.source, train.targets, train.mask, rank=rank, steps=1)


def test_an_unknown_site_is_refused(planted, splits) -> None:
    train = splits[0]
    with pytest.raises(ToylabError, match="no hook point matches 'hook_nope'"):
        fit_das(planted, "hook_nope", train.base, train.source, train.targets, train.mask, rank=2, steps=1)


@pytest.fixture(scope="module")
def transformer() -> tuple[nn.Module, torch.Tensor]:
    """An untrained two-layer MoE transformer and a batch of `modes` sequences."""
    task = get_task("modes")
    torch.manual_seed(0)
    model = build_model(task, {"d_model": 16, "n_heads": 2, "d_mlp": 32, "ffn": "moe", "n_experts": 4}).eval()
    return model, torch.as_tensor(task.sample(8, 0).inputs)


def test_known_answers_on_a_transformer(transformer) -> None:
    """The last residual site is all the readout reads: swapping it gives the source's logits, exactly."""
    model, tokens = transformer
    base, source = tokens[:4], tokens[4:]
    site = "blocks.1.hook_resid_post"
    with torch.no_grad():
        assert torch.equal(interchange_logits(model, site, (base,), (base,)), model(base))
        assert torch.equal(interchange_logits(model, site, (base,), (base,), Subspace(16, 3)), model(base))
        assert torch.equal(interchange_logits(model, site, (base,), (source,)), model(source))
        with pytest.raises(ToylabError, match=r"shape \[4, \d+, \d+, 16\]; interchange needs \[batch, pos, d\]"):
            interchange_logits(model, "blocks.1.mlp.hook_expert_out", (base,), (source,))
