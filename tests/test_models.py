"""Transformer and MoE: sorted dispatch against a naive reference, 1-expert equivalence, hooks; every model is causal."""

import numpy as np
import pytest
import torch

from toylab.errors import ToylabError
from toylab.models import DRC, DRCConfig, MLP, MoE, Recurrent, RecurrentConfig, Transformer, TransformerConfig
from toylab.models.moe import grouped_mm_supported, reference_forward


@pytest.mark.parametrize("d_model,grouped", [(12, True), (10, False)])  # grouped_mm needs rows of 16-byte multiples
@pytest.mark.parametrize("n_experts,k", [(4, 1), (4, 2), (8, 3), (3, 3)])
def test_sorted_dispatch_equals_naive_reference(n_experts, k, d_model, grouped):
    torch.manual_seed(0)
    moe = MoE(d_model=d_model, d_expert=20, n_experts=n_experts, k=k)
    probe = torch.zeros(1, d_model)
    assert grouped_mm_supported(probe, moe.W_in) == (grouped and hasattr(torch.nn.functional, "grouped_mm"))
    with torch.no_grad():
        moe.W_router.normal_()  # make routing uneven and varied
    x = torch.randn(5, 7, d_model, requires_grad=True)
    fast = moe(x)
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *moe.parameters()])
    slow = reference_forward(moe, x)
    grads_slow = torch.autograd.grad(slow.pow(2).sum(), [x, *moe.parameters()])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-4)


def test_one_expert_moe_equals_dense_mlp():
    torch.manual_seed(1)
    mlp, moe = MLP(10, 24), MoE(10, 24, n_experts=1, k=1)
    with torch.no_grad():
        moe.W_in[0] = mlp.W_in.weight.T
        moe.b_in[0] = mlp.W_in.bias
        moe.W_out[0] = mlp.W_out.weight.T
        moe.b_out[0] = mlp.W_out.bias
    x = torch.randn(3, 6, 10)
    torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=1e-5)


def test_load_balance_loss_is_one_when_uniform():
    moe = MoE(4, 8, n_experts=4, k=1, load_balance_weight=1.0)
    probs = torch.full((64, 4), 0.25)
    experts = torch.arange(64).remainder(4).view(64, 1)
    assert moe.load_balance_loss(probs, experts).item() == pytest.approx(1.0)
    collapsed = torch.zeros(64, 1, dtype=torch.long)
    assert moe.load_balance_loss(torch.tensor([[1.0, 0, 0, 0]]).expand(64, 4), collapsed).item() == pytest.approx(4.0)


def small(ffn: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=9, max_len=12, d_model=16, n_heads=2, d_mlp=32, ffn=ffn, **kw))


