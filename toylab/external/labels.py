"""Labels of real text that an independent oracle can check, per character and then per token.

Every label is computed on the characters of a file with numpy (no loop over characters or tokens) and read per
token from its span `[start, end)` of characters (a fast tokenizer's offsets): a token takes the value of the last
character in its span where the label is defined, i.e. the state once the token has been read.

- `depth`: brackets `()[]{}` open around a character, after it (one stack for the three kinds: a closer closes the
  innermost open bracket whatever its kind; a closer with nothing open is ignored), classes 0..6 and 7+.
- `stack_top`: the kind of the innermost open bracket (none, `(`, `[`, `{`).
- `match_distance`: on a closing bracket, how many tokens back its opener is (0: the same token), in powers of 2.
- `latex_depth`, `latex_env`: LaTeX environments open around a character (`\\begin{x}` opens once its `}` is read,
  `\\end{x}` closes at its backslash, on the same one-stack rule) and the innermost one's name.
- `indent`: the indent level of the character's line (leading spaces / 4, a tab is one level; undefined on blank lines).
- `token_class`: whitespace, digits, identifier (word characters with a letter or `_`), bracket or other, from the
  token's own characters (its surrounding whitespace aside).
- `position`: the token's position in its sequence, in powers of 2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toylab.errors import ToylabError

OPENERS, CLOSERS = "([{", ")]}"
ENVIRONMENTS = ("document", "itemize", "enumerate", "equation", "align", "figure", "table", "tabular", "proof", "theorem")
ENVIRONMENT = re.compile(r"\\(begin|end)\s*\{([^{}]*)\}")
INDENT_UNIT = 4
"""Spaces per indent level (a tab is one level)."""


def powers_of_two(top: int) -> tuple[str, ...]:
    """Bucket names 0, 1, 2-3, 4-7, ... up to `top`+ (a power of two)."""
    names, low = ["0"], 1
    while low < top:
        names.append(str(low) if low == 1 else f"{low}-{2 * low - 1}")
        low *= 2
    return (*names, f"{top}+")


def bucket(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Class of each value >= 0 among `powers_of_two` buckets (0; 1; 2-3; ...; the last open-ended), -1 stays -1."""
    classes = np.where(values > 0, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64) + 1, 0)
    return np.where(values >= 0, np.minimum(classes, n_classes - 1), -1)


@dataclass(frozen=True)
class Text:
    """One file's characters as code points, and its tokens' character spans and positions in their sequences."""

    text: str
    starts: np.ndarray
    ends: np.ndarray
    positions: np.ndarray

    @property
    def codes(self) -> np.ndarray:
        return np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)

    def token_of_char(self) -> np.ndarray:
        """The token holding each character (the next token for a character no token spans; empty spans, such as
        special tokens', hold none)."""
        spans = np.flatnonzero(self.ends > self.starts)
        if not len(spans):
            return np.zeros(len(self.text), dtype=np.int64)
        return spans[np.searchsorted(self.ends[spans], np.arange(len(self.text)), side="right").clip(max=len(spans) - 1)]


