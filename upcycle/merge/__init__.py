"""``upcycle merge``: an MoE whose experts are the FFNs of several fine-tunes of one base model.

Modules: :mod:`.config` (own format), :mod:`.mergekit` (mergekit-moe YAML), :mod:`.loading` (either, from a
file), :mod:`.sources` (one reader over the sources), :mod:`.routers` / :mod:`.probe` (router rows from
prompts and domain text), :mod:`.planning` (the converter's plan with experts read from their sources),
:mod:`.compare`, :mod:`.fidelity` and :mod:`.specificity` (what the output reproduces, how it routes),
:mod:`.record` (recipe file and card), :mod:`.api` (the function).
"""

from .api import MergeResult, merge
from .config import ExpertSpec, MergeConfig
from .loading import load_config

__all__ = ["ExpertSpec", "MergeConfig", "MergeResult", "load_config", "merge"]
