"""Section `analysis`: wall time of the analyses the studies run, at >= 100k tokens.

On the quickstart's MoE (expert-specialization's defaults, untrained: the cost does not depend on the weights)
over held-out brackets sequences: collecting the router input and expert indices of every MoE layer
(`token_activations`, as `specialization` does), k-means with as many clusters as experts on the router input,
the permutation nulls of NMI and of NMI given the token (the study's number of shuffles), and logistic probes
(the linear ceiling's single fit, `logistic_predictions`, and `probe` with its shuffled-label control).
Timings only: no target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import medians, row
from toylab.analysis.clustering import kmeans, permutation_conditional_nmi, permutation_nmi
from toylab.analysis.probes import logistic_predictions, probe
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, token_activations, top_expert
from toylab.registry import get_task
from toylab.studies.expert_specialization import ExpertSpecializationConfig
from toylab.study import dense_and_moe
from toylab.task import IGNORE
from toylab.training import build_model

TOKENS, LABEL = 100_000, "depth"


def run(quick: bool) -> list[dict[str, Any]]:
    study = ExpertSpecializationConfig()
    task = get_task(study.task, study.task_options)
    torch.manual_seed(0)
    moe = build_model(task, dense_and_moe(study)["moe"]).eval()
    target, permutations, repeats = (3000, 20, 1) if quick else (TOKENS, study.n_permutations, 3)
    per_sequence = task.positions(task.sample(256, study.eval_seed)).sum() / 256
    batch = task.sample(int(np.ceil(1.05 * target / per_sequence)), study.eval_seed)  # 5% spare: lengths vary
    keep = task.positions(batch)
    names = [name.format(layer=layer) for layer in moe.moe_layers() for name in (ROUTER_INPUT, EXPERTS)]
    acts = token_activations(moe, task, batch, names)
    site, experts = acts[names[0]], top_expert(acts[names[1]], moe.cfg.n_experts)
    label = batch.labels[LABEL][keep]
    defined = label != IGNORE
    sequences = np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep]
    tokens = batch.inputs[keep]
    n = len(site)
    timed = {
        f"activation collection ({len(names)} hooks, {len(batch)} sequences)": lambda: token_activations(moe, task, batch, names),
        f"k-means, {moe.cfg.n_experts} clusters on the router input [n, {site.shape[1]}]": lambda: kmeans(site, moe.cfg.n_experts, 0),
        f"permutation null of NMI ({permutations} shuffles)": lambda: permutation_nmi(experts[defined], label[defined], permutations, 0),
        f"permutation null of NMI given the token ({permutations} shuffles)":
            lambda: permutation_conditional_nmi(experts[defined], label[defined], tokens[defined], permutations, 0),
        f"logistic probe of `{LABEL}`, one fit (linear ceiling)":
            lambda: logistic_predictions(site[defined], label[defined], groups=sequences[defined]),
        f"`probe` of `{LABEL}` with its shuffled-label control (two fits)":
            lambda: probe(site[defined], label[defined], groups=sequences[defined]),
    }
    rows = []
    for name, fn in timed.items():
        seconds = medians({"time": fn}, repeats, warmup=1)["time"]
        rows.append(row(name, {"time": seconds}, tokens=n, defined_tokens=int(defined.sum()), tokens_per_s=round(n / seconds)))
    return rows
