"""Instance-batched vs one-by-one training of toy models of superposition (n=20, m=5).

A sweep of sparsities x importance decays x seeds trains once as one model with an instance
dimension and once as separate one-instance models with the same seeds and settings, in this
process, with the same training function. Prints the wall-clock ratio and writes it as JSON:

    python benchmarks/bench_superposition.py results/bench_superposition.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from toylab.models.superposition import ToyModelConfig, ToyTrainConfig, build_toy_model, train_toy_model
from toylab.registry import get_task


def sweep(n_sparsities: int, decays: list[float], n_seeds: int, n_features: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-instance sparsity `[inst]`, importance `[inst, n]` and seeds for the full grid."""
    sparsity = 1 - np.logspace(0, -2, n_sparsities)  # 1 - S from 1 down to 0.01
    grid = [(s, d, seed) for s in sparsity for d in decays for seed in range(n_seeds)]
    importance = np.array([d ** np.arange(n_features) for _, d, _ in grid], dtype=np.float32)
    return np.array([s for s, _, _ in grid]), importance, [seed for _, _, seed in grid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--sparsities", type=int, default=10)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 suits tiny models)")
    args = parser.parse_args()

    task = get_task("superposition")
    sparsity, importance, seeds = sweep(args.sparsities, args.decays, args.seeds, task.n_features)
    n = len(seeds)
    train = ToyTrainConfig(steps=args.steps, batch_size=args.batch_size, threads=args.threads)

    start = time.perf_counter()
    batched = train_toy_model(
        build_toy_model(ToyModelConfig(n_instances=n), seeds), task, train, sparsity=sparsity, importance=importance
    )
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    alone = np.concatenate([
        train_toy_model(
            build_toy_model(ToyModelConfig(), [seeds[i]]), task, train,
            sparsity=sparsity[i : i + 1], importance=importance[i],
        ).loss
        for i in range(n)
    ])
    one_by_one_s = time.perf_counter() - start

    result = {
        "instances": n,
        "n_features": task.n_features,
        "n_hidden": ToyModelConfig().n_hidden,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "batched_s": batched_s,
        "one_by_one_s": one_by_one_s,
        "ratio": one_by_one_s / batched_s,
        "batched_ms_per_step": 1e3 * batched_s / args.steps,
        "one_by_one_ms_per_instance_step": 1e3 * one_by_one_s / (n * args.steps),
        "final_loss_batched_mean": float(batched.loss.mean()),
        "final_loss_one_by_one_mean": float(alone.mean()),
        "final_loss_correlation": float(np.corrcoef(batched.loss, alone)[0, 1]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{n} instances x {args.steps} steps: batched {batched_s:.1f} s, one by one {one_by_one_s:.1f} s, "
        f"ratio {result['ratio']:.1f}x (final losses correlate {result['final_loss_correlation']:.3f})"
    )


if __name__ == "__main__":
    main()
