"""Recurrent language models (LSTM, GRU): torch.nn.LSTM / nn.GRU as the independent reference, hooks, training runs,
and the analyses that read hook points run on them unchanged."""

import json

import numpy as np
import pytest
import torch

from toylab.analysis.interchange import interchange_logits
from toylab.analysis.probes import probe
from toylab.analysis.similarity import linear_cka, residual_streams
from toylab.analysis.specialization import token_activations
from toylab.cli import app
from toylab.errors import ToylabError
from toylab.models import Recurrent, RecurrentConfig, Transformer
from toylab.models.recurrent import GRUBlock, LSTMBlock
from toylab.registry import get_task
from toylab.training import TrainConfig, build_model, load_trained, train

ARCHS = ["lstm", "gru"]
READ_OUTS = {"lstm": ["input_gate", "forget_gate", "candidate", "output_gate", "cell"], "gru": ["reset_gate", "update_gate", "candidate"]}


def small(arch: str, seed: int = 0) -> Recurrent:
    torch.manual_seed(seed)
    return Recurrent(RecurrentConfig(vocab_size=9, max_len=12, arch=arch, d_model=16))


@pytest.fixture(scope="module")
def task():
    return get_task("brackets", max_length=10, min_length=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_cells_equal_torch_with_copied_weights(arch):
    torch.manual_seed(0)
    reference = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[arch](12, 12, batch_first=True)
    block = {"lstm": LSTMBlock, "gru": GRUBlock}[arch](12)
    with torch.no_grad():
        block.W_ih.weight.copy_(reference.weight_ih_l0)
        block.W_ih.bias.copy_(reference.bias_ih_l0)
        block.W_hh.weight.copy_(reference.weight_hh_l0)
        block.W_hh.bias.copy_(reference.bias_hh_l0)
    x = torch.randn(5, 9, 12)
    expected, final = reference(x)
    read = {}
    last = block.hook_cell if arch == "lstm" else block.hook_update_gate
    with last.register_forward_hook(lambda mod, args, out: read.update(value=out)):
        hidden = block.unroll(block.W_ih(x))
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    if arch == "lstm":  # the cell state too: nn.LSTM returns its last one
        torch.testing.assert_close(read["value"][:, -1], final[1][0], atol=1e-5, rtol=1e-5)
    assert read["value"].shape == (5, 9, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_hooks_and_hook_names(arch):
    model = small(arch)
    tokens = torch.randint(0, 9, (3, 12))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (3, 12, 9)
    assert sorted(cache) == sorted(model.hook_names())
    assert all(acts.shape == (3, 12, 16) for acts in cache.values())
    expected = {f"blocks.{l}.hook_{name}" for l in range(2) for name in ["hidden", "resid_pre", "resid_post", *READ_OUTS[arch]]}
    assert expected <= set(model.hook_names())
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"],
                               cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_hidden"])  # the residual stream
    torch.testing.assert_close(model(tokens), logits)  # the read-outs, recorded only when read, change nothing
    if arch == "lstm":  # h = o tanh(c)
        torch.testing.assert_close(cache["blocks.0.hook_hidden"],
                                   cache["blocks.0.hook_output_gate"] * cache["blocks.0.hook_cell"].tanh())


@pytest.mark.parametrize("arch", ARCHS)
def test_editing_the_hidden_state_changes_logits_and_read_outs_refuse_edits(arch):
    model = small(arch)
    tokens = torch.randint(0, 9, (2, 12))
    clean = model(tokens)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_hidden", lambda x, hook: torch.zeros_like(x))])
    assert not torch.allclose(clean, zeroed)
    assert torch.equal(model(tokens), clean)  # hooks are removed afterwards
    gate = f"blocks.0.hook_{READ_OUTS[arch][0]}"
    with pytest.raises(ToylabError, match=f"{gate} is a read-out"):
        model.run_with_hooks(tokens, fwd_hooks=[(gate, lambda x, hook: torch.zeros_like(x))])


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_logits(arch):
    tokens = torch.randint(0, 9, (2, 12))
    assert torch.equal(small(arch)(tokens), small(arch)(tokens))
    assert not torch.equal(small(arch)(tokens), small(arch, seed=1)(tokens))


def test_the_training_interface_of_a_model_without_routing():
    model = small("lstm")
    assert model.route_input({}) is None and model.aux_loss().item() == 0 and model.moe_layers() == []


def test_bad_options_give_one_line_errors(task):
    for options, message in [({"arch": "lstm", "n_heads": 2}, "unknown RecurrentConfig key 'n_heads'; valid: arch, d_model, max_len"),
                             ({"arch": "rnn"}, "unknown arch 'rnn'; valid: transformer, lstm, gru"),
                             ({"arch": "gru", "d_model": 0}, "d_model must be >= 1"),
                             ({"arch": "lstm", "max_len": 3}, "max_len=3 is shorter than the task's sequences")]:
        with pytest.raises(ToylabError, match=message) as error:
            build_model(task, options)
        assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ToylabError, match="routes nothing"):
        small("lstm")(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_options_without_arch_build_a_transformer(task):
    """Run configs saved before the recurrent models came carry no `arch`: they still build (and load) transformers."""
    options = {"d_model": 16, "n_heads": 2}
    assert isinstance(build_model(task, options), Transformer)
    assert isinstance(build_model(task, {**options, "arch": "transformer"}), Transformer)


def test_train_then_load_through_the_command_line(capsys, tmp_path, task):
    args = ["train", "--model", "lstm", "-o", "max_length=10", "-o", "min_length=2", "--set", "steps=4", "--set", "n_train=32",
            "--set", "batch_size=16", "--set", "n_val=8", "--set", "eval_every=2", "--set", "d_model=16", "--out", str(tmp_path),
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        app(args)
    assert exit_info.value.code == 0 and "closing_accuracy" in capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("brackets-lstm-")
    assert json.loads((run_dir / "config.json").read_text())["model"] == {"arch": "lstm", "d_model": 16, "n_layers": 2}
    loaded = load_trained(run_dir)
    assert isinstance(loaded.model, Recurrent) and loaded.model.cfg.arch == "lstm"
    again = load_trained(run_dir)
    tokens = torch.from_numpy(task.sample(4, seed=0).inputs)
    torch.testing.assert_close(loaded.model(tokens), again.model(tokens))


def test_same_seed_same_weights(task, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=16, n_train=64, n_val=16, eval_every=3, warmup_steps=1)
    runs = [train(task, {"arch": "gru", "d_model": 8, "n_layers": 1}, cfg, tmp_path / name, progress=False) for name in "ab"]
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b), name


def test_probes_cka_and_interchange_run_on_an_lstm(task):
    torch.manual_seed(0)
    model = build_model(task, {"arch": "lstm", "d_model": 16}).eval()
    batch = task.sample(60, seed=1)
    hidden = token_activations(model, task, batch, ["blocks.0.hook_hidden"])["blocks.0.hook_hidden"]
    depth = batch.labels["depth"][task.positions(batch)]
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], batch.inputs.shape)[task.positions(batch)]
    result = probe(hidden, depth, groups=sequences)
    assert 0 <= result.accuracy <= 1 and result.n_test > 0
    streams = residual_streams(model, task, batch)
    assert streams.shape == (3, len(depth), 16)
    assert linear_cka(streams[1], streams[1]) == pytest.approx(1.0)
    assert np.isfinite(linear_cka(hidden, streams[2]))
    base, source = (torch.from_numpy(task.sample(4, seed=s).inputs) for s in (2, 3))
    swapped = interchange_logits(model, "blocks.1.hook_hidden", (base,), (source,))
    assert swapped.shape == (4, base.shape[1], len(task.vocab)) and not torch.allclose(swapped, model(base))
