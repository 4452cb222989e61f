"""The specialization analysis of `toylab.analysis.specialization` on a pretrained MoE and labelled real text.

Text files are tokenized with character offsets, every token is labelled (`toylab.external.labels`), and the
tokens are cut into sequences of `seq_len` (after the tokenizer's BOS token, when it has one). The router input
(`blocks.{l}.ln2.hook_normalized`) and the chosen experts of each analysed MoE layer are collected, and on each
fold of the text the top-1 expert is scored against every label beside k-means on the router input, the shuffled
and within-token nulls, the linear ceiling and, with `null_draws`, the usage-matched null routers (`label_scores`).

One pretrained model has no training seeds: the "seeds" of `summarize` are disjoint folds of the text's sequences
(sequence i in fold i mod the number of folds, so every fold samples every file), so intervals and verdicts say how
much the scores vary across resamples of the text, for this one model, not across models trained alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toylab import io
from toylab.analysis.clustering import kmeans
from toylab.analysis.null_routers import balanced_kmeans, random_linear_routers
from toylab.analysis.specialization import (
    EXPERTS, FAMILIES, NULL_ROUTERS, PRIMARY, ROUTER_INPUT, family_members, label_scores, summarize, top_expert,
)
from toylab.analysis.stats import correct_families, verdict_label
from toylab.determinism import torch_threads
from toylab.errors import ToylabError
from toylab.formatting import fmt, fmt_ci
from toylab.external.hooked import HookedMoE, batch_size, check_dtype, load
from toylab.external.labels import LABELS, Text, check_labels, label_tokens

MIN_TOKENS = 20
"""Fewest labelled tokens per fold for a label to be scored."""
QUESTIONS = {**FAMILIES, PRIMARY: "routing vs k-means NMI, the requested labels at the last analysed MoE layer"}


@dataclass(frozen=True)
class AnalyseConfig:
    labels: tuple[str, ...] = ("depth", "stack_top", "indent")
    seq_len: int = 128
    """Tokens per sequence, the BOS token included."""
    folds: int = 5
    """Disjoint folds of the text, the "seeds" of the intervals (a verdict needs at least 3)."""
    max_tokens: int = 50_000
    """Most tokens read from the text (files in sorted order)."""
    layers: tuple[int, ...] = ()
    """MoE layers to analyse (empty: every one)."""
    n_permutations: int = 200
    null_draws: int = 0
    margin: float | None = None
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_labels(self.labels)
        check_dtype(self.dtype)
        for key, least in (("seq_len", 2), ("folds", 1), ("max_tokens", 1), ("n_permutations", 1), ("null_draws", 0)):
            if getattr(self, key) < least:
                raise ToylabError(f"{key} must be >= {least} (got {getattr(self, key)})")


def text_files(where: Path) -> list[Path]:
    """The readable files under `where` (or `where` itself), hidden ones aside, in sorted order."""
    if not where.exists():
        raise ToylabError(f"text path not found: {where}")
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.is_file() and not
                                                   any(part.startswith(".") for part in p.relative_to(where).parts))
    if not files:
        raise ToylabError(f"no text files in {where}")
    return files


@dataclass
class Corpus:
    """Sequences `[n, seq_len]` of token ids, their labels (-1 undefined), which positions are text (not BOS or
    padding), which are attended to (not padding), and each sequence's file."""

    tokens: np.ndarray
    labels: dict[str, np.ndarray]
    keep: np.ndarray
    attended: np.ndarray
    file: np.ndarray
    files: list[str]
    skipped: list[str]


