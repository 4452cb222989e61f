"""Bracket closing: the bounded Dyck language Dyck-(k, m)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from toylab.errors import ToylabError
from toylab.registry import register_task
from toylab.task import IGNORE, Batch, Counterfactuals, Label, Task

if TYPE_CHECKING:
    import torch

PAD, BOS, EOS = 0, 1, 2
OPEN = 3
_OPEN_CHARS, _CLOSE_CHARS = "([{<", ")]}>"
MAX_LENGTH = 10_000
MIN_KEEP_RATE = 0.01
"""Rejection sampling must keep at least this share of the strings it draws, or it would (nearly) never finish."""


def keep_rate(m: int, min_length: int) -> tuple[float, int]:
    """The share of sampled strings with at least `min_length` brackets, and the largest `min_length` whose share
    is at least MIN_KEEP_RATE (`min_length` itself when it is).

    The sampler's depth is a Markov chain (at depth 0: open or end, 1/2 each; below m: open or close, 1/2
    each; at m: close), so the share is the probability mass still alive after `min_length` steps.
    """
    alive = np.zeros(min(m, min_length) + 1)  # mass by depth; deeper than min_length is unreachable in time
    alive[0] = 1.0
    for step in range(1, min_length + 1):
        new = np.zeros_like(alive)
        new[1:] += 0.5 * alive[:-1]  # open
        new[:-2] += 0.5 * alive[1:-1]  # close below the top
        new[-2] += alive[-1]  # close from the top (a full stack, or unreachable until the last step)
        alive = new
        if alive.sum() < MIN_KEEP_RATE:
            return float(alive.sum()), step - 1
    return float(alive.sum()), min_length


@dataclass(frozen=True)
class BracketsConfig:
    k: int = 2
    """Number of bracket types."""
    m: int = 4
    """Maximum depth (number of unclosed brackets)."""
    max_length: int = 32
    """Brackets per sequence at most; longer strings are cut to this prefix."""
    min_length: int = 8
    """Brackets per sequence at least; shorter strings are resampled (rejection sampling)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_LENGTH:
            raise ValueError(f"k must be in [1, {MAX_LENGTH}] (got {self.k})")
        if not 1 <= self.min_length <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"need 1 <= min_length <= max_length <= {MAX_LENGTH} (got {self.min_length}, {self.max_length})")
        if not 1 <= self.m <= self.max_length:
            raise ValueError(f"m must be in [1, max_length={self.max_length}]: no string is deeper than it is long (got {self.m})")
        rate, longest = keep_rate(self.m, self.min_length)
        if rate < MIN_KEEP_RATE:
            raise ValueError(
                f"min_length={self.min_length} keeps only {rate:.2g} of sampled strings (m={self.m}), so rejection "
                f"sampling would not finish; use min_length <= {longest}"
            )


