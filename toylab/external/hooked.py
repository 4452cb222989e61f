"""Hugging Face MoE causal LMs (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) with the lab's hook names.

`HookedMoE` wraps the model `transformers` builds and gives it the hook points of `toylab.models` (the same names,
`[batch, pos, ...]` layouts and `run_with_cache` / `run_with_hooks` as `toylab.models.hooks.HookedModule`). No model
code is copied: each hook point is fed by a PyTorch forward hook on the Hugging Face module that computes it, and
does nothing unless a hook reads or edits it.

    hook_embed                         embed_tokens output                     [batch, pos, d_model]
    blocks.{l}.hook_resid_pre          decoder layer input                     [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized     input_layernorm output
    blocks.{l}.hook_attn_out           self_attn output
    blocks.{l}.hook_resid_mid          post_attention_layernorm input (read only)
    blocks.{l}.ln2.hook_normalized     post_attention_layernorm output: the router input
    blocks.{l}.mlp.hook_router_logits  router (mlp.gate) logits (read only)   [batch, pos, n_experts]
    blocks.{l}.mlp.hook_expert_indices chosen experts, best first             [batch, pos, k]
    blocks.{l}.mlp.hook_expert_weights their weights (as the model mixes them) [batch, pos, k]
    blocks.{l}.mlp.hook_expert_out     each chosen expert's output, unweighted [batch, pos, k, d_model] (read only)
    blocks.{l}.mlp.shared.hook_post    shared expert's neurons (Qwen2-MoE)     [batch, pos, d_shared]
    blocks.{l}.mlp.shared.hook_out     shared expert's output, before its gate [batch, pos, d_model]
    blocks.{l}.mlp.shared.hook_gate    shared expert's gate logit (sigmoid)    [batch, pos, 1]
    blocks.{l}.hook_mlp_out            feed-forward output                     [batch, pos, d_model]
    blocks.{l}.hook_resid_post         decoder layer output
    ln_final.hook_normalized           final norm output

Editing the expert indices or weights reroutes the layer. Read-only points are observations the model does not
read back (the router's logits: routing is decided by indices and weights), and editing them is a one-line error.
Expert outputs run the model's own experts module once per slot, with weight 1, only when that hook is asked for.

Supported: transformers >= 5.0, whose MoE blocks hold a router module `mlp.gate` returning (logits, weights, indices)
and a fused `mlp.experts` module (checked with 5.25.0); any model in that layout works, the four families are tested.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toylab.errors import ToylabError
from toylab.models.hooks import HookedModule, HookPoint

FAMILIES = {"mixtral": "Mixtral", "olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}
"""The tested families, by `model_type`."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL = 'pip install -e ".[hf]"'
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def require_transformers() -> Any:
    """The `transformers` module, or a one-line ToylabError saying how to install it (or that it is too old)."""
    try:
        import transformers
    except ImportError:
        raise ToylabError(f"toylab external needs the Hugging Face extra: {INSTALL}") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ToylabError(f"toylab external needs transformers >= 5.0 (found {transformers.__version__}): {INSTALL}")
    return transformers


