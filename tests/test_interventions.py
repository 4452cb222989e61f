"""Causal interventions on routing, planted: a label-routed MoE on `modes` (mode c -> expert c at every layer), where
forcing, swapping, patching and ablating experts must hurt exactly the modes whose experts they touch; known-answer
checks of the hooks on an untrained top-2 model."""

import numpy as np
import pytest
import torch

from toylab import get_task
from toylab.analysis.interventions import (
    ABLATIONS,
    EXPERT_OUT,
    MLP_OUT,
    WEIGHTS,
    class_effects,
    expert_output,
    expert_output_patch_hooks,
    force_routing_hooks,
    patching_effect,
    resample_expert_hooks,
    routing_patch_hooks,
    run_args,
    swap_experts_hooks,
)
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT
from toylab.errors import ToylabError
from toylab.models import Transformer, TransformerConfig
from toylab.training import TrainConfig, train

OPTIONS = {"d_model": 32, "n_heads": 2, "d_mlp": 64, "n_layers": 2, "ffn": "moe", "n_experts": 4, "router": "label", "router_label": "mode"}
N_MODES = 4
LARGE = 0.5
"""A large drop of a mode's sequence accuracy (measured: at least 0.59 for forcing, 0.76 for swaps, 0.96 for ablations)."""
SPARED = 0.01


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The label-routed MoE trained on `modes` (lists of 3), a held-out batch and its run arguments."""
    task = get_task("modes", length=3)
    cfg = TrainConfig(steps=400, n_train=2000, n_val=100, eval_every=400, batch_size=64, lr=3e-3, seed=0)
    run = train(task, OPTIONS, cfg, tmp_path_factory.mktemp("m") / "run", progress=False)
    batch = task.sample_split(400, 1, "heldout")
    return run, task, batch, run_args(run.model, batch)


@pytest.fixture(scope="module")
def top2():
    """An untrained learned top-2 MoE with a shared expert (hooks must work beyond the top-1 label router)."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=12, max_len=8, d_model=16, n_heads=2, d_mlp=32, ffn="moe", n_experts=4,
                                          top_k=2, shared_experts=1)).eval()
    tokens = torch.randint(12, (6, 8))
    return model, (tokens, None), (tokens.roll(1, 0), None)


def changes(model, task, batch, hooks) -> dict[str, float]:
    return {name: effect["change"] for name, effect in class_effects(model, task, batch, hooks, "mode").items()}


def only_hurts(change: dict[str, float], hurt: set[str]) -> None:
    for name, delta in change.items():
        assert (delta <= -LARGE) if name in hurt else (abs(delta) <= SPARED), (name, change)


def test_planted_model_is_near_perfect(planted):
    run, task, batch, _ = planted
    assert run.metrics["sequence_accuracy"] >= 0.99
    effects = class_effects(run.model, task, batch, [], "mode")
    assert set(effects) == set(task.rules)
    assert all(e["clean"] >= 0.98 and e["change"] == 0 and e["accuracy_clean"] >= 0.99 for e in effects.values()), effects
    assert sum(e["sequences"] for e in effects.values()) == len(batch)
    assert sum(e["tokens"] for e in effects.values()) == batch.loss_mask.sum()


def test_forcing_a_modes_tokens_to_another_expert_breaks_only_that_mode(planted):
    run, task, batch, _ = planted
    mode = torch.from_numpy(batch.labels["mode"])
    for c, name in enumerate(task.rules):
        for other in set(range(N_MODES)) - {c}:
            only_hurts(changes(run.model, task, batch, force_routing_hooks(None, mode == c, other, N_MODES)), {name})


