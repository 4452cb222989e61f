"""toylab.external: labels of real text against brute-force oracles, hooks on tiny random Hugging Face MoE models of
each family against the models' own outputs, and `toylab external analyse` end to end, all without downloads.

tests/data/external holds generated LaTeX documents and Python modules (seeded snippets: nested environments, math,
blocks, calls, lists and dicts); the repository's docs and sources are read too. The tokenizer is a byte-level BPE
trained here on that corpus.
"""

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from toylab.cli import app
from toylab.errors import ToylabError
from toylab.external.labels import ENVIRONMENTS, GROUPS, LABELS, Text, expand_labels, label_tokens

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "external"
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                              reason='transformers is not installed (pip install -e ".[hf]")')
FAMILIES = {
    "mixtral": {"num_local_experts": 4},
    "olmoe": {"num_experts": 4},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "mlp_only_layers": [0]},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 16},
}
"""Tiny configs of each supported family by `model_type` (Qwen2-MoE with a dense first layer and a shared expert)."""


def bucket(value: int, n_classes: int) -> int:
    return -1 if value < 0 else min(0 if value == 0 else value.bit_length(), n_classes - 1)


def oracle(text: str, spans: list[tuple[int, int]], positions: list[int]) -> dict[str, np.ndarray]:
    """Every label by brute force: one pass over the characters with explicit stacks, then one pass over the tokens."""
    n, stack, env = len(text), [], []
    depth, top, match, env_depth, env_top, indent = [0] * n, [0] * n, [-1] * n, [0] * n, [0] * n, [-1] * n
    events = {}
    for m in re.finditer(r"\\(begin|end)\s*\{([^{}]*)\}", text):
        events[m.end() - 1 if m.group(1) == "begin" else m.start()] = m.group(2).strip().rstrip("*") if m.group(1) == "begin" else None
    names = LABELS["latex_env"].classes
    for i, c in enumerate(text):
        if c in "([{":
            stack.append((i, c))
        elif c in ")]}" and stack:
            match[i] = stack.pop()[0]
        depth[i], top[i] = len(stack), "([{".index(stack[-1][1]) + 1 if stack else 0
        if i in events:
            if events[i] is not None:
                env.append(events[i])
            elif env:
                env.pop()
        env_depth[i] = len(env)
        env_top[i] = (names.index(env[-1]) if env[-1] in ENVIRONMENTS else len(names) - 1) if env else 0
    start = 0
    for line in text.split("\n"):
        lead = line[: len(line) - len(line.lstrip(" \t\r"))]
        level = -1 if len(lead) == len(line) else (lead.count(" ") + 4 * lead.count("\t")) // 4
        indent[start: start + len(line) + 1] = [level] * len(indent[start: start + len(line) + 1])
        start += len(line) + 1
    owner = {c: t for t, (s, e) in enumerate(spans) for c in range(s, e)}
    out = {name: [] for name in LABELS}
    for t, (s, e) in enumerate(spans):
        out["position"].append(bucket(positions[t], len(LABELS["position"].classes)))
        if e <= s:
            for name in LABELS.keys() - {"position"}:
                out[name].append(-1)
            continue
        out["depth"].append(min(depth[e - 1], 7))
        out["stack_top"].append(top[e - 1])
        closers = [c for c in range(s, e) if match[c] >= 0]
        out["match_distance"].append(bucket(t - owner[match[closers[-1]]], 7) if closers else -1)
        out["latex_depth"].append(min(env_depth[e - 1], 4))
        out["latex_env"].append(env_top[e - 1])
        levels = [indent[c] for c in range(s, e) if indent[c] >= 0]
        out["indent"].append(min(levels[-1], 5) if levels else -1)
        solid = "".join(ch for ch in text[s:e] if not ch.isspace())
        out["token_class"].append(0 if not solid else 1 if all(ch.isdecimal() for ch in solid) else 2 if re.fullmatch(r"\w+", solid)
                                  else 3 if all(ch in "()[]{}" for ch in solid) else 4)
    return {name: np.array(values) for name, values in out.items()}


def assert_labels_match(text: str, spans: list[tuple[int, int]]) -> None:
    spans_array = np.array(spans, dtype=np.int64).reshape(-1, 2)
    positions = np.arange(len(spans)) % 50
    found = label_tokens(Text(text, spans_array[:, 0], spans_array[:, 1], positions), list(LABELS))
    expected = oracle(text, spans, positions.tolist())
    for name in LABELS:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)


def test_labels_match_the_oracle_on_the_corpus_and_the_repository():
    files = sorted(CORPUS.iterdir()) + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "toylab").glob("*.py"))
    for path in files:
        text = path.read_text()
        assert_labels_match(text, [m.span() for m in re.finditer(r"\s+|\w+|.", text)])


