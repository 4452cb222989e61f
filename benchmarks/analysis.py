"""Section `analysis`: wall time of the analyses the studies run, at >= 100k tokens.

On the quickstart's MoE (expert-specialization's defaults, untrained: the cost does not depend on the weights)
over held-out brackets sequences: collecting the router input and expert indices of every MoE layer
(`token_activations`, as `specialization` does), k-means with as many clusters as experts on the router input,
the permutation nulls of NMI and of NMI given the token (the study's number of shuffles), and logistic probes
(the linear ceiling's single fit, `logistic_predictions`, and `probe` with its shuffled-label control).
Timings only: no target.

k-sparse probing (issue 28 §3), on sparse-probing's defaults (untrained `moe-k1-e16` and `dense`, its 300 held-out
sequences; 60 with --quick): every probe of both layers (one `probe_units` call on the experts and the three pseudo-experts,
activations and k-means done beforehand) against the code before it (`benchmarks.probing_baseline`), with the
largest F1 difference between them on the rows both compute (the code before also probed pseudo-experts in a random
basis, which no analysis reads); target >= 10x. Then the whole `sparse_probing` call, for its share of the time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import medians, probing_baseline, row
from toylab.analysis.clustering import kmeans, permutation_conditional_nmi, permutation_nmi
from toylab.analysis.probes import logistic_predictions, probe
from toylab.analysis import sparse_probing as batched
from toylab.analysis.specialization import EXPERTS, ROUTER_INPUT, token_activations, top_expert
from toylab.registry import get_task
from toylab.studies.expert_specialization import ExpertSpecializationConfig
from toylab.studies.sparse_probing import SparseProbing, SparseProbingConfig
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
    return rows + probing(quick)


def probing(quick: bool) -> list[dict[str, Any]]:
    """k-sparse probing, batched vs the code before (`probing_baseline`), and the whole `sparse_probing` call."""
    config = SparseProbingConfig(n_eval=60 if quick else SparseProbingConfig.n_eval)
    study = SparseProbing(config)
    task, repeats = study.task, 1 if quick else 3
    torch.manual_seed(0)
    moe, dense = (build_model(task, study.models[name]).eval() for name in ("moe-k1-e16", "dense"))
    batch = task.sample_split(config.n_eval, config.eval_seed, "heldout")
    keep = task.positions(batch)
    part = batched.sequence_splits(np.broadcast_to(np.arange(len(batch))[:, None], keep.shape)[keep], 0, batched.FRACTIONS)
    values = {name: batch.labels[name][keep] for name in task.labels}
    sites = [ROUTER_INPUT.format(layer=layer) for layer in range(moe.cfg.n_layers)]
    (moe_layers, _), (dense_layers, router_inputs) = batched.ffn_activations(moe, task, batch), batched.ffn_activations(dense, task, batch, sites)
    layers = [batched.layer_sources(post, routing, moe.cfg.n_experts, dense_post, router_inputs[site], 0)
              for (post, routing), (dense_post, _), site in zip(moe_layers, dense_layers, sites)]
    options = (config.ks, batched.RANKINGS[:1], config.min_count, config.max_classes, study.n_candidates, 0)
    found: dict[str, list] = {}

    def before() -> None:
        found["before"] = [{"layer": layer, **row} for layer, sources in enumerate(layers)
                           for row in probing_baseline.probe_units(sources, values, task.labels, part, *options)]

    def now() -> None:
        found["batched"] = batched.probe_units(layers, values, task.labels, part, *options)

    seconds = medians({"before": before, "batched": now}, repeats, warmup=1)
    old, new = ({tuple(r[key] for key in ("layer", "label", "class", "units", "variant", "ranking")): r for r in found[name]}
                for name in ("before", "batched"))
    difference = max(np.nanmax(np.abs(np.subtract(old[key][m], new[key][m], dtype=float)), initial=0.0) for key in new for m in ("f1", "max_f1"))
    whole = medians({"time": lambda: batched.sparse_probing(moe, task, batch, config.ks, batched.RANKINGS[:1], config.min_count, config.max_classes,
                                                           batched.FRACTIONS, study.n_candidates, 0, dense)}, repeats, warmup=0)["time"]
    return [row(f"k-sparse probes of `moe-k1-e16` and its pseudo-experts, {moe.cfg.n_layers} layers, k in {list(config.ks)}: batched vs before",
                seconds, seconds["before"] / seconds["batched"], "before / batched", (">=", 10.0), tokens=len(part),
                max_f1_difference=float(difference)),
            row("`sparse_probing` of `moe-k1-e16` with its dense model (activations, k-means, probes)", {"time": whole}, tokens=len(part))]
