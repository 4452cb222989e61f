"""Pretrained Hugging Face MoE models in the lab: hooks with the lab's names (`hooked`), labels of real text checked by
oracles (`labels`), and the expert-specialization analysis on them (`analyse`, `toylab external analyse`).

Needs the optional extra `pip install -e ".[hf]"`; `transformers` is imported only when a model is loaded.
"""

from toylab.external.hooked import HookedMoE, load

__all__ = ["HookedMoE", "load"]
