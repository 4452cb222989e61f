"""Benchmark: sorted MoE dispatch vs the loop-over-experts reference (forward + backward), in one process.

    python benchmarks/bench_moe_dispatch.py [--out results.json]

Prints, per size, the median time of each and their ratio; ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from toylab.models.moe import MoE, reference_forward

SIZES = [  # (tokens, d_model, d_expert, n_experts, k)
    (2048, 32, 64, 4, 1),
    (2048, 32, 64, 16, 2),
    (8192, 64, 128, 8, 1),
    (8192, 64, 32, 32, 4),
]


def median_seconds(fn, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times[3:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for tokens, d_model, d_expert, n_experts, k in SIZES:
        moe = MoE(d_model, d_expert, n_experts, k)
        x = torch.randn(tokens // 64, 64, d_model, requires_grad=True)

        def step(forward) -> None:
            forward(x).pow(2).sum().backward()

        sorted_s = median_seconds(lambda: step(moe))
        naive_s = median_seconds(lambda: step(lambda inp: reference_forward(moe, inp)))
        row = {"tokens": tokens, "d_model": d_model, "d_expert": d_expert, "n_experts": n_experts, "k": k,
               "sorted_ms": round(sorted_s * 1e3, 3), "reference_ms": round(naive_s * 1e3, 3),
               "speedup": round(naive_s / sorted_s, 2)}
        rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