def is_moe(mlp: nn.Module) -> bool:
    """Whether a decoder layer's feed-forward module is an MoE block: a router `gate` beside an `experts` module."""
    return isinstance(getattr(mlp, "gate", None), nn.Module) and isinstance(getattr(mlp, "experts", None), nn.Module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ToylabError(f"{type(model).__name__} has no decoder layers at model.layers; toylab external reads causal LMs "
                          f"such as {', '.join(FAMILIES.values())}")
    return layers


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_normalized = HookPoint()


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_post, self.hook_out, self.hook_gate = HookPoint(), HookPoint(), HookPoint()


class Experts(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.hook_router_logits, self.hook_expert_indices, self.hook_expert_weights = HookPoint(), HookPoint(), HookPoint()
        self.hook_expert_out = HookPoint()
        if shared:
            self.shared = Shared()


class Block(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = Norm(), Norm()
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        if is_moe(layer.mlp):
            self.mlp = Experts(hasattr(layer.mlp, "shared_expert"))


class HookedMoE(HookedModule):
    """A Hugging Face MoE causal LM with the lab's hook points; `forward(tokens, attention_mask=None)` gives logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        layers = decoder_layers(model)
        self.hook_embed, self.ln_final = HookPoint(), Norm()
        self.blocks = nn.ModuleList(Block(layer) for layer in layers)
        if not self.moe_layers():
            raise ToylabError(f"{type(model).__name__} is not a mixture-of-experts model (no layer has a router `mlp.gate` "
                              f"beside `mlp.experts`); supported: {', '.join(FAMILIES.values())}")
        self.setup_hooks()
        self.shape: tuple[int, int] = (0, 0)
        """`[batch, pos]` of the running forward pass (set by the embedding hook): the layout of flattened tokens."""
        inner = model.model
        inner.embed_tokens.register_forward_hook(self.on_embed)
        self.tap(inner.norm, self.ln_final.hook_normalized)
        for layer, block in zip(layers, self.blocks):
            self.tap(layer, block.hook_resid_pre, pre=True)
            self.tap(layer.input_layernorm, block.ln1.hook_normalized)
            self.tap(layer.self_attn, block.hook_attn_out, pick=0)
            self.tap(layer.post_attention_layernorm, block.hook_resid_mid, pre=True, writable=False)
            self.tap(layer.post_attention_layernorm, block.ln2.hook_normalized)
            self.tap(layer.mlp, block.hook_mlp_out)
            self.tap(layer, block.hook_resid_post, pick=0)
            if hasattr(block, "mlp"):
                mlp = block.mlp
                self.tap(layer.mlp.gate, mlp.hook_router_logits, pick=0, writable=False)
                self.tap(layer.mlp.gate, mlp.hook_expert_weights, pick=1)
                self.tap(layer.mlp.gate, mlp.hook_expert_indices, pick=2)
                layer.mlp.experts.register_forward_hook(self.expert_outputs(mlp.hook_expert_out), with_kwargs=True)
                if hasattr(mlp, "shared"):
                    self.tap(layer.mlp.shared_expert.down_proj, mlp.shared.hook_post, pre=True)
                    self.tap(layer.mlp.shared_expert, mlp.shared.hook_out)
                    self.tap(layer.mlp.shared_expert_gate, mlp.shared.hook_gate)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits

    def moe_layers(self) -> list[int]:
        return [layer for layer, block in enumerate(self.blocks) if hasattr(block, "mlp")]

    @property
    def n_experts(self) -> int:
        return decoder_layers(self.model)[self.moe_layers()[0]].mlp.gate.weight.shape[0]

    @property
    def family(self) -> str:
        model_type = self.model.config.model_type
        return FAMILIES.get(model_type, model_type)

    def on_embed(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        self.shape = tuple(out.shape[:2])
        return self.through(self.hook_embed, out, True)

    def through(self, point: HookPoint, value: torch.Tensor, writable: bool, rank: int = 1) -> torch.Tensor | None:
        """Pass `value` through `point` in the `[batch, pos, ...]` layout (`rank` feature dimensions: with one more
        dimension its tokens are flattened); the replacement in `value`'s own layout, or None when no hook replaced it
        (a one-line error for a read-only point)."""
        if not point.active:
            return None
        shaped = value.view(*self.shape, *value.shape[1:]) if value.dim() == rank + 1 else value
        new = point(shaped)
        if new is shaped:
            return None
        if not writable:
            raise ToylabError(f"{point.name} is read only (the model does not read it back); edit another hook point")
        return new.reshape(value.shape).to(value.dtype)

    def tap(self, module: nn.Module, point: HookPoint, pick: int | None = None, pre: bool = False, writable: bool = True) -> None:
        """Feed `point` from `module`'s first input (`pre`) or its output (item `pick` of a tuple output)."""
        if pre:
            def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                value = args[0] if args else kwargs["hidden_states"]
                new = self.through(point, value, writable)
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            module.register_forward_pre_hook(before, with_kwargs=True)
            return

        def after(mod: nn.Module, args: tuple, out: Any) -> Any:
            item = out if pick is None or not isinstance(out, tuple) else out[pick]
            new = self.through(point, item, writable)
            if new is None:
                return None
            return new if item is out else (*out[:pick], new, *out[pick + 1:])
        module.register_forward_hook(after)

    def expert_outputs(self, point: HookPoint) -> Callable[..., None]:
        """A hook on an experts module that runs it once per slot with weight 1 (bypassing its hooks) into `point`."""
        def after(experts: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            if point.active:
                hidden, indices, weights = (*args, *kwargs.values())[:3]
                ones = torch.ones_like(weights[:, :1])
                slots = [experts.forward(hidden, indices[:, j:j + 1].contiguous(), ones) for j in range(indices.shape[1])]
                self.through(point, torch.stack(slots, 1), writable=False, rank=2)
        return after


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ToylabError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")


def resolve(source: str) -> str:
    """A local folder as a path string, or a hub name as given; one-line ToylabError for a path that is not there."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ToylabError(f"model path {source} is a file; give the folder save_pretrained wrote, or a hub name")
        return str(path)
    if source.startswith((".", "/", "~")) or not HUB_NAME.fullmatch(source):
        raise ToylabError(f"model folder not found: {source}")
    return source


def load(source: str, dtype: str = "float32", device: str | None = None) -> tuple[HookedMoE, Any]:
    """`(HookedMoE, fast tokenizer)` of a Hugging Face MoE causal LM from a local folder or a hub name, in `dtype`
    (float32 or bfloat16) on `device` (default: CUDA when available). The architecture is checked on the meta device
    before any weight is read: a model that is not an MoE is a one-line ToylabError."""
    transformers = require_transformers()
    check_dtype(dtype)
    where = resolve(source)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a command's output stays its own lines
    try:
        config = transformers.AutoConfig.from_pretrained(where)
        with torch.device("meta"):
            HookedMoE(transformers.AutoModelForCausalLM.from_config(config))
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype])
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError) as error:
        raise ToylabError(f"cannot load model '{source}': {str(error).strip().splitlines()[0]}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if not tokenizer.is_fast:
        raise ToylabError(f"model '{source}' has no fast tokenizer (tokenizer.json), which labels need for character offsets")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HookedMoE(model.to(device).eval()), tokenizer


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: CUDA's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def batch_size(model: HookedMoE, seq_len: int, cached_width: int, most: int = 64) -> int:
    """Sequences per forward pass that fit in half the free memory: per token, the cached activations (`cached_width`
    values in float32) and about the working set of one layer (the residual stream several times, the experts'
    hidden units, the logits), plus each head's attention row."""
    config = model.model.config
    element = next(model.model.parameters()).element_size()
    hidden = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    per_token = (4 * cached_width + element * (8 * config.hidden_size + 3 * getattr(config, "num_experts_per_tok", 1) * hidden
                                               + 2 * config.vocab_size + config.num_attention_heads * seq_len))
    device = next(model.model.parameters()).device
    return int(max(1, min(most, free_memory(device) // 2 // (per_token * seq_len))))