def test_labels_match_the_oracle_on_random_text_and_spans():
    rng = np.random.default_rng(0)
    pieces = [*"([{}])ab 1\n\t_x", "\\begin{itemize}", "\\end{itemize}", "\\begin{foo}", "\\end{align*}", "\\begin{align*}", "    "]
    for _ in range(300):
        text = "".join(rng.choice(pieces, rng.integers(0, 60)))
        cuts = sorted(rng.choice(np.arange(1, len(text)), min(len(text) - 1, rng.integers(0, 25)), replace=False)) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)] if text else []
        spans = list(zip(bounds[:-1], bounds[1:]))
        if spans and rng.random() < 0.3:  # an empty span (a special token) among them
            spans.insert(int(rng.integers(0, len(spans))), (spans[0][0], spans[0][0]))
        assert_labels_match(text, spans)


def test_label_names_and_groups():
    assert expand_labels("brackets,indent") == [*GROUPS["brackets"], "indent"]
    with pytest.raises(ToylabError, match="unknown label 'colour'; valid: depth"):
        expand_labels("depth,colour")


def run(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # what fixtures printed (save_pretrained's progress bar)
    with pytest.raises(SystemExit) as exit_info:
        app(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_a_missing_hf_extra_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    code, _, err = run(capsys, ["external", "analyse", str(tmp_path), "--text", str(CORPUS), "--out", str(tmp_path / "out")])
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[hf]"' in err


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on the test corpus, as a fast tokenizer with BOS and padding tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([p.read_text() for p in sorted(CORPUS.iterdir())], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny(model_type: str, tokenizer, extra: dict) -> torch.nn.Module:
    """A random-init causal LM of `model_type`, its classes found through transformers' auto mappings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Folders with a tiny model of `model_type` and the tokenizer, written by save_pretrained."""
    def save(model_type: str, extra: dict) -> Path:
        folder = tmp_path_factory.mktemp(model_type)
        tiny(model_type, tokenizer, extra).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return save


WRITABLE = ["hook_embed", "blocks.?.hook_resid_pre", "blocks.?.hook_resid_post", "blocks.?.hook_attn_out", "blocks.?.hook_mlp_out",
            "blocks.?.ln?.hook_normalized", "blocks.*.mlp.hook_expert_[iw]*", "ln_final.hook_normalized"]
"""Hook points the model reads back (editable), as patterns; the shared expert's too where there is one."""


@needs_hf
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_hooks_reproduce_the_model(model_type, tokenizer):
    from toylab.external import HookedMoE

    model = tiny(model_type, tokenizer, FAMILIES[model_type])
    hooked = HookedMoE(model)
    tokens = torch.randint(0, len(tokenizer), (3, 11))
    with torch.no_grad():
        own = model(tokens, output_router_logits=True)
        logits, cache = hooked.run_with_cache(tokens)
        writable = WRITABLE + ["blocks.*.mlp.shared.*"] * (model_type == "qwen2_moe")
        edited = hooked.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.clone()) for name in writable])
    assert (logits - own.logits).abs().max() <= 1e-5 and (edited - own.logits).abs().max() <= 1e-5
    layers = hooked.moe_layers()
    assert layers == ([1] if model_type == "qwen2_moe" else [0, 1]) and len(own.router_logits) == len(layers)
    for layer, router_logits in zip(layers, own.router_logits):
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_router_logits"].reshape(-1, 4), router_logits)
        indices, weights = cache[f"blocks.{layer}.mlp.hook_expert_indices"], cache[f"blocks.{layer}.mlp.hook_expert_weights"]
        outputs = cache[f"blocks.{layer}.mlp.hook_expert_out"]
        assert indices.shape == weights.shape == (3, 11, 2) and outputs.shape == (3, 11, 2, 32)
        mixed = (weights[..., None] * outputs).sum(2)
        if model_type == "qwen2_moe":  # the shared expert, gated by a sigmoid
            mixed = mixed + torch.sigmoid(cache[f"blocks.{layer}.mlp.shared.hook_gate"]) * cache[f"blocks.{layer}.mlp.shared.hook_out"]
        assert (mixed - cache[f"blocks.{layer}.hook_mlp_out"]).abs().max() <= 1e-5
        resid = cache[f"blocks.{layer}.hook_resid_mid"] + cache[f"blocks.{layer}.hook_mlp_out"]
        assert (resid - cache[f"blocks.{layer}.hook_resid_post"]).abs().max() <= 1e-5
    assert ("blocks.1.mlp.shared.hook_out" in cache) == (model_type == "qwen2_moe")


