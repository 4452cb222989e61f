"""Models: hooked transformers with dense or MoE feed-forward layers, and hooked recurrent (LSTM, GRU) language models."""

from toylab.models.hooks import HookedModule, HookPoint
from toylab.models.moe import MoE, SortedDispatch
from toylab.models.recurrent import Recurrent, RecurrentConfig
from toylab.models.transformer import MLP, Transformer, TransformerConfig

__all__ = ["HookPoint", "HookedModule", "MLP", "MoE", "Recurrent", "RecurrentConfig", "SortedDispatch", "Transformer", "TransformerConfig"]