def read_corpus(files: Sequence[Path], tokenizer: Any, names: Sequence[str], seq_len: int, max_tokens: int) -> Corpus:
    """Tokenize and label each UTF-8 file (others are skipped) and cut it into sequences (the last one padded), each
    after the BOS token when the tokenizer has one."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = seq_len - (bos is not None)
    parts: list[dict[str, np.ndarray]] = []
    used, skipped, total = [], [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(str(path))
            continue
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)[: max_tokens - total]
        if not len(ids):
            continue
        spans = np.asarray(encoded["offset_mapping"], dtype=np.int64)[: len(ids)].reshape(-1, 2)
        labels = label_tokens(Text(text, spans[:, 0], spans[:, 1], np.arange(len(ids)) % width + (bos is not None)), names)
        rows = -(-len(ids) // width)

        def cut(values: np.ndarray, fill: Any, first: Any) -> np.ndarray:
            grid = np.pad(values, (0, rows * width - len(values)), constant_values=fill).reshape(rows, width)
            return grid if bos is None else np.concatenate([np.full((rows, 1), first, dtype=grid.dtype), grid], axis=1)

        parts.append({"tokens": cut(ids, pad, bos), "keep": cut(np.ones(len(ids), bool), False, False),
                      "attended": cut(np.ones(len(ids), bool), False, True), "file": np.full(rows, len(used)),
                      **{f"label:{name}": cut(values, -1, -1) for name, values in labels.items()}})
        used.append(str(path))
        total += len(ids)
        if total >= max_tokens:
            break
    if not parts:
        raise ToylabError("no UTF-8 text with any token among the files given")
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return Corpus(joined["tokens"], {name: joined[f"label:{name}"] for name in names}, joined["keep"], joined["attended"],
                  joined["file"], used, skipped)


def fold_of(corpus: Corpus, folds: int) -> np.ndarray:
    """Each sequence's fold: sequence i (in file order) in fold i mod `folds`, so that every fold samples every file."""
    if len(corpus.tokens) < 2 * folds:
        raise ToylabError(f"the text makes {len(corpus.tokens)} sequences of {corpus.tokens.shape[1]} tokens, too few for {folds} folds "
                          f"of at least 2; give more text, a shorter --seq-len or fewer --folds")
    return np.arange(len(corpus.tokens)) % folds


@torch.no_grad()
def router_activations(model: HookedMoE, corpus: Corpus, layers: Sequence[int]) -> dict[str, np.ndarray]:
    """The router input `[n_tokens, d_model]` (float32) and chosen experts `[n_tokens, k]` of each layer, over the text
    tokens of the corpus in order, in batches that fit in free memory; only these names are cached."""
    names = [ROUTER_INPUT.format(layer=layer) for layer in layers] + [EXPERTS.format(layer=layer) for layer in layers]
    config = model.model.config
    size = batch_size(model, corpus.tokens.shape[1], len(layers) * (config.hidden_size + getattr(config, "num_experts_per_tok", 1)))
    device = next(model.model.parameters()).device
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(corpus.tokens), size):
        rows = slice(start, start + size)
        tokens, attended = (torch.from_numpy(a[rows]).to(device) for a in (corpus.tokens, corpus.attended))
        _, cache = model.run_with_cache(tokens, attended.long(), names=names)
        keep = torch.from_numpy(corpus.keep[rows]).to(device)
        for name in names:
            kept = cache[name][keep]
            found[name].append((kept.float() if kept.is_floating_point() else kept).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in found.items()}


def scorable(corpus: Corpus, fold: np.ndarray, folds: int) -> tuple[list[str], dict[str, str]]:
    """The labels with at least two classes and `MIN_TOKENS` labelled tokens in every fold, and why each other is not."""
    good, why = [], {}
    for name, values in corpus.labels.items():
        for f in range(folds):
            present = values[fold == f][corpus.keep[fold == f]]
            present = present[present >= 0]
            if len(present) < MIN_TOKENS or len(np.unique(present)) < 2:
                why[name] = f"fold {f} has {len(present)} labelled tokens in {len(np.unique(present))} class(es)"
                break
        else:
            good.append(name)
    return good, why


