"""Fixed routers (hash, label) and the dials of planted specialization between the learned and the label router:
known assignments in the usual hook layouts, Lightning training, clear errors."""

import pytest
import torch

from toylab import get_task
from toylab.errors import ToylabError
from toylab.models import Transformer, TransformerConfig
from toylab.models.moe import reference_forward
from toylab.models.transformer import token_hash
from toylab.training import TrainConfig, build_model, evaluate, load_trained, train

EXPERTS = "blocks.*.mlp.hook_expert_indices"


def moe(router: str, label: str | None = None, **options) -> Transformer:
    return build_model(get_task("modes"), {"d_model": 16, "n_heads": 2, "d_mlp": 32, "ffn": "moe", "n_experts": 4,
                                            "router": router, "router_label": label, **options})


def test_hash_router_routes_by_token_only():
    torch.manual_seed(0)
    model, batch = moe("hash"), get_task("modes").sample(64, seed=0)
    tokens = torch.from_numpy(batch.inputs)
    _, cache = model.run_with_cache(tokens, names=[EXPERTS, "blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_weights"])
    for layer in (0, 1):
        experts = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        assert experts.shape == (*tokens.shape, 1)
        assert torch.equal(experts[..., 0], model.expert_of_token[tokens])
    assert torch.equal(cache["blocks.0.mlp.hook_router_logits"].argmax(-1), cache["blocks.0.mlp.hook_expert_indices"][..., 0])
    assert (cache["blocks.0.mlp.hook_expert_weights"] == 1).all()
    # a balanced map, saved with the weights
    counts = torch.bincount(model.expert_of_token, minlength=4)
    assert counts.sum() == len(get_task("modes").vocab) and counts.max() - counts.min() <= 1
    assert "expert_of_token" in model.state_dict() and model.aux_loss().item() == 0


def test_hash_map_is_drawn_from_the_seed():
    """Each seed draws its own token -> expert map (so intervals over seeds include the map); a seed gives one map."""
    maps = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        maps.append(moe("hash").expert_of_token)
    assert torch.equal(maps[0], maps[1])
    assert not torch.equal(maps[0], maps[2]) and not torch.equal(maps[2], maps[3])
    torch.manual_seed(3)
    assert not torch.equal(token_hash(27, 4), token_hash(27, 4))  # the global generator moves on


def test_label_router_routes_by_the_label_and_by_the_token_where_it_is_undefined():
    task = get_task("modes", n_modes=6)
    model = build_model(task, {"d_model": 16, "n_heads": 2, "ffn": "moe", "n_experts": 4, "router": "label",
                               "router_label": "source"})
    batch = task.sample(64, seed=1)
    tokens, route = torch.from_numpy(batch.inputs), model.route_input(batch.labels)
    _, cache = model.run_with_cache(tokens, route, names=EXPERTS)
    experts = cache["blocks.1.mlp.hook_expert_indices"][..., 0]
    defined = route >= 0
    assert defined.any() and (~defined).any()
    assert torch.equal(experts[defined], route[defined] % 4)
    assert torch.equal(experts[~defined], model.expert_of_token[tokens][~defined])
    with pytest.raises(ToylabError, match="router='label' with router_label needs route=the ids of label"):
        model(tokens)


def test_fixed_dispatch_equals_the_reference_loop():
    torch.manual_seed(1)
    layer = moe("hash").blocks[0].mlp
    x, fixed = torch.randn(3, 7, 16), torch.randint(0, 4, (3, 7))
    torch.testing.assert_close(layer(x, fixed), reference_forward(layer, x, fixed))


def test_label_router_trains_through_lightning_and_reloads(tmp_path):
    task = get_task("modes", length=3)
    options = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1, "ffn": "moe", "n_experts": 4,
               "router": "label", "router_label": "mode"}
    cfg = TrainConfig(steps=30, n_train=256, n_val=32, eval_every=15, batch_size=32)
    run = train(task, options, cfg, tmp_path / "run", progress=False)
    again = load_trained(tmp_path / "run")
    batch = task.sample(32, seed=5)
    assert evaluate(again.model, task, batch) == evaluate(run.model, task, batch)
    _, cache = again.model.run_with_cache(torch.from_numpy(batch.inputs), again.model.route_input(batch.labels), names=EXPERTS)
    assert torch.equal(cache["blocks.0.mlp.hook_expert_indices"][..., 0], torch.from_numpy(batch.labels["mode"]))