def test_hooks_have_fixed_layouts():
    model = small("moe", n_experts=4, top_k=2)
    tokens = torch.randint(0, 9, (3, 12))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (3, 12, 9)
    shapes = {
        "blocks.0.hook_resid_pre": (3, 12, 16),
        "blocks.1.hook_resid_mid": (3, 12, 16),
        "blocks.1.ln2.hook_normalized": (3, 12, 16),
        "blocks.0.attn.hook_pattern": (3, 2, 12, 12),
        "blocks.0.mlp.hook_router_logits": (3, 12, 4),
        "blocks.0.mlp.hook_expert_indices": (3, 12, 2),
        "blocks.0.mlp.hook_expert_weights": (3, 12, 2),
        "blocks.0.mlp.hook_post": (3, 12, 2, 16),
        "blocks.0.mlp.hook_expert_out": (3, 12, 2, 16),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    torch.testing.assert_close(cache["blocks.0.mlp.hook_expert_weights"].sum(-1), torch.ones(3, 12))
    # the top-1 expert is the router's argmax
    assert torch.equal(cache["blocks.0.mlp.hook_expert_indices"][..., 0], cache["blocks.0.mlp.hook_router_logits"].argmax(-1))
    _, subset = model.run_with_cache(tokens, names="blocks.*.hook_resid_post")
    assert sorted(subset) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(ToylabError, match="no hook point"):
        model.run_with_cache(tokens, names="blocks.9.nothing")


def test_fused_attention_equals_the_explicit_pattern():
    model = small("dense")
    tokens = torch.randint(0, 9, (4, 12))
    fused = model(tokens)
    grads_fused = torch.autograd.grad(fused.pow(2).sum(), list(model.parameters()))
    with model.hooks([("blocks.*.attn.hook_pattern", lambda pattern, hook: None)]):  # forces the explicit path
        explicit = model(tokens)
        grads_explicit = torch.autograd.grad(explicit.pow(2).sum(), list(model.parameters()))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for g_fused, g_explicit in zip(grads_fused, grads_explicit):
        torch.testing.assert_close(g_fused, g_explicit, atol=1e-5, rtol=1e-4)
    _, cache = model.run_with_cache(tokens, names="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 2, 12))
    assert (pattern.triu(1) == 0).all()  # causal


def test_hooks_can_patch_activations():
    model = small("moe")
    tokens = torch.randint(0, 9, (2, 12))
    clean = model(tokens)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", lambda x, hook: torch.zeros_like(x))])
    _, cache = model.run_with_cache(tokens, names="blocks.1.mlp.hook_expert_out")
    assert not torch.allclose(clean, zeroed)
    assert cache["blocks.1.mlp.hook_expert_out"].shape == (2, 12, 1, 16)
    assert torch.equal(model(tokens), clean)  # hooks are removed afterwards


@pytest.mark.parametrize("kind", ["dense", "moe", "lstm", "gru", "drc"])
def test_model_is_causal(kind):
    if kind == "drc":  # over a 2×2 grid: token v names cell v mod 4, tokens 0 and 1 also the next cell
        cells = np.zeros((9, 4), dtype=bool)
        cells[np.arange(9), np.arange(9) % 4] = cells[[0, 1], [1, 2]] = True
        model = DRC(DRCConfig(vocab_size=9, max_len=12, rows=2, cols=2, channels=4, d_obs=4), cells.reshape(9, 2, 2))
    elif kind in ("dense", "moe"):
        model = small(kind)
    else:
        model = Recurrent(RecurrentConfig(vocab_size=9, max_len=12, arch=kind, d_model=16))
    tokens = torch.randint(0, 9, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 9
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def test_dense_has_no_aux_loss_and_moe_has_one():
    tokens = torch.randint(0, 9, (2, 12))
    dense, moe = small("dense"), small("moe")
    dense(tokens)
    moe(tokens)
    assert dense.aux_loss().item() == 0 and moe.aux_loss().item() > 0
    assert moe.moe_layers() == [0, 1] and dense.moe_layers() == []


@pytest.mark.parametrize("router,capacity_factor", [("learned", None), ("learned", 0.5), ("expert_choice", None)])
def test_expert_hooks_read_and_edit_the_slot_layout(router, capacity_factor):
    """Hooks see `[batch, pos, slots, f]` (0 in empty slots); reading them changes nothing, and zeroing the neurons of
    expert 0 there removes exactly its slots' weighted outputs, less its output bias."""
    torch.manual_seed(3)
    moe = MoE(d_model=8, d_expert=12, n_experts=4, k=2, router=router, capacity_factor=capacity_factor)
    x = torch.randn(3, 5, 8)
    plain = moe(x)
    names = ("hook_pre", "hook_post", "hook_expert_out", "hook_expert_indices", "hook_expert_weights")
    cache: dict[str, torch.Tensor] = {}
    handles = [getattr(moe, n).register_forward_hook(lambda mod, args, out, n=n: cache.__setitem__(n, out)) for n in names]
    torch.testing.assert_close(moe(x), plain)
    for handle in handles:
        handle.remove()
    experts, weights = cache["hook_expert_indices"], cache["hook_expert_weights"]
    assert cache["hook_post"].shape == (3, 5, moe.slots, 12) and (experts < 0).any() == (router != "learned" or capacity_factor is not None)
    assert (cache["hook_pre"][experts < 0] == 0).all() and (cache["hook_expert_out"][experts < 0] == 0).all()
    expert0 = (experts == 0)[..., None]
    handle = moe.hook_post.register_forward_hook(lambda mod, args, out: torch.where(expert0, 0.0, out))
    edited = moe(x)
    handle.remove()
    removed = torch.where(expert0, cache["hook_expert_out"] - moe.b_out[0], 0.0)
    torch.testing.assert_close(edited, plain - torch.einsum("bpk,bpkd->bpd", weights, removed), atol=1e-5, rtol=1e-5)