def fold_scores(acts: dict[str, np.ndarray], corpus: Corpus, fold: np.ndarray, f: int, layers: Sequence[int], labels: Sequence[str],
                n_experts: int, cfg: AnalyseConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """`label_scores` of every (layer, label) on the tokens of fold `f`, as `specialization` gives for one seed."""
    token_fold = np.broadcast_to(fold[:, None], corpus.keep.shape)[corpus.keep]
    rows = token_fold == f
    sequence = np.broadcast_to(np.arange(len(fold))[:, None], corpus.keep.shape)[corpus.keep][rows]
    sequence = np.unique(sequence, return_inverse=True)[1]
    tokens = corpus.tokens[corpus.keep][rows]
    seed = cfg.seed + f
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layer in layers:
        x = acts[ROUTER_INPUT.format(layer=layer)][rows]
        routing = top_expert(acts[EXPERTS.format(layer=layer)][rows], n_experts)
        assignments = {"routing": routing, "kmeans_moe": kmeans(x, n_experts, seed)}
        usage = np.bincount(routing, minlength=n_experts)
        nulls = {"kmeans_balanced": balanced_kmeans(x, usage, seed)[None],
                 "random_linear": random_linear_routers(x, usage, cfg.null_draws, seed)} if cfg.null_draws else {}
        results[str(layer)] = {}
        for name in labels:
            label = corpus.labels[name][corpus.keep][rows]
            defined = label >= 0
            results[str(layer)][name] = label_scores(
                {kind: a[defined] for kind, a in assignments.items()}, x[defined], label[defined], len(LABELS[name].classes),
                tokens[defined], sequence[defined], cfg.n_permutations, seed, {kind: d[:, defined] for kind, d in nulls.items()})
    return results


def analyse(source: str, text: Path, out: Path, cfg: AnalyseConfig) -> dict[str, Any]:
    """Run the analysis of `source` (a local model folder or a hub name) on the text under `text`; write
    `results.json`, `report.md` and `report.html` into `out` and return the results."""
    started = time.perf_counter()
    files = text_files(Path(text))
    io.check_writable(Path(out) / "results.json")
    model, tokenizer = load(source, cfg.dtype, cfg.device)
    layers = list(cfg.layers) or model.moe_layers()
    wrong = [layer for layer in layers if layer not in model.moe_layers()]
    if wrong:
        raise ToylabError(f"layer {wrong[0]} is not an MoE layer of {source}; valid: {', '.join(map(str, model.moe_layers()))}")
    corpus = read_corpus(files, tokenizer, check_labels(cfg.labels), cfg.seq_len, cfg.max_tokens)
    fold = fold_of(corpus, cfg.folds)
    labels, unscored = scorable(corpus, fold, cfg.folds)
    if not labels:
        raise ToylabError("no label varies enough in every fold of this text: " + "; ".join(f"{k}: {v}" for k, v in unscored.items()))
    acts = router_activations(model, corpus, layers)
    with torch_threads(1):  # small probes: threads only contend, as in the expert-specialization study
        per_fold = [fold_scores(acts, corpus, fold, f, layers, labels, model.n_experts, cfg) for f in range(cfg.folds)]
    summary = summarize(per_fold, cfg.margin)
    families = correct_families(family_members(summary, set(labels)), QUESTIONS, PRIMARY)
    results = {
        "model": {"source": source, "class": type(model.model).__name__, "family": model.family, "n_experts": model.n_experts,
                  "top_k": int(acts[EXPERTS.format(layer=layers[0])].shape[1]), "moe_layers": model.moe_layers(), "dtype": cfg.dtype},
        "config": asdict(cfg),
        "text": {"files": corpus.files, "skipped": corpus.skipped, "sequences": len(corpus.tokens), "tokens": int(corpus.keep.sum()),
                 "folds": cfg.folds},
        "labels": {"scored": labels, "unscored": unscored,
                   "classes": {name: dict(zip(LABELS[name].classes, np.bincount(values[corpus.keep & (values >= 0)],
                                                                                 minlength=len(LABELS[name].classes)).tolist()))
                               for name, values in corpus.labels.items()}},
        "per_fold": per_fold,
        "specialization": summary,
        "families": families,
    }
    results["seconds"] = time.perf_counter() - started
    write_report(results, Path(out))
    return results


def write_report(results: dict[str, Any], out: Path) -> None:
    """`results.json`, `report.md` and `report.html` in `out` (each written atomically)."""
    from toylab.report import Document, Section, Table, Text, families_section, margin_text, to_html, to_markdown, verdict_text

    model, text, summary = results["model"], results["text"], results["specialization"]
    last = max(summary, key=int)
    primary = [{"layer": last, "label": label, "NMI routing": fmt_ci(s["routing_nmi"]),
                "NMI k-means (router input)": fmt_ci(s["kmeans_moe_nmi"]), "AMI routing": fmt_ci(s["routing_ami"]), "linear probe NMI": fmt_ci(s["linear_nmi"]), "δ": margin_text(s["margin"]),
                "routing vs k-means": verdict_text(s["verdict"])} for label, s in summary[last].items()]
    rows = [{"layer": layer, "label": label, "NMI routing": fmt_ci(s["routing_nmi"]), "NMI k-means": fmt_ci(s["kmeans_moe_nmi"]),
             "NMI null": fmt(s["null_nmi"]["mean"]), "AMI routing": fmt_ci(s["routing_ami"]), "AMI k-means": fmt_ci(s["kmeans_moe_ami"]),
             "cNMI routing [null]": f"{fmt_ci(s['routing_cnmi'])} [{fmt(s['null_cnmi']['mean'])}]",
             "probe acc. [majority]": f"{fmt_ci(s['linear_accuracy'])} [{fmt(s['linear_baseline']['mean'])}]",
             "routing vs k-means": verdict_label(s["verdict"]),
             "given the token": verdict_label(s["conditional_verdict"]) if s["label_entropy_given_token"] > 1e-9 else "n/a",
             **{f"vs {name}": verdict_label(s[f"vs_{kind}"]) for kind, name in NULL_ROUTERS.items() if f"vs_{kind}" in s}}
            for layer, labels in summary.items() for label, s in labels.items()]
    classes = [{"label": name, "description": LABELS[name].description, "scored": "yes" if name in results["labels"]["scored"] else
                f"no: {results['labels']['unscored'][name]}", "tokens per class": ", ".join(f"{c} {n}" for c, n in counts.items())}
               for name, counts in results["labels"]["classes"].items()]
    document = Document(f"Expert specialization on real text: {model['family']} `{model['source']}`", [
        Text(f"**Bottom line.** At MoE layer {last}, routing (top-1 expert) vs k-means on the router input: "
             + "; ".join(f"`{r['label']}`: {r['routing vs k-means']}" for r in primary) + "."),
        families_section("**Primary question**: do the experts of the last analysed MoE layer group tokens by the labels beyond "
                         "what k-means on their router input finds?", results["families"], [Table(primary)], list(QUESTIONS)),
        Section("What was run", [Text(
            f"Model `{model['source']}` ({model['class']}, {model['n_experts']} experts, top-{model['top_k']}, MoE layers "
            f"{', '.join(map(str, model['moe_layers']))}; {model['dtype']}), analysed at layers {', '.join(summary)}. Text: "
            f"{len(text['files'])} file(s), {text['tokens']:,} tokens in {text['sequences']} sequences of "
            f"{results['config']['seq_len']} tokens" + (f"; {len(text['skipped'])} file(s) skipped (not UTF-8)" if text["skipped"] else "")
            + f".\n\n**Intervals and verdicts are over {text['folds']} disjoint folds of the text** (sequence i in fold i mod "
            f"{text['folds']}, so that every fold samples every file), analysed one at a time as the seeds of a study would be (k-means, probe and nulls refitted per fold): they say how much the "
            "scores move across resamples of the text for this one pretrained model, not across models trained alike (where a "
            "verdict says seeds, read folds). "
            f"Nulls: {results['config']['n_permutations']} shuffles; {results['config']['null_draws']} random linear routers.")]),
        Section("Labels", [Text("Per-token labels computed from the characters (`toylab.external.labels`, checked against "
                                "brute-force oracles in the tests); a token takes the label of its last character where the label is defined."), Table(classes)]),
        Section("Scores per layer and label (mean [95% CI] over folds)", [Table(rows)]),
        Section("Verdicts", [Text("\n".join(
            f"- Layer {layer}, `{label}`, δ = {margin_text(s['margin'])}: routing vs k-means {verdict_text(s['verdict'])}; given the "
            + (f"token {verdict_text(s['conditional_verdict'])}." if s["label_entropy_given_token"] > 1e-9
               else "token n/a (the token determines the label).")
            for layer, labels in summary.items() for label, s in labels.items()))]),
    ])
    io.write_json(out / "results.json", results)
    io.write_text(out / "report.md", to_markdown(document))
    io.write_text(out / "report.html", to_html(document, out))
