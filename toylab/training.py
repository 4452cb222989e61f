"""Training sequence models on a task with PyTorch Lightning.

`train(task, model_config, train_config, out_dir)` seeds everything, trains, validates with the
task's own metric, and leaves in `out_dir`: `config.json`, `metrics.csv` (Lightning's CSV log),
`model.safetensors`, and `final.json` (written last: its presence marks the run finished). With
`checkpoint_every`, `checkpoints/step-NNNNNN.safetensors` keep the weights along the way (`checkpoint_steps`), and
a run killed mid-way resumes from the last of them (`checkpoints/resume.ckpt`, removed when it finishes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Sampler, TensorDataset

from toylab import io
from toylab.analysis.dynamics import as_sets, expert_hooks, stability
from toylab.config import OMIT_AT_DEFAULT, build, config_hash, to_dict
from toylab.determinism import data_seed, step_seed
from toylab.errors import DivergenceError, ToylabError
from toylab.models import DRC, DRCConfig, Recurrent, RecurrentConfig, Transformer, TransformerConfig
from toylab.models.recurrent import CELLS
from toylab.registry import get_task
from toylab.schema import read_checked
from toylab.splits import overlap
from toylab.task import MAX_SEED, Batch, Task

log = logging.getLogger(__name__)
Model = Transformer | Recurrent | DRC
"""The models `build_model` builds; all take `(tokens, route)` and return logits `[batch, pos, vocab]`."""
ModelConfig = TransformerConfig | RecurrentConfig | DRCConfig

for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_floor: float = 0.1
    """Where the cosine schedule ends, as a fraction of `lr`."""
    grad_clip: float = 1.0
    n_train: int = 20000
    n_val: int = 1000
    eval_every: int = 250
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    threads: int = 1
    """CPU threads for torch; small models train fastest on one (more threads only add synchronization)."""
    checkpoint_every: int = 0
    """Keep the weights every this many steps (0: only the final ones); a killed run resumes from the last kept."""
    checkpoint_spacing: Literal["linear", "log"] = "linear"
    """`log`: keep them at checkpoint_every · 2^i steps instead, dense early, where training moves fastest."""
    target: float | Literal["task"] | None = None
    """Stop once the task's primary metric on validation has been at or above this at `patience` validations in a
    row ("task": the task's own `Task.target`; None: train every step); `steps` is then the cap, and `final.json`
    records the steps trained."""
    patience: int = 2
    settle: float | None = field(default=None, metadata=OMIT_AT_DEFAULT)
    """With a target, a model with MoE layers stops only once its routing has settled too: at the same validations,
    every MoE layer gives at least this share of validation tokens the expert set it gave them at the validation
    before (`val_routing_stable`). Dense and recurrent models ignore it. Left out of a run's config while None, so runs
    saved before it existed are reused."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "n_train", "n_val", "eval_every", "threads", "patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number (got {self.lr})")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError(f"lr_floor must be in [0, 1] (got {self.lr_floor})")
        for key in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0 (got {getattr(self, key)})")
        if isinstance(self.target, str) and self.target != "task" or isinstance(self.target, float) and not math.isfinite(self.target):
            raise ValueError(f"target must be a finite number, \"task\" (the task's own) or None (got {self.target})")
        if self.settle is not None and not 0 < self.settle <= 1:
            raise ValueError(f"settle must be in (0, 1] (got {self.settle})")
        if self.settle is not None and self.target is None:
            raise ValueError("settle adds a condition to stopping at a target: set target too")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (got {self.checkpoint_every})")
        if self.checkpoint_spacing not in ("linear", "log"):
            raise ValueError(f"unknown checkpoint_spacing '{self.checkpoint_spacing}'; valid: linear, log")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (got {self.seed})")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds n_train={self.n_train}: not one full batch to train on")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator '{self.accelerator}'; valid: {', '.join(ACCELERATORS)}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1 (got {self.devices})")


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
CHECKPOINTS, RESUME = "checkpoints", "resume.ckpt"
"""The folder of a run's kept weights, `step-NNNNNN.safetensors`, and of `resume.ckpt` while it trains."""


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    """The steps whose weights a run keeps: 0 (the initialization), every `checkpoint_every` steps (doubling the
    interval with `log` spacing) and the last; none without `checkpoint_every`."""
    if not cfg.checkpoint_every:
        return []
    steps, step = [0], cfg.checkpoint_every
    while step < cfg.steps:
        steps.append(step)
        step = 2 * step if cfg.checkpoint_spacing == "log" else step + cfg.checkpoint_every
    return steps + [cfg.steps]