def last_defined(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per token, the index of the last character in `[start, end)` where `values` >= 0 (-1 if none)."""
    if not len(values):
        return np.full(len(starts), -1)
    found = np.maximum.accumulate(np.where(values >= 0, np.arange(len(values)), -1))[np.clip(ends - 1, 0, None)]
    return np.where((ends > starts) & (found >= starts), found, -1)


def per_token(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A character-level label per token: its value at the token's last defined character (-1 if none)."""
    found = last_defined(values, starts, ends)
    return np.where(found >= 0, values[found], -1) if len(values) else found


def last_opener(level: np.ndarray, is_open: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per position t, the last opener j <= t with `level[j] == query[t]` (-1 if none, or where `query` < 0).

    Openers and queries are sorted together by (level, position, openers first); a running maximum within each level
    carries the latest opener's position forward."""
    n, opens = len(level), np.flatnonzero(is_open)
    asked = np.flatnonzero(query >= 0)
    keys = np.concatenate([level[opens], query[asked]])
    where = np.concatenate([opens, asked])
    opener = np.concatenate([np.ones(len(opens), bool), np.zeros(len(asked), bool)])
    order = np.lexsort((~opener, where, keys))
    group = keys[order] - (keys.min() if len(keys) else 0)
    running = np.maximum.accumulate(group * (n + 1) + np.where(opener[order], where[order], -1) + 1) if len(keys) else group
    found = np.maximum(running - group * (n + 1), 0) - 1
    out = np.full(n, -1)
    out[where[order][~opener[order]]] = found[~opener[order]]
    return out


@dataclass(frozen=True)
class Nesting:
    """A one-stack nesting of openers and closers over characters: depth after each character, the innermost open
    opener after it (-1 at depth 0), and for each matched closer its opener (-1 elsewhere)."""

    depth: np.ndarray
    top: np.ndarray
    match: np.ndarray


def nesting(delta: np.ndarray) -> Nesting:
    """`delta` per character: +1 opens, -1 closes, 0 neither. Depth is the running sum kept at 0 or above by ignoring a
    closer with nothing open: the sum minus its running minimum below 0."""
    total = np.cumsum(delta, dtype=np.int64)
    depth = total - np.minimum.accumulate(np.minimum(total, 0)) if len(total) else total
    before = np.concatenate([[0], depth[:-1]])[: len(depth)]
    is_open = delta > 0
    top = last_opener(depth, is_open, np.where(depth > 0, depth, -1))
    match = last_opener(depth, is_open, np.where((delta < 0) & (before > 0), before, -1))
    return Nesting(depth, top, match)


def kind_of(codes: np.ndarray, chars: str) -> np.ndarray:
    """Per character, 1 + its index in `chars`, 0 for any other character."""
    kinds = np.zeros(len(codes), dtype=np.int64)
    for i, char in enumerate(chars):
        kinds[codes == ord(char)] = i + 1
    return kinds


def brackets(text: Text) -> Nesting:
    codes = text.codes
    return nesting(np.sign(kind_of(codes, OPENERS)) - np.sign(kind_of(codes, CLOSERS)))


def depth(text: Text) -> np.ndarray:
    return per_token(np.minimum(brackets(text).depth, len(LABELS["depth"].classes) - 1), text.starts, text.ends)


def stack_top(text: Text) -> np.ndarray:
    top = brackets(text).top
    kinds = kind_of(text.codes, OPENERS)
    return per_token(np.where(top >= 0, kinds[np.maximum(top, 0)], 0), text.starts, text.ends)


def match_distance(text: Text) -> np.ndarray:
    """Tokens between a closing bracket's token and its opener's (the token's last closer)."""
    match = brackets(text).match
    closer = last_defined(match, text.starts, text.ends)
    owner = text.token_of_char()
    opener_token = np.where(closer >= 0, owner[np.maximum(match[np.maximum(closer, 0)], 0)], 0) if len(match) else closer
    distance = np.where(closer >= 0, np.arange(len(closer)) - opener_token, -1)
    return bucket(distance, len(LABELS["match_distance"].classes))


def environments(text: Text) -> tuple[Nesting, np.ndarray]:
    """LaTeX environments' nesting and, per character, the class of the environment an opener there opens."""
    delta, names = np.zeros(len(text.text), dtype=np.int64), np.zeros(len(text.text), dtype=np.int64)
    found = [(m.start(), m.end() - 1, m.group(1) == "begin", m.group(2).strip().rstrip("*")) for m in ENVIRONMENT.finditer(text.text)]
    if found:
        start, end, begin, name = (np.array(column) for column in zip(*found))
        at = np.where(begin, end, start)
        delta[at] = np.where(begin, 1, -1)
        classes = LABELS["latex_env"].classes
        names[at] = [classes.index(n) if n in classes[1:-1] else len(classes) - 1 for n in name]
    return nesting(delta), names


def latex_depth(text: Text) -> np.ndarray:
    return per_token(np.minimum(environments(text)[0].depth, len(LABELS["latex_depth"].classes) - 1), text.starts, text.ends)


def latex_env(text: Text) -> np.ndarray:
    nest, names = environments(text)
    return per_token(np.where(nest.top >= 0, names[np.maximum(nest.top, 0)], 0), text.starts, text.ends)


def indent(text: Text) -> np.ndarray:
    """Leading spaces (a tab: one level, `INDENT_UNIT` spaces) of each character's line, in levels."""
    codes = text.codes
    if not len(codes):
        return np.full(len(text.starts), -1)
    line = np.concatenate([[0], np.cumsum(codes == ord("\n"))[:-1]])
    width = np.where(codes == ord(" "), 1, np.where(codes == ord("\t"), INDENT_UNIT, 0))
    content = (width == 0) & (codes != ord("\n")) & (codes != ord("\r"))
    lines, first = np.unique(line[content], return_index=True)
    first = np.flatnonzero(content)[first]
    running = np.cumsum(width)
    line_start = np.flatnonzero(np.concatenate([[True], line[1:] != line[:-1]]))
    levels = np.full(line[-1] + 1, -1)
    levels[lines] = (running[first] - running[line_start[lines]] + width[line_start[lines]] - width[first]) // INDENT_UNIT
    return per_token(np.minimum(levels[line], len(LABELS["indent"].classes) - 1), text.starts, text.ends)


def token_class(text: Text) -> np.ndarray:
    """The class of a token's characters by counting each kind of character in its span (prefix sums)."""
    codes = text.codes
    unique, inverse = np.unique(codes, return_inverse=True)
    chars = [chr(c) for c in unique]
    kinds = {"space": [c.isspace() for c in chars], "digit": [c.isdecimal() for c in chars],
             "word": [c.isalnum() or c == "_" for c in chars], "bracket": [c in OPENERS + CLOSERS for c in chars]}
    prefix = {kind: np.concatenate([[0], np.cumsum(np.array(flags, dtype=np.int64)[inverse])]) for kind, flags in kinds.items()}
    counts = {kind: sums[text.ends] - sums[text.starts] for kind, sums in prefix.items()}
    size = text.ends - text.starts
    solid = size - counts["space"]
    return np.select(
        [size <= 0, solid == 0, counts["digit"] == solid, counts["word"] == solid, counts["bracket"] == solid],
        [-1, 0, 1, 2, 3], 4)


def position(text: Text) -> np.ndarray:
    return bucket(text.positions, len(LABELS["position"].classes))


@dataclass(frozen=True)
class TextLabel:
    name: str
    classes: tuple[str, ...]
    description: str
    compute: Callable[[Text], np.ndarray]


LABELS = {label.name: label for label in (
    TextLabel("depth", (*map(str, range(7)), "7+"), "brackets ()[]{} open around the token", depth),
    TextLabel("stack_top", ("none", *OPENERS), "kind of the innermost open bracket", stack_top),
    TextLabel("match_distance", powers_of_two(32), "tokens back to a closing bracket's opener", match_distance),
    TextLabel("latex_depth", (*map(str, range(4)), "4+"), "LaTeX environments open around the token", latex_depth),
    TextLabel("latex_env", ("none", *ENVIRONMENTS, "other"), "innermost LaTeX environment", latex_env),
    TextLabel("indent", (*map(str, range(5)), "5+"), f"indent level of the token's line ({INDENT_UNIT} spaces or a tab)", indent),
    TextLabel("token_class", ("whitespace", "digits", "identifier", "bracket", "other"), "what the token's characters are", token_class),
    TextLabel("position", powers_of_two(64), "position in the sequence", position),
)}
"""The labels, by name."""


GROUPS = {"brackets": ("depth", "stack_top", "match_distance"), "latex": ("latex_depth", "latex_env")}
"""Names that stand for several labels."""


def check_labels(names: Sequence[str]) -> list[str]:
    """The label names, each known (one-line ToylabError naming the valid ones otherwise), duplicates dropped."""
    unknown = [name for name in names if name not in LABELS]
    if unknown or not names:
        raise ToylabError(f"unknown label '{unknown[0] if unknown else ''}'; valid: {', '.join([*LABELS, *GROUPS])}")
    return list(dict.fromkeys(names))


def expand_labels(names: str) -> list[str]:
    """Comma-separated label names, groups expanded (`brackets`: depth, stack_top, match_distance), checked."""
    return check_labels([label for name in names.split(",") if name.strip() for label in GROUPS.get(name.strip(), (name.strip(),))])


def label_tokens(text: Text, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per label, the class id of each token of `text` (-1 where undefined)."""
    return {name: LABELS[name].compute(text).astype(np.int64) for name in names}