@register_task("brackets")
class Brackets(Task):
    """Dyck-(k, m): strings of k bracket types nested at most m deep; the model must close them.

    The standard bounded-Dyck sampler: with an empty stack each open bracket weighs 1/k and
    ending weighs 1; with a full stack only the matching close is allowed; otherwise all opens
    together weigh 1 and the matching close weighs 1. Sequences start with <bos> and end with
    <eos> (or are cut at max_length). Labels give the state after reading each token.
    """

    Config = BracketsConfig
    primary_metric = "closing_accuracy"
    competence = 0.95
    target = 0.99
    causal_variables = ("stack_top",)
    config: BracketsConfig

    @property
    def vocab(self) -> tuple[str, ...]:
        k = self.config.k
        opens = [_OPEN_CHARS[i] if k <= 4 else f"({i}" for i in range(k)]
        closes = [_CLOSE_CHARS[i] if k <= 4 else f"{i})" for i in range(k)]
        return ("<pad>", "<bos>", "<eos>", *opens, *closes)

    @property
    def seq_len(self) -> int:
        return self.config.max_length + 2

    @property
    def labels(self) -> dict[str, Label]:
        k, m, n = self.config.k, self.config.m, self.seq_len
        types = tuple(self.vocab[OPEN : OPEN + k])
        ordinal = lambda count: tuple(str(i) for i in range(count))  # noqa: E731
        return {
            "token_type": Label("token_type", "state", "the current token", self.vocab),
            "position": Label("position", "state", "index of the token in the sequence", ordinal(n), ordinal=True),
            "depth": Label("depth", "function", "number of unclosed brackets", ordinal(m + 1), ordinal=True),
            "stack_top": Label(
                "stack_top", "function", "type of the innermost unclosed bracket (the one to close next)",
                (*types, "empty"),
            ),
            "match_distance": Label(
                "match_distance", "function", "for a closing bracket, how far back its open bracket is",
                ordinal(n), ordinal=True,
            ),
        }

    def sample(self, n: int, seed: int) -> Batch:
        self.check_sample(n, seed)
        rng = np.random.default_rng(seed)
        chunks, have = [], 0
        while have < n:
            tokens, labels = self._generate(max(2 * n, 256), rng)
            keep = ((tokens >= OPEN).sum(1) >= self.config.min_length).nonzero()[0]
            chunks.append((tokens[keep], {name: v[keep] for name, v in labels.items()}))
            have += len(keep)
        tokens = np.concatenate([c[0] for c in chunks])[:n]
        labels = {name: np.concatenate([c[1][name] for c in chunks])[:n] for name in chunks[0][1]}
        targets = np.concatenate([tokens[:, 1:], np.full((n, 1), PAD)], axis=1)
        return Batch(tokens, targets, targets != PAD, labels)

    def shifted(self) -> Brackets:
        """Dyck-(k, m + 2): strings of the same lengths, nested deeper."""
        return Brackets(replace(self.config, m=self.config.m + 2))

    def shifted_sample(self, n: int, seed: int) -> Batch:
        """`n` strings of `shifted()` that nest deeper than m somewhere, so that none is a string of this task."""
        shifted, found, have = self.shifted(), [], 0
        for draw in np.random.SeedSequence(seed).generate_state(64):
            batch = shifted.sample(max(4 * n, 256), int(draw))
            found.append(batch[(batch.labels["depth"] > self.config.m).any(1)])
            have += len(found[-1])
            if have >= n:
                return Batch.concat(found)[:n]
        raise ToylabError(f"too few strings of Dyck-({self.config.k}, {self.config.m + 2}) nest deeper than {self.config.m}")

    def interchange(self, n: int, seed: int, variable: str) -> Counterfactuals:
        """Pairs for `stack_top`: the source is the base with one matched pair of brackets (chosen at random among
        those closed in the string) turned into another type, so the top of the stack differs between the pair's
        opening and closing. The causal model's output at every position whose next token closes a bracket is then
        the closing bracket of the source's top of stack: the source's next token (it differs from the base's only
        where the turned pair closes). Needs k >= 2."""
        if self.config.k < 2:
            raise ToylabError(f"stack_top interchanges need two bracket types or more (k={self.config.k})")
        k, base = self.config.k, self.sample(n, seed)
        rng = np.random.default_rng([seed, 1])
        closes = base.inputs >= OPEN + k
        weights = rng.random(closes.shape) * closes  # pick one closing bracket per string, uniformly
        close = weights.argmax(1)
        rows = np.flatnonzero(closes.any(1))  # a string without a closing bracket stays as it is
        close = close[rows]
        opened = close - base.labels["match_distance"][rows, close]
        shift = OPEN + (base.inputs[rows, opened] - OPEN + rng.integers(1, k, size=len(rows))) % k  # another type
        inputs = base.inputs.copy()
        inputs[rows, opened], inputs[rows, close] = shift, shift + k
        tops, position = base.labels["stack_top"].copy(), np.arange(inputs.shape[1])
        span = (position >= opened[:, None]) & (position < close[:, None]) & (base.labels["depth"][rows] == base.labels["depth"][rows, opened][:, None])
        tops[rows] = np.where(span, (shift - OPEN)[:, None], tops[rows])  # the turned bracket is the top at its own depth
        token_type = np.where(base.labels["token_type"] == IGNORE, IGNORE, inputs)
        source = Batch(inputs, np.concatenate([inputs[:, 1:], np.full((n, 1), PAD)], axis=1), base.loss_mask,
                       {**base.labels, "token_type": token_type, "stack_top": tops})
        return Counterfactuals(variable, base, source, source.targets, base.loss_mask & (base.targets >= OPEN + k))

    def _generate(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the sampler for `n` sequences, vectorized over the batch, tracking the stack (arrays are `[position,
        batch]` while it runs, so that each step writes one contiguous row)."""
        k, m, length = self.config.k, self.config.m, self.config.max_length
        rows = np.arange(n)
        tokens = np.full((length + 2, n), PAD)
        tokens[0] = BOS
        stack_types = np.zeros((n, m), dtype=np.int64)
        stack_positions = np.zeros((n, m), dtype=np.int64)
        depth = np.zeros(n, dtype=np.int64)
        alive = np.ones(n, dtype=bool)
        depths = np.full(tokens.shape, IGNORE)
        tops = np.full(tokens.shape, IGNORE)
        distances = np.full(tokens.shape, IGNORE)
        depths[0], tops[0] = 0, k
        for t in range(1, length + 2):
            opens = (rng.random(n) < 0.5) & (depth < m) & alive
            kinds = rng.integers(k, size=n)
            closes = ~opens & (depth > 0) & alive
            ends = ~opens & (depth == 0) & alive
            if t == length + 1:  # no room for another bracket: the string is cut here
                opens[:] = closes[:] = False
            below = np.maximum(depth - 1, 0)
            distances[t] = np.where(closes, t - stack_positions[rows, below], IGNORE)
            tokens[t] = np.select([opens, closes, ends], [OPEN + kinds, OPEN + k + stack_types[rows, below], EOS], PAD)
            stack_types[rows[opens], depth[opens]] = kinds[opens]
            stack_positions[rows[opens], depth[opens]] = t
            depth += opens.astype(np.int64) - closes
            written = opens | closes | ends
            depths[t] = np.where(written, depth, IGNORE)
            tops[t] = np.where(written, np.where(depth > 0, stack_types[rows, np.maximum(depth - 1, 0)], k), IGNORE)
            alive &= ~ends
        tokens, depths, tops, distances = (np.ascontiguousarray(a.T) for a in (tokens, depths, tops, distances))
        written = tokens != PAD
        labels = {
            "token_type": np.where(written, tokens, IGNORE),
            "position": np.where(written, np.arange(length + 2), IGNORE),
            "depth": depths,
            "stack_top": tops,
            "match_distance": distances,
        }
        return tokens, labels

    def positions(self, batch: Batch) -> np.ndarray:
        return batch.inputs != PAD

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Closing-bracket accuracy (Hewitt et al. 2020; Yao et al. 2021).

        At every position with a non-empty stack, the model's probability of the correct close
        divided by its probability of all closes must exceed 0.8. `closing_accuracy` is the share
        of such positions where it does; `sequence_accuracy` the share of sequences where it does
        at every such position.
        """
        import torch

        k = self.config.k
        depth = torch.from_numpy(batch.labels["depth"])
        top = torch.from_numpy(batch.labels["stack_top"])
        close_probs = logits.float().softmax(-1)[..., OPEN + k : OPEN + 2 * k]
        correct = close_probs.gather(-1, top.clamp(0, k - 1).unsqueeze(-1)).squeeze(-1)
        good = correct / close_probs.sum(-1) > 0.8
        scored = depth > 0
        return {
            "closing_accuracy": good[scored].float().mean().item(),
            "sequence_accuracy": (good | ~scored).all(1)[scored.any(1)].float().mean().item(),
        }