def test_class_effects_against_a_direct_count(planted):
    run, task, batch, args = planted
    mode = torch.from_numpy(batch.labels["mode"])
    hooks = force_routing_hooks(None, mode == 1, 2, N_MODES)
    correct = (run.model.run_with_hooks(*args, fwd_hooks=hooks).argmax(-1) == torch.from_numpy(batch.targets)).numpy()
    effects = class_effects(run.model, task, batch, hooks, "mode")
    for c, name in enumerate(task.rules):
        rows, scored = batch.labels["mode"][:, 0] == c, batch.loss_mask & (batch.labels["mode"] == c)
        assert effects[name]["sequences"] == rows.sum() and effects[name]["tokens"] == scored.sum()
        assert effects[name]["intervened"] == pytest.approx((correct | ~batch.loss_mask)[rows].all(1).mean())
        assert effects[name]["accuracy_intervened"] == pytest.approx(correct[scored].mean())
    assert 0 < effects["reverse"]["intervened"] < effects["reverse"]["accuracy_intervened"] < 1


def test_forcing_each_token_to_its_own_expert_changes_nothing(planted):
    run, _, batch, args = planted
    clean = run.model(*args)
    mode = torch.from_numpy(batch.labels["mode"])
    for c in range(N_MODES):
        assert torch.equal(run.model.run_with_hooks(*args, fwd_hooks=force_routing_hooks([0, 1], mode == c, c, N_MODES)), clean)
    assert torch.equal(run.model.run_with_hooks(*args, fwd_hooks=swap_experts_hooks(None, 2, 2, N_MODES)), clean)


def test_swapping_two_experts_hurts_exactly_their_modes(planted):
    run, task, batch, _ = planted
    for a, b in ((0, 1), (2, 3), (1, 3)):
        only_hurts(changes(run.model, task, batch, swap_experts_hooks(None, a, b, N_MODES)), {task.rules[a], task.rules[b]})


def test_router_patching_carries_most_of_a_mode_interchange(planted):
    """Measured (seed 0, 300 held-out pairs, 501 informative positions): the base run predicts the counterfactual
    nowhere (0.0); with the source's routing at both layers, 0.72 of the informative positions (0.71-0.83 over training
    seeds 0-2); with the source's mode token as well (its embedding), 0.96; the mode token alone, 0.07. So routing
    carries most of the mode, and the residual stream (the base's mode token, read by attention) the rest. Patching
    the expert outputs with the base's routing recovers 0.13 (it keeps the base's experts, whose rule is the base's)."""
    run, task, _, _ = planted
    model, pairs = run.model, task.counterfactuals(300, 2, "mode")
    router = patching_effect(model, pairs, lambda base, source: routing_patch_hooks(model, source))
    assert router["base"] <= 0.01 and router["n"] > 300
    assert router["recovered"] >= 0.6 and router["kept"] <= 0.2, router

    def with_mode_token(base, source):
        _, cache = model.run_with_cache(*source, names=["hook_embed"])
        token = cache["hook_embed"][:, 1]  # the mode token: <bos> <rule> x1..xL -> ...
        return routing_patch_hooks(model, source) + [("hook_embed", lambda x, hook: torch.cat([x[:, :1], token[:, None], x[:, 2:]], 1))]

    assert patching_effect(model, pairs, with_mode_token)["recovered"] >= 0.9
    experts = patching_effect(model, pairs, lambda base, source: expert_output_patch_hooks(model, base, source))
    assert experts["recovered"] <= 0.3 and experts["recovered"] < router["recovered"] - 0.3, (experts, router)


@pytest.mark.parametrize("mode", ABLATIONS)
def test_ablating_an_expert_hurts_only_its_mode(planted, mode):
    """Layer 0's experts (measured drops of their own mode: 0.96-1.0; layer 1's matter less: 0.02-0.27 zeroed)."""
    run, task, batch, args = planted
    resample = run_args(run.model, batch[np.roll(np.arange(len(batch)), 1)])
    for e, name in enumerate(task.rules):
        hooks = resample_expert_hooks(run.model, 0, e, resample if mode == "resample" else args, mode)
        only_hurts(changes(run.model, task, batch, hooks), {name})


