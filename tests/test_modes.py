"""The modes task against an independent per-sequence implementation of its rules and labels."""

import numpy as np
import pytest

from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.task import IGNORE


def apply_rule(rule: str, xs: list[int], n_symbols: int) -> tuple[list[int], list[int]]:
    """Output list and, per output slot, the input index its symbol comes from (plain Python)."""
    n = len(xs)
    if rule == "copy":
        src = list(range(n))
    elif rule == "reverse":
        src = list(range(n - 1, -1, -1))
    elif rule == "sort":
        src = sorted(range(n), key=lambda i: (xs[i], i))
    elif rule == "shift":
        return [(x + 1) % n_symbols for x in xs], list(range(n))
    elif rule == "swap":
        src = []
        for i in range(0, n, 2):
            src += [i + 1, i] if i + 1 < n else [i]
    elif rule == "rotate":
        src = list(range(1, n)) + [0]
    return [xs[i] for i in src], src


def reference(tokens: list[str], hidden: bool, rules: tuple[str, ...], n_symbols: int) -> dict[str, list[int]]:
    """Parse one decoded sequence by its separators and recompute every label."""
    assert tokens[0] == "<bos>" and tokens[-1] == "<eos>"
    symbol = lambda t: ord(t) - ord("a")  # noqa: E731
    body = tokens[1:-1]
    labels = {"segment": [0], "mode": [], "symbol": [IGNORE], "source": [IGNORE]}
    if hidden:
        example, query = " ".join(body).split(" | ")
        ex_in, ex_out = (part.split() for part in example.split(" → "))
        # the worked example tells the rules apart, and its rule is the sequence's
        outputs = [apply_rule(r, [symbol(t) for t in ex_in], n_symbols)[0] for r in rules]
        assert len({tuple(o) for o in outputs}) == len(rules)
        rule = rules[outputs.index([symbol(t) for t in ex_out])]
        labels["segment"] += [1] * (2 * len(ex_in) + 2)
        labels["symbol"] += [symbol(t) for t in ex_in] + [IGNORE] + [symbol(t) for t in ex_out] + [IGNORE]
        labels["source"] += [IGNORE] * (2 * len(ex_in) + 2)
    else:
        rule, query = body[0][1:-1], " ".join(body[1:])
        labels["segment"] += [0]
        labels["symbol"] += [IGNORE]
        labels["source"] += [IGNORE]
    q_in, q_out = (part.split() for part in query.split(" → "))
    xs = [symbol(t) for t in q_in]
    out, src = apply_rule(rule, xs, n_symbols)
    assert [symbol(t) for t in q_out] == out
    labels["segment"] += [2] * (len(xs) + 1) + [3] * (len(xs) + 1)
    labels["symbol"] += xs + [IGNORE] + out + [IGNORE]
    labels["source"] += [IGNORE] * (len(xs) + 1) + src + [IGNORE]
    labels["mode"] = [rules.index(rule)] * len(tokens)
    return labels


@pytest.mark.parametrize("options", [
    {}, {"hidden": True}, {"n_modes": 6, "length": 6, "n_symbols": 5}, {"n_modes": 6, "length": 7, "hidden": True},
    {"n_modes": 2, "length": 3, "n_symbols": 3, "hidden": True},
])
def test_labels_match_reference(options):
    task = get_task("modes", **options)
    batch = task.sample(3000, seed=3)
    rules = task.rules
    for i in range(len(batch)):
        tokens = task.decode(batch.inputs[i])
        ref = reference(tokens, task.config.hidden, rules, task.config.n_symbols)
        for name, values in ref.items():
            assert batch.labels[name][i].tolist() == values, (name, tokens)
        assert batch.labels["token_type"][i].tolist() == batch.inputs[i].tolist()
        assert batch.labels["position"][i].tolist() == list(range(task.seq_len))
        # scored: the positions whose next token is an answer symbol or <eos>
        assert batch.loss_mask[i].tolist() == [s == 3 for s in ref["segment"][1:]] + [False]
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    counts = np.bincount(batch.labels["mode"][:, 0], minlength=len(rules))
    assert counts.min() > 0.8 * len(batch) / len(rules)  # every rule is drawn, about uniformly