def check_devices(cfg: TrainConfig) -> None:
    """Fail in one line when this machine lacks the accelerator or devices a run asks for.

    Checked where a run starts, not where its config is built: a study may be launched from a
    machine without the GPUs its workers have.
    """
    devices = available_devices()
    if cfg.accelerator not in devices:
        raise ToylabError(f"accelerator '{cfg.accelerator}' is not available here; valid: {', '.join(devices)}")
    if cfg.devices > devices[cfg.accelerator]:
        raise ToylabError(f"devices must be in [1, {devices[cfg.accelerator]}] for accelerator '{cfg.accelerator}' "
                          f"(got {cfg.devices})")
    if cfg.devices > 1:  # Lightning would start this command again as rank 1, which waits forever for rank 0's run lock
        raise ToylabError(f"devices={cfg.devices} would train in one process per device (DDP), which toylab does not support; "
                          "use devices=1 (a study trains its runs in parallel: --workers)")
    if cfg.threads > devices["cpu"]:
        raise ToylabError(f"threads must be in [1, {devices['cpu']}] (this machine's CPU cores; got {cfg.threads})")


def available_devices() -> dict[str, int]:
    """The Lightning accelerators usable on this machine, with how many devices each has."""
    counts = {"cpu": os.cpu_count() or 1}
    if torch.cuda.is_available():
        counts["gpu"] = counts["cuda"] = torch.cuda.device_count()
    if torch.backends.mps.is_available():
        counts["mps"] = 1
    counts["auto"] = counts.get("gpu", counts.get("mps", counts["cpu"]))
    return counts


class TaskDataModule(pl.LightningDataModule):
    """Train and validation batches sampled from a task with seeds derived from the run's seed, from the training
    and the held-out part of its sequence space (`toylab.splits`)."""

    def __init__(self, task: Task, cfg: TrainConfig, model: Model) -> None:
        super().__init__()
        self.task, self.cfg = task, cfg
        train = task.sample_split(cfg.n_train, data_seed(cfg.seed, "train"), "train")
        route = model.route_input(train.labels)  # labels dropped, except the one a label router or a dial reads
        self.train_data = TensorDataset(*train.tensors(), *([] if route is None else [route]))
        self.val_batch = task.sample_split(cfg.n_val, data_seed(cfg.seed, "val"), "heldout")
        self.val_overlap = overlap(train, self.val_batch)
        """Validation sequences that also occur in training: 0, since the two come from disjoint parts (`toylab.splits`)."""

    def train_dataloader(self) -> DataLoader:
        batches = StepBatches(self.cfg, lambda: self.trainer.global_step if self.trainer is not None else 0)  # resumed: from its step
        return DataLoader(self.train_data, sampler=batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.cfg.n_val)), batch_size=self.cfg.n_val)