@needs_hf
def test_editing_routing_reroutes_and_read_only_points_refuse(tokenizer):
    from toylab.external import HookedMoE

    hooked = HookedMoE(tiny("mixtral", tokenizer, FAMILIES["mixtral"]))
    tokens = torch.randint(0, len(tokenizer), (2, 9))
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(tokens, names=["blocks.1.ln2.hook_normalized", "blocks.*.mlp.hook_expert_indices"])
        rerouted = hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_expert_indices", lambda x, h: (x + 1) % 4)])
        assert sorted(cache) == ["blocks.0.mlp.hook_expert_indices", "blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_expert_indices"]
        assert (rerouted - logits).abs().max() > 1e-4
        with pytest.raises(ToylabError, match="blocks.0.mlp.hook_router_logits is read only"):
            hooked.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_router_logits", lambda x, h: 2 * x)])


@needs_hf
def test_corpus_labels_follow_the_tokenizer_offsets(tokenizer):
    from toylab.external.analyse import read_corpus

    files = sorted(CORPUS.iterdir())
    corpus = read_corpus(files, tokenizer, list(LABELS), seq_len=64, max_tokens=10**6)
    assert (corpus.tokens[:, 0] == tokenizer.bos_token_id).all() and corpus.attended[:, 0].all() and not corpus.keep[:, 0].any()
    for i, path in enumerate(files):
        text, rows = path.read_text(), corpus.file == i
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = encoded["input_ids"]
        np.testing.assert_array_equal(corpus.tokens[rows][corpus.keep[rows]], ids)
        expected = oracle(text, [tuple(span) for span in encoded["offset_mapping"]], [j % 63 + 1 for j in range(len(ids))])
        for name in LABELS:
            np.testing.assert_array_equal(corpus.labels[name][rows][corpus.keep[rows]], expected[name], err_msg=name)


@needs_hf
def test_analyse_writes_the_report_in_under_a_minute(saved, capsys, tmp_path):
    folder, out = saved("qwen2_moe", FAMILIES["qwen2_moe"]), tmp_path / "out"
    start = time.perf_counter()
    code, stdout, err = run(capsys, ["external", "analyse", str(folder), "--text", str(CORPUS), "--labels", "brackets,indent,latex",
                                     "--out", str(out), "--seq-len", "64", "--folds", "3", "--permutations", "50", "--null-draws", "1"])
    seconds = time.perf_counter() - start
    assert code == 0, err
    assert seconds < 60 and "report:" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["family"] == "Qwen2-MoE" and list(results["specialization"]) == ["1"]
    assert results["text"] == {**results["text"], "folds": 3, "files": [str(p) for p in sorted(CORPUS.iterdir())]}
    scored = results["specialization"]["1"]
    assert set(scored) == set(results["labels"]["scored"]) == {*GROUPS["brackets"], "indent", *GROUPS["latex"]}
    assert all(s["verdict"]["n"] == 3 and 0 <= s["routing_nmi"]["mean"] <= 1 for s in scored.values())
    markdown = (out / "report.md").read_text()
    assert "over 3 disjoint folds of the text" in markdown and "Primary question" in markdown
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


@needs_hf
@pytest.mark.parametrize("case,message", [("not_moe", "LlamaForCausalLM is not a mixture-of-experts model"),
                                          ("missing", "model folder not found"), ("label", "unknown label 'colour'"),
                                          ("layer", "layer 0 is not an MoE layer")])
def test_bad_input_is_one_line_and_exit_2(case, message, saved, capsys, tmp_path):
    model = {"not_moe": lambda: saved("llama", {}), "missing": lambda: tmp_path / "nowhere",
             "label": lambda: tmp_path, "layer": lambda: saved("qwen2_moe", FAMILIES["qwen2_moe"])}[case]()
    args = ["external", "analyse", str(model), "--text", str(CORPUS), "--out", str(tmp_path / "out"),
            "--labels", "depth,colour" if case == "label" else "depth", "--layers", "0" if case == "layer" else ""]
    code, _, err = run(capsys, args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@needs_hf
def test_loading_a_saved_model_in_bfloat16(saved, tokenizer):
    from toylab.external import load
    from toylab.external.hooked import batch_size

    folder = saved("olmoe", FAMILIES["olmoe"])
    tokens = torch.randint(0, len(tokenizer), (2, 8))
    (full, _), (half, loaded_tokenizer) = load(str(folder), device="cpu"), load(str(folder), "bfloat16", device="cpu")
    with torch.no_grad():
        exact, cache = full.run_with_cache(tokens, names="blocks.0.ln2.hook_normalized")
        rough = half(tokens)
    assert loaded_tokenizer.is_fast and half.family == "OLMoE" and rough.dtype == torch.bfloat16
    assert (rough.float() - exact).abs().max() < 0.05 and cache["blocks.0.ln2.hook_normalized"].shape == (2, 8, 32)
    assert 1 <= batch_size(full, 64, 100) <= 64
