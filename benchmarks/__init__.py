"""The benchmark suite: speed as ratios measured in one process, on one thread (`python -m benchmarks`).

Each section is one module with `run(quick: bool) -> list[dict]`, registered by one line in
`benchmarks.__main__.SECTIONS`. A row names what was measured, its median times, the ratio, the
target and whether it is met; ratios, not absolute times, are what to compare across machines.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from typing import Any

import torch

TARGETS = {">=": operator.ge, "<=": operator.le}


def medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall seconds of each function over `repeats` calls after `warmup` calls, the functions taking turns
    (so drift in the machine's speed hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def row(name: str, seconds: dict[str, float], ratio: float | None = None, ratio_of: str | None = None,
        target: tuple[str, float] | None = None, **details: Any) -> dict[str, Any]:
    """One result: median times in ms, `ratio` (what it divides in `ratio_of`), a target `(">=" or "<=", value)`
    on the ratio and whether it is met, and any `details` (sizes, throughputs)."""
    return {
        "name": name,
        "ms": {key: round(s * 1e3, 4) for key, s in seconds.items()},
        "ratio": None if ratio is None else round(ratio, 3),
        "ratio_of": ratio_of,
        "target": None if target is None else f"{target[0]} {target[1]:g}",
        "met": None if target is None or ratio is None else bool(TARGETS[target[0]](ratio, target[1])),
        **({"details": details} if details else {}),
    }


def single_thread() -> None:
    """Every timing runs on one intra-op thread."""
    torch.set_num_threads(1)