def test_visible_mode_token_names_the_rule_and_hidden_has_none():
    visible, hidden = get_task("modes"), get_task("modes", hidden=True)
    assert visible.labels["mode"].kind == "state" and hidden.labels["mode"].kind == "function"
    tokens = visible.sample(200, seed=0).inputs
    assert [visible.vocab[t] for t in tokens[:3, 1]] == [f"<{visible.rules[m]}>" for m in visible.sample(200, 0).labels["mode"][:3, 0]]
    assert not any(visible.vocab[t].startswith("<") and t > 4 for t in hidden.sample(200, seed=0).inputs.ravel())


def test_metrics_score_only_the_answer():
    import torch

    task = get_task("modes", hidden=True)
    batch = task.sample(50, seed=1)
    perfect = torch.nn.functional.one_hot(torch.from_numpy(batch.targets), len(task.vocab)).float()
    assert task.metrics(perfect, batch) == {"answer_accuracy": 1.0, "sequence_accuracy": 1.0}
    wrong_example = perfect.clone()
    wrong_example[:, :5] = torch.roll(wrong_example[:, :5], 1, dims=-1)  # errors outside the answer do not count
    assert task.metrics(wrong_example, batch)["sequence_accuracy"] == 1.0
    wrong_answer = perfect.clone()
    wrong_answer[0, -3] = torch.roll(wrong_answer[0, -3], 1, dims=-1)
    scores = task.metrics(wrong_answer, batch)
    assert scores["sequence_accuracy"] == pytest.approx(49 / 50) and scores["answer_accuracy"] == pytest.approx(1 - 1 / batch.loss_mask.sum())


def test_impossible_hidden_examples_are_refused():
    with pytest.raises(ToylabError, match="tell the 6 rules apart"):
        get_task("modes", n_modes=6, length=2, hidden=True)
    with pytest.raises(ToylabError, match="n_modes must be in"):
        get_task("modes", n_modes=7)


@pytest.mark.parametrize("options", [{}, {"hidden": True}])
def test_mode_interchanges_match_the_reference(options):
    """The causal model's output of an interchange of `mode`: the base's query under the source's rule, recomputed
    by the independent reference from the decoded source (its rule) and base (its query); base and source held out."""
    from toylab.splits import in_heldout

    task = get_task("modes", **options)
    pairs = task.counterfactuals(2000, seed=4, variable="mode")
    assert len(pairs) == 2000 and in_heldout(pairs.base.inputs).all() and in_heldout(pairs.source.inputs).all()
    rules, n_symbols, length = task.rules, task.config.n_symbols, task.config.length
    for i in range(len(pairs)):
        rule = rules[reference(task.decode(pairs.source.inputs[i]), task.config.hidden, rules, n_symbols)["mode"][0]]
        query = [ord(t) - ord("a") for t in task.decode(pairs.base.inputs[i])[-2 * length - 2: -length - 2]]
        expected = apply_rule(rule, query, n_symbols)[0]
        assert pairs.targets[i][pairs.mask[i]].tolist() == [task.vocab.index(chr(ord("a") + s)) for s in expected] + [task.vocab.index("<eos>")]
        np.testing.assert_array_equal(pairs.mask[i], pairs.base.loss_mask[i])
    assert (pairs.positions == (pairs.base.labels["segment"] < 2)).all() and pairs.positions[:, 0].all()
    same_rule = pairs.base.labels["mode"][:, 0] == pairs.source.labels["mode"][:, 0]
    assert not pairs.informative[same_rule].any() and pairs.informative[~same_rule].any(1).mean() > 0.9


def test_unknown_causal_variables_are_one_line_errors():
    with pytest.raises(ToylabError, match="unknown causal variable 'symbol' of task 'modes'; valid: mode"):
        get_task("modes").counterfactuals(10, 0, "symbol")
    with pytest.raises(ToylabError, match="valid: none"):
        get_task("superposition").counterfactuals(10, 0, "x")
