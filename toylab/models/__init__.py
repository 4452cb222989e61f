"""Models: hooked transformers with dense or MoE feed-forward layers."""

from toylab.models.hooks import HookedModule, HookPoint
from toylab.models.moe import MoE, SortedDispatch
from toylab.models.transformer import MLP, Transformer, TransformerConfig

__all__ = ["HookPoint", "HookedModule", "MLP", "MoE", "SortedDispatch", "Transformer", "TransformerConfig"]
