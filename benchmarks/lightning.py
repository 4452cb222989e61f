"""Section `lightning`: training tokens/s of `toylab.training.train` (Lightning) against a minimal raw PyTorch loop.

Both train the quickstart's dense model (expert-specialization's defaults) with the same model, AdamW, warm-up +
cosine schedule, gradient clipping and batches (`TaskDataModule`, generated before timing). Steady state:
Lightning's step time is (T(n_long) - T(n_short)) / (n_long - n_short) over whole `train` runs, so setup, data
generation, the final evaluation and saving cancel; the raw loop times its steps after `n_short` warm-up steps.
No validation runs during either. Target: Lightning >= 0.9x the raw loop's tokens/s.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from statistics import median
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from benchmarks import row
from toylab.registry import get_task
from toylab.studies.expert_specialization import ExpertSpecializationConfig
from toylab.study import dense_and_moe
from toylab.training import SequenceModel, TaskDataModule, TrainConfig, build_model, sequence_loss, train, trim_unscored

TARGET = 0.9


@dataclass(frozen=True)
class Setup:
    task: str
    task_options: dict[str, Any]
    model: dict[str, Any]
    train: TrainConfig
    short: int
    """Steps of the shorter Lightning run, and the raw loop's warm-up."""
    repeats: int


def setup(quick: bool) -> Setup:
    """The quickstart's dense model and training config; `quick` shrinks both."""
    study = ExpertSpecializationConfig()
    model = dense_and_moe(study)["dense"]
    if quick:
        return Setup(study.task, study.task_options, {**model, "n_layers": 1}, TrainConfig(steps=24, batch_size=16, n_train=256,
                     n_val=16, eval_every=10**6, warmup_steps=2), short=8, repeats=1)
    return Setup(study.task, study.task_options, model, replace(study.train, eval_every=10**6), short=200, repeats=3)


def raw_setup(s: Setup) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, DataLoader]:
    """The model, optimizer, schedule and batches a raw loop trains with: the ones `toylab.training` builds."""
    task, cfg = get_task(s.task, s.task_options), s.train
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(task, s.model)
    optim = SequenceModel(model, task, cfg).configure_optimizers()
    return model, optim["optimizer"], optim["lr_scheduler"]["scheduler"], TaskDataModule(task, cfg, model).train_dataloader()


def raw_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], grad_clip: float) -> int:
    """One plain PyTorch training step (loss, backward, clipping, optimizer); returns the tokens it trained on."""
    inputs, targets, mask = trim_unscored(*batch)
    loss = sequence_loss(model(inputs), targets, mask) + model.aux_loss()
    if not torch.isfinite(loss):
        raise RuntimeError("the raw loop diverged")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return inputs.numel()


def raw_loop(s: Setup) -> tuple[float, float]:
    """Seconds per step of a plain PyTorch loop over steps `short..steps`, and the mean tokens per step."""
    cfg = s.train
    model, optimizer, scheduler, loader = raw_setup(s)
    step, tokens, start = 0, 0, 0.0
    while step < cfg.steps:
        for batch in loader:
            if step == s.short:
                start, tokens = time.perf_counter(), 0
            tokens += raw_step(model, optimizer, batch, cfg.grad_clip)
            scheduler.step()
            step += 1
            if step == cfg.steps:
                break
    return (time.perf_counter() - start) / (cfg.steps - s.short), tokens / (cfg.steps - s.short)


def lightning_run(s: Setup, steps: int) -> float:
    """Wall seconds of one whole `train` run of `steps` steps, in a fresh folder."""
    task = get_task(s.task, s.task_options)
    with tempfile.TemporaryDirectory(prefix="toylab-bench-") as folder:
        start = time.perf_counter()
        train(task, s.model, replace(s.train, steps=steps), Path(folder) / "run", progress=False)
        return time.perf_counter() - start


@cache
def steady_state(quick: bool) -> dict[str, Any]:
    """Median seconds per training step of Lightning and of the raw loop, tokens per step, and the setup.

    Cached: the `flops` section reuses it in the same process.
    """
    s = setup(quick)
    short, long, raw = [], [], []
    for _ in range(s.repeats):  # the three measurements take turns
        short.append(lightning_run(s, s.short))
        long.append(lightning_run(s, s.train.steps))
        raw.append(raw_loop(s))
    lightning_step = (median(long) - median(short)) / (s.train.steps - s.short)
    raw_step, tokens = median([r[0] for r in raw]), raw[0][1]
    return {"setup": s, "lightning_step_s": lightning_step, "raw_step_s": raw_step, "tokens_per_step": tokens}


def run(quick: bool) -> list[dict[str, Any]]:
    result = steady_state(quick)
    s, lightning_s, raw_s, tokens = (result[key] for key in ("setup", "lightning_step_s", "raw_step_s", "tokens_per_step"))
    return [row(
        f"Lightning vs raw loop tokens/s, quickstart dense model ({', '.join(f'{k} {v}' for k, v in s.model.items())}), "
        f"steps {s.short}..{s.train.steps} of batch {s.train.batch_size}",
        {"lightning step": lightning_s, "raw step": raw_s}, raw_s / lightning_s, "Lightning tokens/s / raw tokens/s",
        (">=", TARGET), lightning_tokens_per_s=round(tokens / lightning_s), raw_tokens_per_s=round(tokens / raw_s),
        tokens_per_step=round(tokens, 1),
    )]