def ablated_expert_out(model, args, hooks, layer):
    """`hook_expert_out` at `layer` as the ablation leaves it, beside the clean run's cache of that layer."""
    names = [EXPERT_OUT.format(layer=layer), EXPERTS.format(layer=layer), ROUTER_INPUT.format(layer=layer)]
    _, clean = model.run_with_cache(*args, names=names)
    with model.hooks(hooks):
        _, ablated = model.run_with_cache(*args, names=names[:1])
    return ablated[names[0]], clean


def test_ablation_modes_share_the_hook_contract(top2):
    model, args, rolled = top2
    layer, e = 1, 2
    outs = {}
    for mode in ABLATIONS:
        hooks = resample_expert_hooks(model, layer, e, rolled if mode == "resample" else args, mode)
        assert [name for name, _ in hooks] == [EXPERTS.format(layer=layer), EXPERT_OUT.format(layer=layer)]
        outs[mode], clean = ablated_expert_out(model, args, hooks, layer)
    routed = clean[EXPERTS.format(layer=layer)] == e
    assert routed.any() and (~routed).any()
    x = clean[EXPERT_OUT.format(layer=layer)]
    _, resampled = model.run_with_cache(*rolled, names=[ROUTER_INPUT.format(layer=layer)])
    resample = expert_output(model.blocks[layer].mlp, e, resampled[ROUTER_INPUT.format(layer=layer)])
    expected = {"zero": torch.zeros_like(x), "mean": x[routed].mean(0).expand_as(x), "resample": resample[:, :, None].expand_as(x)}
    for mode, out in outs.items():
        assert out.shape == x.shape == (6, 8, 2, 16)
        assert torch.equal(out[~routed], x[~routed])
        torch.testing.assert_close(out[routed], expected[mode][routed], rtol=1e-5, atol=1e-5)


def test_resampling_from_the_same_batch_changes_nothing(planted):
    run, _, _, args = planted
    clean = run.model(*args)
    for layer in (0, 1):
        hooks = resample_expert_hooks(run.model, layer, 1, args, "resample")
        torch.testing.assert_close(run.model.run_with_hooks(*args, fwd_hooks=hooks), clean, rtol=1e-5, atol=1e-5)


