"""Model editing through one subcomponent, measured against a LoRA baseline (docs/attribution-graphs.md §11).

- `rank_one`: finding a token-specific subcomponent and replacing its write vector (one rank-one change to an
  ordinary model); `edit_study`, the whole recipe on held-out text;
- `metrics`: how far an edited model moved (efficacy, D_KL surrounding and global), for the edit and the baseline;
- `lora`: the LoRA baseline on the same matrix and the Pareto figure.
"""

from circuits.edit.lora import LoraAdapter, LoraPoint, LoraSweep, lora_sweep, pareto_plot, train_lora
from circuits.edit.metrics import EditMetrics, EditPoint, edit_metrics
from circuits.edit.rank_one import (
    EditStudy,
    TokenSpecific,
    activation_sign,
    edit_study,
    edit_write_vector,
    find_token_specific,
    heldout_windows,
    resolve_edit,
    unembedding_direction,
)

__all__ = [
    "EditMetrics",
    "EditPoint",
    "EditStudy",
    "LoraAdapter",
    "LoraPoint",
    "LoraSweep",
    "TokenSpecific",
    "activation_sign",
    "edit_metrics",
    "edit_study",
    "edit_write_vector",
    "find_token_specific",
    "heldout_windows",
    "lora_sweep",
    "pareto_plot",
    "resolve_edit",
    "train_lora",
    "unembedding_direction",
]