@pytest.mark.parametrize("options,message", [
    ({"router": "label", "router_label": "depth"}, "router_label 'depth' is not a label of task 'modes'"),
    ({"router": "label"}, "set both or neither"),
    ({"router": "hash", "router_label": "mode"}, "set both or neither"),
    ({"router": "hash", "top_k": 2}, "needs ffn='moe' and top_k=1"),
    ({"router": "hash", "ffn": "dense"}, "needs ffn='moe' and top_k=1"),
    ({"router": "random"}, "router"),
    ({"label_mix": 0.5}, "set both or neither"),
    ({"router_supervision": 0.5}, "set both or neither"),
    ({"label_mix": 1.5, "router_label": "mode"}, r"label_mix must be a share of tokens in \[0, 1\]"),
    ({"router_supervision": -1, "router_label": "mode"}, "router_supervision must be a finite number >= 0"),
    ({"label_mix": 0.5, "router_supervision": 1, "router_label": "mode"}, "two forms of one dial: set one"),
    ({"label_mix": 0.5, "router_label": "mode", "top_k": 2}, "needs top_k=1"),
    ({"label_mix": 0.5, "router_label": "mode", "router": "kmeans"}, "label_mix applies to routers learned, noisy"),
    ({"router_supervision": 1, "router_label": "mode", "router": "sparsity", "activation": "relu"},
     "router_supervision applies to routers learned, noisy, expert_choice"),
    ({"router_supervision": 1, "router_label": "depth"}, "router_label 'depth' is not a label of task 'modes'"),
])
def test_bad_router_options_are_one_line_errors(options, message):
    with pytest.raises(ToylabError, match=message) as error:
        moe(**{"router": "learned", **options})
    assert "\n" not in str(error.value)
    if "depth" in message:
        assert "valid: token_type, position, segment, mode, symbol, source" in str(error.value)


def test_hash_router_on_real_valued_inputs_is_refused():
    with pytest.raises(ToylabError, match="real-valued inputs, not tokens; token tasks: brackets"):
        build_model(get_task("superposition"), {"ffn": "moe", "router": "hash"})


def test_config_validation_direct():
    with pytest.raises(ValueError, match="top_k=1"):
        TransformerConfig(vocab_size=5, max_len=4, ffn="moe", top_k=2, router="label", router_label="mode")


def routed(options: dict, tokens: torch.Tensor, route: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Top-1 experts `[layer, batch, pos]` of a fresh MoE (weights drawn from `seed`) on these inputs."""
    torch.manual_seed(seed)
    model = moe(**{"router": "learned", **options}).eval()
    _, cache = model.run_with_cache(tokens, route if model.cfg.router_label else None, names=EXPERTS)
    return torch.stack([cache[f"blocks.{layer}.mlp.hook_expert_indices"][..., 0] for layer in (0, 1)])


def test_the_mixing_dial_runs_from_the_learned_router_to_the_label_router():
    """label_mix = 0 routes as the learned router and p = 1 as the label router (same weights, same inputs); in
    between, a share p of the (position, token) cells goes by the label, nested as p grows."""
    batch = get_task("modes").sample(256, seed=3)
    tokens, route = torch.from_numpy(batch.inputs), torch.from_numpy(batch.labels["mode"])
    learned = routed({}, tokens, route)
    assert torch.equal(routed({"label_mix": 0.0}, tokens, route), learned)
    assert torch.equal(routed({"label_mix": 1.0, "router_label": "mode"}, tokens, route),
                       routed({"router": "label", "router_label": "mode"}, tokens, route))
    torch.manual_seed(0)
    model = moe("learned", "mode", label_mix=0.3)
    mixed = model.planted_experts(tokens, route).mixed
    assert abs(mixed.float().mean().item() - 0.3) < 0.05
    model.cfg = TransformerConfig(**{**model.cfg.__dict__, "label_mix": 0.6})
    assert (model.planted_experts(tokens, route).mixed >= mixed).all()  # nested: routed by the label at 0.3 -> at 0.6 too
    half = routed({"label_mix": 0.3, "router_label": "mode"}, tokens, route)
    assert torch.equal(half[:, mixed], (route % 4).expand(2, *route.shape)[:, mixed])
    assert torch.equal(half[0][~mixed], learned[0][~mixed])  # the first layer's router input is the learned router's


def test_the_supervision_dial_adds_its_loss_and_plants_the_label_by_training(tmp_path):
    """λ = 0 is the learned router; λ > 0 adds λ · CE(router logits, mode) and training makes routing follow the mode."""
    task = get_task("modes", length=3)
    batch = task.sample(64, seed=5)
    tokens, route = torch.from_numpy(batch.inputs), torch.from_numpy(batch.labels["mode"])
    torch.manual_seed(0)
    model = moe("learned", "mode", router_supervision=2.0)
    model(tokens, route)
    supervision = model.blocks[0].mlp.aux_losses["router_supervision"]
    assert 2.0 * 1.0 < supervision.item() < 2.0 * 2.0  # about 2 ln 4 at initialization
    options = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1, "ffn": "moe", "n_experts": 4}
    cfg = TrainConfig(steps=150, n_train=512, n_val=32, eval_every=150, batch_size=32, lr=3e-3)
    agreement = {}
    for strength in (0.0, 3.0):
        dial = {"router_supervision": strength, "router_label": "mode"} if strength else {}
        run = train(task, {**options, **dial}, cfg, tmp_path / str(strength), progress=False)
        _, cache = run.model.run_with_cache(tokens, run.model.route_input(batch.labels), names=EXPERTS)
        agreement[strength] = (cache["blocks.0.mlp.hook_expert_indices"][..., 0] == route % 4).float().mean().item()
    assert agreement[3.0] > 0.8 and agreement[3.0] > agreement[0.0] + 0.4, agreement  # before the mode token no router can know it
    again = load_trained(tmp_path / "3.0")
    assert evaluate(again.model, task, batch) == evaluate(run.model, task, batch)