def test_mean_ablation_with_one_routed_reference_token(planted):
    """A reference of two tokens, only the first routed to expert 3 (route = mode 3): the mean is that token's output."""
    run, _, _, args = planted
    model, layer = run.model, 1
    reference = (torch.tensor([[1, 8]]), torch.tensor([[3, 0]]))
    _, cache = model.run_with_cache(*reference, names=[ROUTER_INPUT.format(layer=layer)])
    known = expert_output(model.blocks[layer].mlp, 3, cache[ROUTER_INPUT.format(layer=layer)][0, 0])
    out, clean = ablated_expert_out(model, args, resample_expert_hooks(model, layer, 3, reference, "mean"), layer)
    routed = clean[EXPERTS.format(layer=layer)] == 3
    torch.testing.assert_close(out[routed], known.expand(int(routed.sum()), -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ToylabError, match="no token of the reference run is routed to expert 2"):
        resample_expert_hooks(model, layer, 2, reference, "mean")


def test_routing_patch_replaces_indices_and_weights(top2):
    model, args, rolled = top2
    names = [name.format(layer=layer) for layer in (0, 1) for name in (EXPERTS, WEIGHTS)]
    _, source = model.run_with_cache(*rolled, names=names)
    with model.hooks(routing_patch_hooks(model, rolled)):
        _, patched = model.run_with_cache(*args, names=names)
    assert all(torch.equal(patched[name], source[name]) for name in names)
    torch.testing.assert_close(model.run_with_hooks(*args, fwd_hooks=routing_patch_hooks(model, args)), model(*args))


def test_expert_output_patch_is_the_base_routing_on_the_source_activations(top2):
    """y_l = sum_j w_j(x_base) E_{e_j(x_base)}(x_source) + shared(x_source), from the weights, at both layers."""
    model, base, source = top2
    names = [name.format(layer=layer) for layer in (0, 1) for name in (EXPERTS, WEIGHTS)]
    _, routing = model.run_with_cache(*base, names=names)
    _, x = model.run_with_cache(*source, names=[ROUTER_INPUT.format(layer=layer) for layer in (0, 1)])
    with model.hooks(expert_output_patch_hooks(model, base, source)):
        _, patched = model.run_with_cache(*base, names=[MLP_OUT.format(layer=layer) for layer in (0, 1)])
    for layer in (0, 1):
        moe, h = model.blocks[layer].mlp, x[ROUTER_INPUT.format(layer=layer)]
        every = torch.stack([expert_output(moe, e, h) for e in range(moe.n_experts)], 2)  # [batch, pos, expert, d]
        experts, weights = routing[EXPERTS.format(layer=layer)], routing[WEIGHTS.format(layer=layer)]
        chosen = every.gather(2, experts[..., None].expand(-1, -1, -1, h.shape[-1]))
        expected = (weights[..., None] * chosen).sum(2) + moe.shared(h)
        torch.testing.assert_close(patched[MLP_OUT.format(layer=layer)], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.run_with_hooks(*base, fwd_hooks=expert_output_patch_hooks(model, base, base)), model(*base))


def test_forcing_top2_changes_slot_0_only(top2):
    model, args, _ = top2
    names = [EXPERTS.format(layer=0), WEIGHTS.format(layer=0)]
    _, clean = model.run_with_cache(*args, names=names)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[::2] = True
    with model.hooks(force_routing_hooks([0], mask, 3, 4)):
        _, forced = model.run_with_cache(*args, names=names)
    indices = clean[names[0]].clone()
    indices[..., 0] = torch.where(mask, 3, indices[..., 0])
    assert torch.equal(forced[names[0]], indices) and torch.equal(forced[names[1]], clean[names[1]])


def one_line(call, match: str) -> None:
    with pytest.raises(ToylabError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_bad_inputs_are_one_line_errors(planted, top2):
    run, task, batch, args = planted
    model, mask = run.model, torch.ones(400, 10, dtype=torch.bool)
    one_line(lambda: force_routing_hooks(None, mask, 4, N_MODES), r"expert must be in \[0, 3\].*got 4")
    one_line(lambda: force_routing_hooks(None, mask.long(), 1, N_MODES), "tokens_mask must be a bool tensor")
    one_line(lambda: model.run_with_hooks(*args, fwd_hooks=force_routing_hooks(None, mask[:3], 1, N_MODES)), "same \\[batch, pos\\]")
    one_line(lambda: swap_experts_hooks(None, 0, -1, N_MODES), r"expert must be in \[0, 3\].*got -1")
    one_line(lambda: resample_expert_hooks(model, 0, 9, args, "zero"), r"expert must be in \[0, 3\]")
    one_line(lambda: resample_expert_hooks(model, 0, 1, args, "shuffle"), "unknown ablation mode 'shuffle'; valid: zero, mean, resample")
    one_line(lambda: resample_expert_hooks(model, 0, 1, None, "mean"), "mode 'mean' needs reference_args")
    one_line(lambda: resample_expert_hooks(model, 5, 1, args, "zero"), "layer 5 is not an MoE layer of this model; valid: 0, 1")
    one_line(lambda: routing_patch_hooks(model, args, [2]), "layer 2 is not an MoE layer")
    one_line(lambda: class_effects(model, task, batch, [], "rule"), "unknown label 'rule' of task 'modes'; valid: token_type")
    short = run_args(model, batch[:3])
    one_line(lambda: model.run_with_hooks(*args, fwd_hooks=routing_patch_hooks(model, short)), "same \\[batch, pos\\]")
    pairs = task.counterfactuals(20, 2, "mode")
    one_line(lambda: patching_effect(model, pairs[:0], lambda b, s: []), "no informative position")
    dense = Transformer(TransformerConfig(vocab_size=12, max_len=8, d_model=16, n_heads=2, d_mlp=32))
    one_line(lambda: routing_patch_hooks(dense, top2[1]), "need an MoE model")
