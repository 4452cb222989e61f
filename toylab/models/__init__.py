"""Models: hooked transformers with dense or MoE feed-forward layers, hooked recurrent (LSTM, GRU) language models, and
a DRC (stacked ConvLSTMs over the task's grid)."""

from toylab.models.drc import DRC, DRCConfig
from toylab.models.hooks import HookedModule, HookPoint
from toylab.models.moe import MoE, SortedDispatch
from toylab.models.recurrent import Recurrent, RecurrentConfig
from toylab.models.transformer import MLP, Transformer, TransformerConfig

__all__ = ["DRC", "DRCConfig", "HookPoint", "HookedModule", "MLP", "MoE", "Recurrent", "RecurrentConfig", "SortedDispatch", "Transformer", "TransformerConfig"]
