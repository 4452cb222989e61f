"""Planted modular structure: one of K known rules applied to a list of symbols."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from toylab.registry import register_task
from toylab.task import IGNORE, Batch, Counterfactuals, Label, Task

if TYPE_CHECKING:
    import torch

PAD, BOS, EOS, ARROW, NEXT = 0, 1, 2, 3, 4
RULES = ("copy", "reverse", "sort", "shift", "swap", "rotate")
"""copy; reverse; sort ascending; shift each symbol by one (mod n_symbols); swap adjacent pairs; rotate left by one."""
MODE = 5
"""Id of the first mode token (one per rule in RULES, whether or not the variant shows it)."""
SYMBOL = MODE + len(RULES)
SEGMENTS = ("prompt", "example", "query", "answer")
MAX_SYMBOLS, MAX_LENGTH = 1000, 1000
MIN_KEEP_RATE = 0.01
"""Rejection sampling of worked examples must keep at least this share of the lists it draws."""


@dataclass(frozen=True)
class ModesConfig:
    n_modes: int = 4
    """K: the rules are the first K of copy, reverse, sort, shift, swap, rotate."""
    n_symbols: int = 8
    """Distinct symbols a list draws from (with repetition)."""
    length: int = 4
    """Symbols per list."""
    hidden: bool = False
    """False: a mode token names the rule. True: one worked example (input → output) shows it instead."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_modes <= len(RULES):
            raise ValueError(f"n_modes must be in [1, {len(RULES)}] ({', '.join(RULES)}) (got {self.n_modes})")
        if not 2 <= self.n_symbols <= MAX_SYMBOLS:
            raise ValueError(f"n_symbols must be in [2, {MAX_SYMBOLS}] (got {self.n_symbols})")
        if not 2 <= self.length <= MAX_LENGTH:
            raise ValueError(f"length must be in [2, {MAX_LENGTH}] (got {self.length})")
        if self.hidden:
            rate = distinguishing_rate(self.n_modes, self.n_symbols, self.length)
            if rate < MIN_KEEP_RATE:
                raise ValueError(
                    f"hidden=True needs worked examples that tell the {self.n_modes} rules apart, but only {rate:.2g} of "
                    f"lists of length {self.length} over {self.n_symbols} symbols do; use a longer list, more symbols or fewer modes"
                )