class StepBatches(Sampler[list[int]]):
    """The batches of training steps `start()..steps-1`, the same whichever step a run starts from (so a resumed
    run sees what an uninterrupted one would): epochs of `n_train // batch_size` full batches, each epoch's order
    a permutation drawn from a generator seeded with the run's seed, two per epoch, as
    `BatchSampler(RandomSampler(generator=...), drop_last=True)` draws them."""

    def __init__(self, cfg: TrainConfig, start: Callable[[], int]) -> None:
        self.cfg, self.start = cfg, start

    def __len__(self) -> int:
        return self.cfg.steps - self.start()

    def __iter__(self) -> Iterator[list[int]]:
        n, size = self.cfg.n_train, self.cfg.batch_size
        generator, epoch, order = torch.Generator().manual_seed(self.cfg.seed), -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start(), self.cfg.steps):
            while epoch < step // (n // size):
                order, _ = torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)
                epoch += 1
            at = step % (n // size) * size
            yield order[at:at + size].tolist()


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored positions."""
    return F.cross_entropy(logits[mask], targets[mask])


def trim_unscored(tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the trailing positions no sequence of the batch scores (padding), from these and the `rest` `[batch, pos]`.

    Exact for a causal model's loss; MoE auxiliary losses then see only the kept positions.
    """
    length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return tuple(t[:, :length] for t in (tokens, targets, mask, *rest))


class StepBudgetBar(RichProgressBar):
    """Lightning's rich progress bar, counting steps against the run's step budget and passes over the training
    set: a run has `max_steps` and no number of epochs, which Lightning's own description shows as "Epoch 7/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        cfg, step = self.trainer.datamodule.cfg, self.trainer.global_step
        return f"epoch {step // (cfg.n_train // cfg.batch_size)}, step {step}/{self.trainer.max_steps}"


ROUTING_STABLE = "val_routing_stable"
"""The validation metric of settled routing (`TrainConfig.settle`, `toylab.analysis.dynamics.stability`)."""


class StopAtTarget(pl.Callback):
    """Stops training once every validation metric of `targets` has been at or above its target at the same
    `patience` validations in a row (a metric not logged at a validation is not at its target there)."""

    def __init__(self, targets: Mapping[str, float], patience: int) -> None:
        self.targets, self.patience, self.held = dict(targets), patience, 0

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        values = {metric: trainer.callback_metrics.get(metric) for metric in self.targets}
        met = all(value is not None and float(value) >= self.targets[metric] for metric, value in values.items())
        self.held = self.held + 1 if met else 0
        trainer.should_stop = trainer.should_stop or self.held >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = state["held"]


class Checkpoints(pl.Callback):
    """Keeps the weights at `steps` in `folder/step-NNNNNN.safetensors` and, after each but the last, what a killed
    run resumes from: `folder/resume.ckpt`, Lightning's checkpoint (weights, optimizer, schedule, loops, the other
    callbacks' state), written atomically and loaded with `weights_only`, and written again after a validation at
    that step (a resumed run does not validate at the step it resumes from, so it must have seen it). (The batches
    and the global RNG of a step depend on the step alone: `StepBatches`, `step_seed`.) List it after the callbacks
    whose state it saves."""

    def __init__(self, folder: Path, steps: list[int]) -> None:
        self.folder, self.steps = folder, steps

    def keep(self, trainer: pl.Trainer, module: SequenceModel) -> None:
        step = trainer.global_step
        self.folder.mkdir(exist_ok=True)
        io.save_tensors(self.folder / f"step-{step:06d}.safetensors", module.model.state_dict())
        self.resume_point(trainer)

    def resume_point(self, trainer: pl.Trainer) -> None:
        if trainer.global_step < self.steps[-1]:
            partial = self.folder / ".resume.ckpt.tmp"
            trainer.save_checkpoint(partial)
            os.replace(partial, self.folder / RESUME)

    def on_train_start(self, trainer: pl.Trainer, module: SequenceModel) -> None:
        if trainer.global_step == 0:
            self.keep(trainer, module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: SequenceModel, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.keep(trainer, module)

    def on_validation_end(self, trainer: pl.Trainer, module: SequenceModel) -> None:
        if trainer.global_step in self.steps:
            self.resume_point(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: SequenceModel) -> None:
        """A run stopped at its target keeps its last weights too (as the last step it trained)."""
        if trainer.global_step not in self.steps:
            io.save_tensors(self.folder / f"step-{trainer.global_step:06d}.safetensors", module.model.state_dict())


class SequenceModel(pl.LightningModule):
    """A hooked transformer or recurrent model trained on next-token prediction plus its MoE auxiliary losses.

    With `settle`, each validation also reads the expert set of every validation token in each MoE layer, in the same
    forward pass, and logs `val_routing_stable` against the previous validation's (kept in a resumed run's checkpoint);
    the first validation of a run has nothing to compare with and logs none.
    """

    def __init__(self, model: Model, task: Task, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.task, self.cfg = model, task, cfg
        self.expert_hooks = expert_hooks(model) if cfg.settle is not None else {}
        self.expert_sets: dict[str, np.ndarray] = {}
        """The last validation's expert sets per MoE layer (`toylab.analysis.dynamics.as_sets`)."""

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        seed = step_seed(self.cfg.seed, self.global_step)
        if self.device.type == "cpu":  # torch.manual_seed would also queue a CUDA seeding, with a traceback, at each step
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        tokens, targets, mask, *route = trim_unscored(*batch)
        lm_loss = sequence_loss(self.model(tokens, *route), targets, mask)
        aux = self.model.aux_loss()
        loss = lm_loss + aux
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"training diverged: loss is {loss.item()} at step {self.global_step}; "
                f"try a lower lr (now {self.cfg.lr})"
            )
        # Log only the steps the logger writes (the progress bar's loss updates as often): a Lightning log call
        # costs 1-2 ms, 10-20% of a small model's step (`python -m benchmarks --only lightning`).
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({"train_loss": lm_loss, "train_aux_loss": aux}, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        val = self.trainer.datamodule.val_batch[batch[0].cpu().numpy()]
        tokens, targets, mask = (t.to(self.device) for t in val.tensors())
        logits, cache = self.model.run_with_cache(tokens, self.model.route_input(val.labels), names=list(self.expert_hooks.values()))
        metrics = {f"val_{k}": v for k, v in self.task.metrics(logits.cpu(), val).items()}
        if self.expert_hooks:
            keep = torch.from_numpy(self.task.positions(val))
            sets = as_sets({name: found.cpu()[keep].numpy() for name, found in cache.items()}, self.expert_hooks)
            if self.expert_sets:
                metrics[ROUTING_STABLE] = stability(self.expert_sets, sets)
            self.expert_sets = sets
        self.log_dict({"val_loss": sequence_loss(logits, targets, mask), **metrics}, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["expert_sets"] = {layer: torch.from_numpy(sets) for layer, sets in self.expert_sets.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.expert_sets = {layer: sets.numpy() for layer, sets in checkpoint.get("expert_sets", {}).items()}  # older checkpoints: none

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, foreach=True)
        warmup, total, floor = self.cfg.warmup_steps, self.cfg.steps, self.cfg.lr_floor

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            return floor + (1 - floor) * cosine

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


ARCHS = ("transformer", *CELLS, "drc")
"""What `model_options["arch"]` may name; without the key a model is a transformer (so older run configs read as before)."""


def model_config(model_options: Mapping[str, Any], **fixed: Any) -> ModelConfig:
    """The config of the model `model_options` (plus `fixed` keys) describe: a `RecurrentConfig` when its `arch` names
    a recurrent cell, a `DRCConfig` for `drc` (whose `fixed` keys include the grid's rows and cols), else a
    `TransformerConfig` (whose options carry no `arch`)."""
    arch = model_options.get("arch", "transformer")
    if arch not in ARCHS:
        raise ToylabError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if arch == "transformer":
        return build(TransformerConfig, {k: v for k, v in model_options.items() if k != "arch"}, **fixed)
    return build(DRCConfig if arch == "drc" else RecurrentConfig, model_options, **fixed)


def build_model(task: Task, model_options: dict[str, Any]) -> Model:
    """A transformer, recurrent model or DRC sized for the task's vocabulary and sequence length (`max_len` may ask for
    more positions), a DRC over the task's grid."""
    cfg = task_model_config(task, model_options)
    if isinstance(cfg, DRCConfig):
        return DRC(cfg, task.token_cells())
    return Recurrent(cfg) if isinstance(cfg, RecurrentConfig) else Transformer(cfg)


def task_model_config(task: Task, model_options: dict[str, Any]) -> ModelConfig:
    """The checked config of `build_model`'s model for `task`, without building it."""
    if "vocab_size" in model_options:
        raise ToylabError(f"vocab_size is the task's ({len(task.vocab)} tokens), not a model option; remove it")
    for key in set(model_options) & {"rows", "cols"}:
        raise ToylabError(f"{key} is the task's grid's (token_cells), not a model option; remove it")
    grid = {}
    if model_options.get("arch") == "drc":
        cells = task.token_cells()
        if cells is None:
            raise ToylabError(f"arch drc reads the input as a grid, and task '{task.name}' has none (no token_cells)")
        grid = {"rows": cells.shape[1], "cols": cells.shape[2]}
    cfg = model_config({"max_len": task.seq_len, **model_options}, vocab_size=len(task.vocab), **grid)
    if cfg.max_len < task.seq_len:
        raise ToylabError(f"max_len={cfg.max_len} is shorter than the task's sequences ({task.seq_len})")
    if not isinstance(cfg, TransformerConfig):
        return cfg
    routable = [name for name, label in task.labels.items() if not label.multi_hot]
    if cfg.router_label is not None and cfg.router_label not in routable:
        raise ToylabError(f"router_label '{cfg.router_label}' is not a label of task '{task.name}' with one class per token; "
                          f"valid: {', '.join(routable)}")
    return cfg


STEP_SECONDS, FLOPS = 0.005, 2e10
"""A training step's fixed cost (Lightning, the optimizer) and the FLOP/s of one CPU thread, both on the fast side, so
`train_seconds` rather under- than overestimates."""


def train_seconds(cfg: TrainConfig, model: ModelConfig) -> float:
    """About how long one run of `model` takes to train on the CPU (6 FLOPs per parameter and position of a step)."""
    return cfg.steps * (STEP_SECONDS + 6 * model.params * cfg.batch_size * model.max_len / (FLOPS * cfg.threads))


@dataclass
class TrainedModel:
    model: Model
    task: Task
    metrics: dict[str, float]
    run_dir: Path


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "final.json").is_file()


def run_config(task: Task, model_options: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """What identifies a training run, JSON-normalized (tuples become lists) so it compares equal to the saved file."""
    config = {"task": task.name, "task_options": task.options, "model": model_options, "train": to_dict(cfg)}
    return json.loads(json.dumps(config, default=list))


def trained_run(
    task: Task, model_options: dict[str, Any], cfg: TrainConfig, run_dir: Path, note: bool = True
) -> TrainedModel | None:
    """This very run, loaded from `run_dir` if it is there, finished and intact; else None.

    A finished run that is broken (a corrupt or foreign file, NaN weights) or holds another config
    is to be retrained; with `note`, one line on stderr says so.
    """
    run_dir = Path(run_dir)
    if not is_finished(run_dir):
        return None
    try:
        found = load_trained(run_dir)
        if io.read_json(run_dir / "config.json") != run_config(task, model_options, cfg):
            raise ToylabError("it holds a run of another config")
        return found
    except ToylabError as error:
        if note:
            log.warning(f"retraining {run_dir}: {error}")
        return None


def is_trained(task: Task, model_options: dict[str, Any], cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether `run_dir` holds this very run, finished and intact."""
    return trained_run(task, model_options, cfg, run_dir, note=False) is not None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process: another process waits here until it is released.

    An OS file lock (`filelock`), released by the system when its holder dies, so a killed run's lock
    is taken over at once. The lock file is removed, while still held, once the run is finished: a process
    waiting on it then finds the run finished and loads it, as does any later one, which needs no lock's file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(f"waiting for {run_dir}: another process is training it")
        lock.acquire()
    try:
        yield
    finally:
        if is_finished(run_dir):
            path.unlink(missing_ok=True)
        lock.release()


def train(
    task: Task,
    model_options: dict[str, Any],
    cfg: TrainConfig,
    run_dir: Path,
    progress: bool = True,
) -> TrainedModel:
    """Train one model, or load it if `run_dir` already holds this finished run.

    The run directory is locked while it is checked and trained (a second process waits, then reuses
    the run); Lightning logs to a fresh attempt folder, moved into place only when the run finishes.
    """
    run_dir = Path(run_dir)
    check_devices(cfg)
    for name in ("config.json", "final.json"):  # a FIFO or a folder in place of a run file: refused before it is read
        io.check_writable(run_dir / name)
    with run_lock(run_dir):
        found = trained_run(task, model_options, cfg, run_dir)
        return found if found is not None else _fit(task, model_options, cfg, run_dir, progress)


def _fit(task: Task, model_options: dict[str, Any], cfg: TrainConfig, run_dir: Path, progress: bool) -> TrainedModel:
    config = run_config(task, model_options, cfg)
    (run_dir / "final.json").unlink(missing_ok=True)  # a stale marker must never vouch for the new run
    for stale in run_dir.glob(".attempt-*"):  # logs of attempts that died
        shutil.rmtree(stale, ignore_errors=True)
    resume = resumable(run_dir, config)
    if resume is None:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    attempt = Path(tempfile.mkdtemp(prefix=".attempt-", dir=run_dir))
    io.write_json(run_dir / "config.json", config)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.threads)
    model = build_model(task, model_options)
    kept = checkpoint_steps(cfg)
    target = task.target if cfg.target == "task" else cfg.target
    module = SequenceModel(model, task, cfg)
    targets = {f"val_{task.primary_metric}": target, **({ROUTING_STABLE: cfg.settle} if module.expert_hooks else {})}
    stop = [StopAtTarget(targets, cfg.patience)] if target is not None else []
    callbacks = [*([StepBudgetBar()] if progress else []), *stop, *([Checkpoints(run_dir / CHECKPOINTS, kept)] if kept else [])]
    trainer = pl.Trainer(
        max_steps=cfg.steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        val_check_interval=cfg.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.grad_clip,
        logger=CSVLogger(attempt, name="", version=""),
        log_every_n_steps=max(1, min(50, cfg.steps, cfg.eval_every, cfg.n_train // cfg.batch_size)),  # at least one log line
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=callbacks,
        deterministic=True,
        default_root_dir=attempt,
    )
    torch.utils.deterministic.fill_uninitialized_memory = False  # `deterministic` also NaN-fills every new tensor (3% of a step)
    data = TaskDataModule(task, cfg, model)
    with lightning_interrupts():
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    model.cpu().eval()
    metrics = evaluate(model, task, data.val_batch)
    io.save_tensors(run_dir / "model.safetensors", model.state_dict())
    os.replace(attempt / "metrics.csv", run_dir / "metrics.csv")
    shutil.rmtree(attempt, ignore_errors=True)
    (run_dir / CHECKPOINTS / RESUME).unlink(missing_ok=True)
    kept = [step for step in kept if step < trainer.global_step] + [trainer.global_step] if kept else []
    final = {"metrics": metrics, "val_overlap": data.val_overlap, "config_hash": config_hash(config), "steps": trainer.global_step,
             "stopped_at_target": trainer.global_step < cfg.steps,
             **({"routing_stable": float(trainer.callback_metrics[ROUTING_STABLE])} if ROUTING_STABLE in trainer.callback_metrics else {}),
             "weights_sha256": io.sha256(run_dir / "model.safetensors"),
             "checkpoints": {str(step): io.sha256(checkpoint_path(run_dir, step)) for step in kept}}
    io.write_json(run_dir / "final.json", final)
    return TrainedModel(model, task, metrics, run_dir)


def resumable(run_dir: Path, config: dict[str, Any]) -> Path | None:
    """The checkpoint a killed run of `config` left in `run_dir` to resume from, if it is there and loads (else a
    one-line note and None: the run starts over)."""
    path = run_dir / CHECKPOINTS / RESUME
    if not path.is_file():
        return None
    try:
        if io.read_json(run_dir / "config.json") != config:
            raise ToylabError("it was left by a run of another config")
        torch.load(path, map_location="cpu", weights_only=True)
    except (ToylabError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        log.warning(f"not resuming from {path}: {str(error).splitlines()[0]}")
        return None
    log.warning(f"resuming {run_dir} from {path}")
    return path


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}.safetensors"


@contextmanager
def lightning_interrupts() -> Iterator[None]:
    """Let Ctrl-C during `trainer.fit` raise KeyboardInterrupt: Lightning turns it into `sys.exit(1)`
    and ignores SIGINT from then on; undo both."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


@torch.no_grad()
def evaluate(model: Model, task: Task, batch: Batch) -> dict[str, float]:
    """The task's metrics and the loss of `model` on `batch`."""
    tokens, targets, mask = batch.tensors()
    logits = model(tokens, model.route_input(batch.labels))
    return {"loss": sequence_loss(logits, targets, mask).item(), **task.metrics(logits, batch)}


def load_trained(run_dir: Path) -> TrainedModel:
    """Load a finished run: its task, model weights (safetensors) and final metrics.

    A one-line ToylabError names the file when anything is missing or corrupt: `final.json` or
    `config.json` not of their schemas (`toylab.schema`), an empty `metrics.csv`, weights that are another model's
    (checked by their SHA-256 and shapes) or not finite.
    """
    run_dir = Path(run_dir)
    if not is_finished(run_dir):
        raise ToylabError(f"no finished run in {run_dir} (final.json missing)")
    config, final = read_checked(run_dir / "config.json", "train-config"), read_checked(run_dir / "final.json", "final")
    logs = run_dir / "metrics.csv"
    if not logs.is_file() or len(logs.read_bytes().splitlines()) < 2:
        raise ToylabError(f"{logs} is missing or empty")
    task = get_task(config["task"], config["task_options"])
    model = with_weights(build_model(task, config["model"]), run_dir / "model.safetensors", final["weights_sha256"])
    return TrainedModel(model, task, final["metrics"], run_dir)


def with_weights(model: Model, path: Path, sha256: str) -> Model:
    """`model` (in eval mode) with the weights of `path`, checked to be the file a run saved (by its SHA-256), of
    this model's shapes and finite; else a one-line ToylabError naming the file."""
    if path.is_file() and io.sha256(path) != sha256:
        raise ToylabError(f"{path} is not the checkpoint this run saved (its SHA-256 differs)")
    try:
        model.load_state_dict(io.load_tensors(path))
    except RuntimeError as error:
        raise ToylabError(f"checkpoint {path} does not match its config: {str(error).splitlines()[0]}") from None
    if not all(torch.isfinite(p).all() for p in model.state_dict().values()):
        raise ToylabError(f"checkpoint {path} holds NaN or infinite weights")
    return model.eval()


def kept_steps(run_dir: Path) -> list[int]:
    """The steps of a finished run's kept weights (`checkpoint_steps`; none without `checkpoint_every`)."""
    return sorted(int(step) for step in read_checked(Path(run_dir) / "final.json", "final").get("checkpoints", {}))


def load_checkpoint(run: TrainedModel, step: int) -> Model:
    """The model of a finished run as it was at a kept `step`."""
    found = read_checked(run.run_dir / "final.json", "final").get("checkpoints", {})
    if str(step) not in found:
        raise ToylabError(f"no checkpoint at step {step} in {run.run_dir}; kept: {', '.join(map(str, kept_steps(run.run_dir))) or 'none'}")
    config = read_checked(run.run_dir / "config.json", "train-config")
    return with_weights(build_model(run.task, config["model"]), checkpoint_path(run.run_dir, step), found[str(step)])
