"""Dyck-(k, m) sampler and labels against an independent stack-based reference."""

import numpy as np
import pytest
import torch

from toylab.tasks.brackets import BOS, EOS, OPEN, PAD
from toylab.errors import ToylabError
from toylab.registry import get_task
from toylab.task import IGNORE


def reference_labels(tokens: list[int], k: int) -> dict[str, list[int]]:
    """Labels from one token sequence with an explicit Python stack (no shared code with the task)."""
    stack: list[tuple[int, int]] = []  # (type, position)
    out = {"depth": [], "stack_top": [], "match_distance": [], "token_type": [], "position": []}
    for t, token in enumerate(tokens):
        if token == PAD:
            for values in out.values():
                values.append(IGNORE)
            continue
        distance = IGNORE
        if OPEN <= token < OPEN + k:
            stack.append((token - OPEN, t))
        elif OPEN + k <= token < OPEN + 2 * k:
            kind, opened = stack.pop()
            assert kind == token - OPEN - k, "close does not match the innermost open bracket"
            distance = t - opened
        out["depth"].append(len(stack))
        out["stack_top"].append(stack[-1][0] if stack else k)
        out["match_distance"].append(distance)
        out["token_type"].append(token)
        out["position"].append(t)
    return out


@pytest.mark.parametrize("k,m", [(2, 4), (3, 2), (1, 6)])
def test_labels_match_reference(k, m):
    task = get_task("brackets", k=k, m=m, max_length=24, min_length=4)
    batch = task.sample(3000, seed=1)
    for i in range(len(batch)):
        tokens = batch.inputs[i].tolist()
        assert tokens[0] == BOS
        ref = reference_labels(tokens, k)
        assert max(ref["depth"]) <= m
        for name, values in ref.items():
            assert batch.labels[name][i].tolist() == values, (name, tokens)
        real = [t for t in tokens if t != PAD]
        n_brackets = sum(t >= OPEN for t in real)
        assert 4 <= n_brackets <= 24
        assert EOS not in real or (real[-1] == EOS and ref["depth"][len(real) - 1] == 0)
        if EOS not in real:
            assert n_brackets == 24  # only full-length strings are cut
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    np.testing.assert_array_equal(batch.loss_mask, batch.targets != PAD)


def test_transition_probabilities():
    """Empty stack: end 1/2, each open 1/(2k); full stack: close 1; otherwise open 1/2, close 1/2."""
    k, m = 2, 3
    task = get_task("brackets", k=k, m=m, max_length=40, min_length=1)
    batch = task.sample(4000, seed=3)
    depth, tokens = batch.labels["depth"], batch.inputs
    # skip the first step (rejecting empty strings forbids ending there) and the cut at max_length
    prev_depth, nxt = depth[:, 1:-2], tokens[:, 2:-1]
    real = nxt != PAD
    empty, full = real & (prev_depth == 0), real & (prev_depth == m)
    middle = real & (prev_depth > 0) & (prev_depth < m)
    assert abs((nxt[empty] == EOS).mean() - 0.5) < 0.02
    assert abs((nxt[empty] == OPEN).mean() - 0.25) < 0.02
    assert (nxt[full] >= OPEN + k).all()
    assert abs((nxt[middle] < OPEN + k).mean() - 0.5) < 0.02


def test_closing_accuracy_metric():
    task = get_task("brackets")
    batch = task.sample(200, seed=0)
    k = task.config.k
    top = torch.from_numpy(batch.labels["stack_top"]).clamp(0, k - 1)
    perfect = torch.full((*batch.inputs.shape, len(task.vocab)), -10.0)
    perfect.scatter_(-1, (OPEN + k + top).unsqueeze(-1), 10.0)
    assert task.metrics(perfect, batch) == {"closing_accuracy": 1.0, "sequence_accuracy": 1.0}
    uniform = torch.zeros_like(perfect)
    assert task.metrics(uniform, batch) == {"closing_accuracy": 0.0, "sequence_accuracy": 0.0}
    one_wrong = perfect.clone()
    row = int(np.argmax((batch.labels["depth"] > 0).sum(1)))
    pos = int(np.argmax(batch.labels["depth"][row] > 0))
    one_wrong[row, pos] = uniform[row, pos]
    scored = (batch.labels["depth"] > 0).sum()
    assert task.metrics(one_wrong, batch) == pytest.approx(
        {"closing_accuracy": 1 - 1 / scored, "sequence_accuracy": 1 - 1 / 200})
    for odds, expected in [(3.9, 0.0), (4.1, 1.0)]:  # p_correct / p_closes = odds / (odds + 1) vs 0.8
        ratio = torch.zeros_like(perfect)
        ratio.scatter_(-1, (OPEN + k + top).unsqueeze(-1), float(np.log(odds)))
        assert task.metrics(ratio, batch)["closing_accuracy"] == expected


def test_invalid_options():
    with pytest.raises(ToylabError, match="min_length"):
        get_task("brackets", min_length=40, max_length=10)
    with pytest.raises(ToylabError, match="expected int"):
        get_task("brackets", k="two")


def test_stack_top_interchanges_match_the_reference():
    """The source turns one matched pair into another type: a valid string whose labels the independent stack
    reference recomputes; the causal model's output at every closing position is the closer of the source's top of
    stack, which differs from the base's exactly at the turned pair's closing."""
    from toylab.splits import in_heldout

    task = get_task("brackets", k=3, m=4)
    pairs = task.counterfactuals(2000, seed=2, variable="stack_top")
    assert in_heldout(pairs.base.inputs).all() and in_heldout(pairs.source.inputs).all()
    for i in range(len(pairs)):
        base, source = pairs.base.inputs[i].tolist(), pairs.source.inputs[i].tolist()
        changed = [t for t in range(len(base)) if base[t] != source[t]]
        assert len(changed) == 2 and OPEN <= source[changed[0]] < OPEN + 3 and source[changed[1]] == source[changed[0]] + 3
        ref = reference_labels(source, 3)  # asserts the source is well nested
        for name in ("stack_top", "depth", "token_type"):
            assert pairs.source.labels[name][i].tolist() == ref[name], name
        closing = [t for t in range(len(base) - 1) if source[t + 1] >= OPEN + 3]
        assert np.flatnonzero(pairs.mask[i]).tolist() == closing
        assert [pairs.targets[i][t] for t in closing] == [OPEN + 3 + ref["stack_top"][t] for t in closing]
        assert np.flatnonzero(pairs.informative[i]).tolist() == [changed[1] - 1]