def source_indices(rule: np.ndarray, lists: np.ndarray, n_symbols: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs `[n, L]` of each row's rule and, per output slot, the input index it takes its symbol from."""
    n, length = lists.shape
    slot = np.broadcast_to(np.arange(length), (n, length))
    swapped = np.where(slot % 2 == 0, np.minimum(slot + 1, length - 1), slot - 1)  # an odd length keeps its last
    sources = np.select(
        [rule[:, None] == i for i in range(len(RULES))],
        [slot, slot[:, ::-1], np.argsort(lists, axis=1, kind="stable"), slot, swapped, (slot + 1) % length],
    )
    outputs = np.take_along_axis(lists, sources, axis=1)
    outputs = np.where(rule[:, None] == RULES.index("shift"), (outputs + 1) % n_symbols, outputs)
    return outputs, sources


def distinguishing(lists: np.ndarray, n_modes: int, n_symbols: int) -> np.ndarray:
    """Bool `[n]`: on which lists the first `n_modes` rules give pairwise different outputs."""
    outputs = np.stack([source_indices(np.full(len(lists), r), lists, n_symbols)[0] for r in range(n_modes)], axis=1)
    same = (outputs[:, :, None] == outputs[:, None, :]).all(-1)  # [n, K, K]
    return same.sum((1, 2)) == n_modes  # only the diagonal


def distinguishing_rate(n_modes: int, n_symbols: int, length: int, draws: int = 2000) -> float:
    """Share of random lists on which the rules differ (estimated on `draws` lists from a fixed seed)."""
    lists = np.random.default_rng(0).integers(n_symbols, size=(draws, length))
    return float(distinguishing(lists, n_modes, n_symbols).mean())


@register_task("modes")
class Modes(Task):
    """Apply one of K known rules (copy, reverse, sort, shift, ...) to a list of symbols and write the result.

    Visible: `<bos> <rule> x1..xL → y1..yL <eos>`, the mode token names the rule. Hidden:
    `<bos> a1..aL → b1..bL | x1..xL → y1..yL <eos>`, one worked example under the same rule shows
    it (its input is drawn so that every rule gives a different output), and the model must infer
    the rule. Only the answer y1..yL and `<eos>` are scored. The rule is drawn uniformly per sequence,
    symbols uniformly with repetition.
    """

    Config = ModesConfig
    primary_metric = "sequence_accuracy"
    competence = 0.9
    target = 0.99
    causal_variables = ("mode",)
    config: ModesConfig

    @property
    def rules(self) -> tuple[str, ...]:
        return RULES[: self.config.n_modes]

    @property
    def vocab(self) -> tuple[str, ...]:
        symbols = [chr(ord("a") + i) if self.config.n_symbols <= 26 else f"s{i}" for i in range(self.config.n_symbols)]
        return ("<pad>", "<bos>", "<eos>", "→", "|", *[f"<{rule}>" for rule in RULES], *symbols)

    @property
    def seq_len(self) -> int:
        length = self.config.length
        return 4 * length + 5 if self.config.hidden else 2 * length + 4

    @property
    def labels(self) -> dict[str, Label]:
        cfg, n = self.config, self.seq_len
        ordinal = lambda count: tuple(str(i) for i in range(count))  # noqa: E731
        symbols = tuple(self.vocab[SYMBOL:])
        return {
            "token_type": Label("token_type", "state", "the current token", self.vocab),
            "position": Label("position", "state", "index of the token in the sequence", ordinal(n), ordinal=True),
            "segment": Label("segment", "state", "prompt (<bos>, mode token), worked example (with its → and |), "
                             "query input (with its →), or answer (with <eos>)", SEGMENTS),
            "mode": Label("mode", "function" if cfg.hidden else "state",
                          "the sequence's rule" + (" (shown only by the worked example)" if cfg.hidden else " (named by the mode token)"),
                          self.rules),
            "symbol": Label("symbol", "state", "the current symbol (undefined at other tokens)", symbols),
            "source": Label("source", "function", "at an answer symbol, the index in the query list its symbol comes from",
                            ordinal(cfg.length), ordinal=True),
        }

    def shifted(self) -> Modes:
        """The same rules on lists two symbols longer (every shifted sequence is longer than this task's)."""
        return Modes(replace(self.config, length=self.config.length + 2))

    def sample(self, n: int, seed: int) -> Batch:
        self.check_sample(n, seed)
        return self._build(*self._draw(n, np.random.default_rng(seed)))

    def interchange(self, n: int, seed: int, variable: str) -> Counterfactuals:
        """Pairs for `mode`: base and source drawn independently; the causal model's output is the base's query
        under the source's rule (shown by the source's mode token, or in `hidden`, its worked example), which enters
        the input at the prompt and the worked example (`positions`), where interventions move it."""
        self.check_sample(n, seed)
        rng = np.random.default_rng(seed)
        base, source = self._draw(n, rng), self._draw(n, rng)
        rule, _, example = source
        counterfactual, built = self._build(rule, base[1], example), self._build(*base)
        shown = built.labels["segment"] < SEGMENTS.index("query")  # the prompt (<bos>, mode token) or the worked example
        return Counterfactuals(variable, built, self._build(*source), counterfactual.targets, counterfactual.loss_mask, shown)

    def _draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each sequence's rule, query list and (hidden) worked example's input list."""
        cfg = self.config
        rule = rng.integers(cfg.n_modes, size=n)
        query = rng.integers(cfg.n_symbols, size=(n, cfg.length))
        return rule, query, self._distinguishing_lists(n, rng) if cfg.hidden else None

    def _build(self, rule: np.ndarray, query: np.ndarray, example: np.ndarray | None) -> Batch:
        """The sequences of these rules, queries and (hidden) worked examples, with targets, mask and labels."""
        cfg, (n, length) = self.config, query.shape
        answer, source = source_indices(rule, query, cfg.n_symbols)
        mode_col = np.broadcast_to(rule[:, None], (n, 1))
        column = lambda value: np.full((n, 1), value)  # noqa: E731
        undefined = np.full((n, length), IGNORE)
        if example is not None:
            example_out, _ = source_indices(rule, example, cfg.n_symbols)
            parts = [(column(BOS), 0, None), (SYMBOL + example, 1, None), (column(ARROW), 1, None),
                     (SYMBOL + example_out, 1, None), (column(NEXT), 1, None)]
        else:
            parts = [(column(BOS), 0, None), (MODE + mode_col, 0, None)]
        parts += [(SYMBOL + query, 2, None), (column(ARROW), 2, None), (SYMBOL + answer, 3, source), (column(EOS), 3, None)]
        tokens = np.concatenate([p[0] for p in parts], axis=1)
        segment = np.concatenate([np.full(p[0].shape, p[1]) for p in parts], axis=1)
        sources = np.concatenate([undefined[:, : p[0].shape[1]] if p[2] is None else p[2] for p in parts], axis=1)
        targets = np.concatenate([tokens[:, 1:], column(PAD)], axis=1)
        is_symbol = tokens >= SYMBOL
        labels = {
            "token_type": tokens,
            "position": np.broadcast_to(np.arange(self.seq_len), tokens.shape).copy(),
            "segment": segment,
            "mode": np.repeat(mode_col, self.seq_len, axis=1),
            "symbol": np.where(is_symbol, tokens - SYMBOL, IGNORE),
            "source": sources,
        }
        scored = np.roll(segment == SEGMENTS.index("answer"), -1, axis=1)  # the position before an answer token
        scored[:, -1] = False
        return Batch(tokens, targets, scored, labels)

    def _distinguishing_lists(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` lists on which the K rules give K different outputs (rejection sampling)."""
        cfg, kept, have = self.config, [], 0
        while have < n:
            lists = rng.integers(cfg.n_symbols, size=(2 * n + 64, cfg.length))
            good = distinguishing(lists, cfg.n_modes, cfg.n_symbols)
            kept.append(lists[good])
            have += int(good.sum())
        return np.concatenate(kept)[:n]

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Answer accuracy: the share of scored positions (answer symbols and `<eos>`) whose top prediction is right;
        sequence accuracy: the share of sequences right at every one of them."""
        _, targets, mask = batch.tensors()
        correct = (logits.argmax(-1) == targets) | ~mask
        return {
            "answer_accuracy": (correct & mask).sum().item() / mask.sum().item(),
            "sequence_accuracy": correct.all(1).float().mean().item(),
        }
